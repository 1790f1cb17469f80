// CUDA implementation of the relation ops rkd and pairwise_distances (schemas and shared checks:
// csrc/ops/rkd.cpp, csrc/ops/pairwise_distances.cpp, csrc/ops/rkd.h), as csrc/cpu/rkd_ops.cpp:
// scaling and centring, the products back to points and the per-group sums with ATen (all on
// the current stream, no host synchronisation), the n x n and n^3 work in csrc/cuda/rkd.cu. Groups
// are processed together, B x n x n at a time; memory is O(B n^2) beyond the inputs and gradients.
#if !defined(KDFAST_CUDA_EMULATE)
#include <torch/library.h>
#endif

#include <cmath>

#include "cuda/glue_device.h"
#include "cuda/kernels.h"
#include "ops/kernel_dtype.h"
#include "ops/rkd.h"

namespace kdfast {
namespace {

using cuda_glue::DeviceGuard;
using cuda_glue::kDevice;
using cuda_glue::stream_of;

void check_same_cuda(const char* op, std::initializer_list<at::Tensor> ts) {
  const at::Tensor& first = *ts.begin();
  for (const at::Tensor& t : ts) {
    TORCH_CHECK(t.device().type() == kDevice && t.device() == first.device(), op,
                ": every tensor must be on one CUDA device, got ", t.device(), " and ", first.device());
  }
}

const double* dptr(const at::Tensor& t) { return t.data_ptr<double>(); }

// D2 of every group from its (scaled) points.
void sq_dists_cuda(const at::Tensor& points, at::Tensor& d2) {
  KDFAST_CUDA_CHECK(cuda::rkd_sq_dists(dptr(points), points.size(0), points.size(1), points.size(2),
                                    d2.data_ptr<double>(), stream_of(points)));
}

// On the device: deciding per group there keeps the host from waiting for D2.
at::Tensor wide_span_cuda(const at::Tensor& d2) {
  const int64_t B = d2.size(0), n = d2.size(1);
  at::Tensor parts = at::empty({2, B, cuda::rkd_span_parts(n)}, d2.options());
  at::Tensor wide = at::empty({B}, d2.options().dtype(at::kBool));
  KDFAST_CUDA_CHECK(cuda::rkd_wide_span(dptr(d2), B, n, parts[0].data_ptr<double>(), parts[1].data_ptr<double>(),
                                     wide.data_ptr<bool>(), stream_of(d2)));
  return wide;
}

void grad_wide_cuda(const at::Tensor& W, const at::Tensor& points, const at::Tensor& wide, at::Tensor& g) {
  TORCH_INTERNAL_ASSERT(W.is_contiguous() && points.is_contiguous() && g.is_contiguous());
  KDFAST_CUDA_CHECK(cuda::rkd_grad_wide(dptr(W), dptr(points), wide.data_ptr<bool>(), points.size(0), points.size(1),
                                     points.size(2), g.data_ptr<double>(), stream_of(g)));
}

const RelationKernels kCudaKernels{sq_dists_cuda, wide_span_cuda, grad_wide_cuda, /*host=*/false};

// Distances of every group with the mean (double) and count of their positive entries.
struct Dist {
  at::Tensor dist, mean, count;
};

Dist pdist(const at::Tensor& d2, bool squared, const at::Tensor& eps) {
  const int64_t B = d2.size(0), n = d2.size(1);
  Dist d;
  d.dist = at::empty_like(d2);
  KDFAST_CUDA_CHECK(cuda::rkd_pdist(dptr(d2), B, n, squared, dptr(eps), d.dist.data_ptr<double>(), stream_of(d2)));
  const at::Tensor pos = ~(d.dist <= 0);  // a NaN distance makes the mean NaN, as torch's sum
  d.count = pos.sum({1, 2}).to(at::kDouble);
  // 0 / 0 = NaN where a group has no positive distance, as the CPU op and torch's mean of nothing
  d.mean = at::where(pos, d.dist, 0.0).sum({1, 2}) / d.count;
  return d;
}

// d loss / d D2 from d loss / d output of the distances (psi when normalize).
at::Tensor pdist_backward(const at::Tensor& d2, const Dist& d, bool squared, bool normalize, const at::Tensor& eps,
                          const at::Tensor& gout) {
  const int64_t B = d2.size(0), n = d2.size(1);
  const auto dopt = d.mean.options();
  at::Tensor inv_mean, k;
  if (normalize) {
    inv_mean = (1.0 / d.mean).contiguous();
    // one mean at a time: a group scaled far down (huge points, eps clamp) has a mean whose square underflows
    k = (at::sum(gout * d.dist, {1, 2}) / d.mean / (d.mean * d.count)).contiguous();
  } else {
    inv_mean = at::ones({B}, dopt);
    k = at::zeros({B}, dopt);
  }
  at::Tensor M = at::empty_like(d2);
  KDFAST_CUDA_CHECK(cuda::rkd_pdist_backward(dptr(d2), dptr(d.dist), dptr(gout), dptr(inv_mean), dptr(k), B, n, squared,
                                          dptr(eps), M.data_ptr<double>(), stream_of(d2)));
  return M;
}

// Groups of weight 0 get a zero D2 gradient (as on the CPU; their points' gradient is then 0
// unless the points themselves hold inf or NaN, which the product back to points carries).
at::Tensor drop_zero_weight(const at::Tensor& M, const at::Tensor& w) {
  if (!M.defined()) return M;
  return at::where((w != 0).view({-1, 1, 1}), M, 0.0);
}

// One term's share of the op: per-group losses (weighted) and D2 gradients (undefined if not asked).
struct Term {
  at::Tensor loss, Ms, Mt;
};

// wd: the group weights in double; dw: the term's weight.
Term distance_term(const RelationInputs& in, const at::Tensor& wd, double dw, double delta, bool squared,
                   double eps, bool want_s, bool want_t, cudaStream_t stream) {
  const int64_t B = in.B, n = in.N;
  const double nn = double(n) * double(n);
  const at::Tensor eps_s = in.ps.eps_sq(eps).contiguous(), eps_t = in.pt.eps_sq(eps).contiguous();
  Dist ds = pdist(in.ps.d2, squared, eps_s), dt = pdist(in.pt.d2, squared, eps_t);
  const at::Tensor coef = (wd * dw / nn).contiguous();
  const at::Tensor inv_ms = (1.0 / ds.mean).contiguous(), inv_mt = (1.0 / dt.mean).contiguous();
  const int nblk = cuda::rkd_distance_blocks(n);
  at::Tensor partial = at::empty({B, nblk}, coef.options());
  at::Tensor gps = want_s ? at::empty_like(in.ps.d2) : at::Tensor();
  at::Tensor gpt = want_t ? at::empty_like(in.pt.d2) : at::Tensor();
  KDFAST_CUDA_CHECK(cuda::rkd_distance_huber(dptr(ds.dist), dptr(dt.dist), dptr(inv_ms), dptr(inv_mt), dptr(coef), B, n,
                                          delta, partial.data_ptr<double>(),
                                          want_s ? gps.data_ptr<double>() : nullptr,
                                          want_t ? gpt.data_ptr<double>() : nullptr, stream));
  Term r;
  r.loss = partial.sum(1) / nn * dw;
  if (want_s) r.Ms = pdist_backward(in.ps.d2, ds, squared, true, eps_s, gps);
  if (want_t) r.Mt = pdist_backward(in.pt.d2, dt, squared, true, eps_t, gpt);
  return r;
}

// The angle loop's inputs of one side (see cuda::rkd_angle_prep).
struct AngleSide {
  at::Tensor hi, lo, inv, eps;
  AngleSide(const RelationPoints& p, at::ScalarType acc, double eps_user, cudaStream_t stream) {
    const auto opts = p.d2.options().dtype(acc);
    hi = at::empty({p.B, p.N, p.N}, opts), lo = at::empty_like(hi), inv = at::empty_like(hi);
    eps = p.eps_side(eps_user).contiguous();
    const at::Tensor mx = p.d2.amax({1, 2}).contiguous();
    KDFAST_CUDA_CHECK(cuda::rkd_angle_prep(to_kernel_dtype(acc), dptr(p.d2), dptr(mx), dptr(eps), dptr(p.scaled),
                                        p.scaled.size(2), p.wide().data_ptr<bool>(), p.B, p.N, hi.data_ptr(),
                                        lo.data_ptr(), inv.data_ptr(), stream));
  }
};

// d loss / d D2 of the angle term from A, R and S.
at::Tensor angle_grad(const RelationPoints& p, const AngleSide& side, const at::Tensor& A, const at::Tensor& R,
                      const at::Tensor& S) {
  at::Tensor M = at::empty_like(p.d2);
  KDFAST_CUDA_CHECK(cuda::rkd_angle_grad(to_kernel_dtype(A.scalar_type()), dptr(p.d2), A.data_ptr(), R.data_ptr(), S.data_ptr(),
                                      dptr(side.eps), p.B, p.N, M.data_ptr<double>(), stream_of(M)));
  return M;
}

Term angle_term(const RelationInputs& in, const at::Tensor& wd, double aw, double delta, double eps, bool want_s,
                bool want_t, cudaStream_t stream) {
  const int64_t B = in.B, n = in.N;
  const double n3 = double(n) * double(n) * double(n);
  // The gradient's terms through D2 cancel to h sin(theta) / n_ij (0 for collinear points), so
  // float rounding, amplified by the ratio of long sides to short ones, would swamp it in groups
  // of wide side-length spans. The CPU takes such groups alone in double; here that choice would
  // need the spans on the host (a synchronisation), so with gradients every group runs in double.
  const at::ScalarType acc = (want_s || want_t) ? at::kDouble : in.acc;
  const AngleSide ss(in.ps, acc, eps, stream), st(in.pt, acc, eps, stream);
  const at::Tensor coef = (wd * aw / n3).contiguous();
  at::Tensor partial = at::empty({B, cuda::rkd_angle_tiles(n)}, coef.options());
  auto mat = [&](bool want) { return want ? at::empty_like(ss.hi) : at::Tensor(); };
  at::Tensor As = mat(want_s), Rs = mat(want_s), Ss = mat(want_s);
  at::Tensor At = mat(want_t), Rt = mat(want_t), St = mat(want_t);
  auto ptr = [](at::Tensor& x) { return x.defined() ? x.data_ptr() : nullptr; };
  cuda::RkdAngleArgs a;
  a.acc = to_kernel_dtype(acc);
  a.hi_s = ss.hi.data_ptr(), a.lo_s = ss.lo.data_ptr(), a.hi_t = st.hi.data_ptr(), a.lo_t = st.lo.data_ptr();
  a.inv_s = ss.inv.data_ptr(), a.inv_t = st.inv.data_ptr();
  a.B = B, a.n = n, a.delta = delta;
  a.coef = coef.data_ptr<double>();
  a.loss_partial = partial.data_ptr<double>();
  a.a_s = ptr(As), a.a_t = ptr(At), a.r_s = ptr(Rs), a.r_t = ptr(Rt), a.s_s = ptr(Ss), a.s_t = ptr(St);
  KDFAST_CUDA_CHECK(cuda::rkd_angle(a, stream));
  Term r;
  r.loss = partial.sum(1) / n3 * aw;
  if (want_s) r.Ms = angle_grad(in.ps, ss, As, Rs, Ss);
  if (want_t) r.Mt = angle_grad(in.pt, st, At, Rt, St);
  return r;
}

// sum += x, where sum may be undefined (then it becomes x; x is a private buffer of one term).
void accumulate(at::Tensor& sum, const at::Tensor& x) {
  if (!x.defined()) return;
  if (sum.defined()) sum.add_(x);
  else sum = x;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rkd_cuda(const at::Tensor& s, const at::Tensor& t, double dw, double aw,
                                                        double delta, bool squared, double eps, const at::Tensor& w,
                                                        bool want_s, bool want_t) {
  check_same_cuda("rkd", {s, t, w});
  check_rkd_scalars(dw, aw, delta, eps);
  const DeviceGuard guard(s.device());
  if (dw == 0 && aw == 0) {
    check_relation_inputs(s, t, w, "rkd");
    return zero_relation_result(s, t, want_s, want_t);
  }
  RelationInputs in(s, t, w, "rkd", kCudaKernels);
  const cudaStream_t stream = stream_of(s);
  const at::Tensor wd = w.to(at::kDouble);
  at::Tensor loss = at::zeros({in.B}, wd.options());
  at::Tensor Ms, Mt;  // both terms add to one D2 gradient per side: one product back to points
  auto add = [&](const Term& r) {
    loss.add_(r.loss);
    accumulate(Ms, r.Ms);
    accumulate(Mt, r.Mt);
  };
  // a term of weight 0 is not computed
  if (dw != 0) add(distance_term(in, wd, dw, delta, squared, eps, want_s, want_t, stream));
  if (aw != 0) add(angle_term(in, wd, aw, delta, eps, want_s, want_t, stream));
  return {loss.to(in.acc), in.grad_points_s(drop_zero_weight(Ms, w)), in.grad_points_t(drop_zero_weight(Mt, w))};
}

at::Tensor pairwise_distances_cuda(const at::Tensor& x, bool squared, bool normalize, double eps) {
  check_same_cuda("pairwise_distances", {x});
  const DeviceGuard guard(x.device());
  check_pairwise_eps("pairwise_distances", eps);
  RelationPoints p(x, "pairwise_distances", "x", kCudaKernels);
  Dist d = pdist(p.d2, squared, p.eps_sq(eps).contiguous());
  return pairwise_output(d.dist, d.mean, p, squared, normalize).to(relation_acc(x.scalar_type()));
}

at::Tensor pairwise_distances_backward_cuda(const at::Tensor& grad, const at::Tensor& x, bool squared, bool normalize,
                                            double eps) {
  check_same_cuda("pairwise_distances_backward", {grad, x});
  const DeviceGuard guard(x.device());
  check_pairwise_eps("pairwise_distances_backward", eps);
  RelationPoints p(x, "pairwise_distances_backward", "x", kCudaKernels);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == p.B && grad.size(1) == p.N && grad.size(2) == p.N,
              "pairwise_distances_backward: grad must be (B, N, N)");
  const at::Tensor g = grad.to(at::kDouble).contiguous();
  const at::Tensor eps_sq = p.eps_sq(eps).contiguous();
  Dist d = pdist(p.d2, squared, eps_sq);
  return grad_points(pdist_backward(p.d2, d, squared, normalize, eps_sq, g), p,
                     pairwise_grad_factor(p, squared, normalize), x.scalar_type());
}

}  // namespace
}  // namespace kdfast

#if !defined(KDFAST_CUDA_EMULATE)
TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("rkd", &kdfast::rkd_cuda);
  m.impl("pairwise_distances", &kdfast::pairwise_distances_cuda);
  m.impl("pairwise_distances_backward", &kdfast::pairwise_distances_backward_cuda);
}
#endif
