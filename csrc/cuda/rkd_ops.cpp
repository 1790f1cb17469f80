// CUDA implementation of the relation ops, with the semantics of csrc/ops/rkd.cpp (the CPU ones):
// centring, Gram matrices, the products back to points and the per-group sums with ATen (all on
// the current stream, no host synchronisation), the n x n and n^3 work in csrc/cuda/rkd.cu. Groups
// are processed together, B x n x n at a time; memory is O(B n^2) beyond the inputs and gradients.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "cuda/kernels.h"
#include "ops/rkd_common.h"

namespace kdfast {
namespace {

kernel::DType acc_dt(at::ScalarType acc) { return acc == at::kDouble ? kernel::DType::Double : kernel::DType::Float; }

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

void check_same_cuda(const char* op, std::initializer_list<at::Tensor> ts) {
  const at::Tensor& first = *ts.begin();
  for (const at::Tensor& t : ts) {
    TORCH_CHECK(t.is_cuda() && t.device() == first.device(), op,
                ": every tensor must be on one CUDA device, got ", t.device(), " and ", first.device());
  }
}

// Distances of every group with the mean (double) and count of their positive entries.
struct Dist {
  at::Tensor dist, mean, count;
};

Dist pdist(const at::Tensor& gram, bool squared, double eps) {
  const int64_t B = gram.size(0), n = gram.size(1);
  Dist d;
  d.dist = at::empty_like(gram);
  C10_CUDA_CHECK(cuda::rkd_pdist(acc_dt(gram.scalar_type()), gram.data_ptr(), B, n, squared, eps,
                                 d.dist.data_ptr(), stream_of(gram)));
  const at::Tensor pos = d.dist > 0;
  d.count = pos.sum({1, 2}).to(at::kDouble);
  // 0 / 0 = NaN where a group has no positive distance, as the CPU op and torch's mean of nothing
  d.mean = at::where(pos, d.dist, 0.0).sum({1, 2}, false, at::kDouble) / d.count;
  return d;
}

// d/dG of sum_ab M_ab D2_ab with D2_ab = G_aa + G_bb - 2 G_ab.
at::Tensor sqdist_grad(const at::Tensor& M) {
  at::Tensor g = M * -2;
  g.diagonal(0, 1, 2).add_(M.sum(-1) + M.sum(-2));
  return g;
}

// d loss / d G from d loss / d output of the distances (psi when normalize).
at::Tensor pdist_backward(const at::Tensor& gram, const Dist& d, bool squared, bool normalize, double eps,
                          const at::Tensor& gout) {
  const int64_t B = gram.size(0), n = gram.size(1);
  const auto dopt = d.mean.options();
  at::Tensor inv_mean, k;
  if (normalize) {
    inv_mean = (1.0 / d.mean).contiguous();
    k = (at::sum(gout * d.dist, {1, 2}, false, at::kDouble) / (d.mean * d.mean * d.count)).contiguous();
  } else {
    inv_mean = at::ones({B}, dopt);
    k = at::zeros({B}, dopt);
  }
  at::Tensor M = at::empty_like(gram);
  C10_CUDA_CHECK(cuda::rkd_pdist_backward(acc_dt(gram.scalar_type()), gram.data_ptr(), d.dist.data_ptr(),
                                          gout.data_ptr(), inv_mean.data_ptr<double>(), k.data_ptr<double>(), B, n,
                                          squared, eps, M.data_ptr(), stream_of(gram)));
  return sqdist_grad(M);
}

// Groups of weight 0 get a zero Gram gradient (as on the CPU; their points' gradient is then 0
// unless the points themselves hold inf or NaN, which the product back to points carries).
at::Tensor drop_zero_weight(const at::Tensor& gG, const at::Tensor& w) {
  if (!gG.defined()) return gG;
  return at::where((w != 0).view({-1, 1, 1}), gG, 0.0);
}

// One term's share of the op: per-group losses (weighted) and Gram gradients (undefined if not asked).
struct Term {
  at::Tensor loss, gGs, gGt;
};

// wd: the group weights in double; dw: the term's weight.
Term distance_term(const RelationInputs& in, const at::Tensor& wd, double dw, double delta, bool squared,
                   double eps, bool want_s, bool want_t, cudaStream_t stream) {
  const int64_t B = in.B, n = in.N;
  const double nn = double(n) * double(n);
  Dist ds = pdist(in.gram_s, squared, eps), dt = pdist(in.gram_t, squared, eps);
  const at::Tensor coef = (wd * dw / nn).contiguous();
  const at::Tensor inv_ms = (1.0 / ds.mean).contiguous(), inv_mt = (1.0 / dt.mean).contiguous();
  const int nblk = cuda::rkd_distance_blocks(n);
  at::Tensor partial = at::empty({B, nblk}, coef.options());
  at::Tensor gps = want_s ? at::empty_like(in.gram_s) : at::Tensor();
  at::Tensor gpt = want_t ? at::empty_like(in.gram_t) : at::Tensor();
  C10_CUDA_CHECK(cuda::rkd_distance_huber(acc_dt(in.acc), ds.dist.data_ptr(), dt.dist.data_ptr(),
                                          inv_ms.data_ptr<double>(), inv_mt.data_ptr<double>(),
                                          coef.data_ptr<double>(), B, n, delta, partial.data_ptr<double>(),
                                          want_s ? gps.data_ptr() : nullptr, want_t ? gpt.data_ptr() : nullptr,
                                          stream));
  Term r;
  r.loss = partial.sum(1) / nn * dw;
  if (want_s) r.gGs = pdist_backward(in.gram_s, ds, squared, true, eps, gps);
  if (want_t) r.gGt = pdist_backward(in.gram_t, dt, squared, true, eps, gpt);
  return r;
}

// d loss / d G of the angle term from A, R and S (S is overwritten).
at::Tensor compose_angle_grad(const at::Tensor& gram, const at::Tensor& inv, const at::Tensor& A,
                              const at::Tensor& R, at::Tensor& S, double eps) {
  C10_CUDA_CHECK(cuda::rkd_angle_side_grad(acc_dt(gram.scalar_type()), gram.data_ptr(), inv.data_ptr(),
                                           gram.size(0), gram.size(1), eps, S.data_ptr(), stream_of(gram)));
  at::Tensor g = A - 2 * R + sqdist_grad(S);
  g.diagonal(0, 1, 2).add_(R.sum(-1));
  return g;
}

Term angle_term(const RelationInputs& in, const at::Tensor& wd, double aw, double delta, double eps, bool want_s,
                bool want_t, cudaStream_t stream) {
  const int64_t B = in.B, n = in.N;
  const double n3 = double(n) * double(n) * double(n);
  const kernel::DType acc = acc_dt(in.acc);
  at::Tensor inv_s = at::empty_like(in.gram_s), inv_t = at::empty_like(in.gram_t);
  C10_CUDA_CHECK(cuda::rkd_inv_sides(acc, in.gram_s.data_ptr(), B, n, eps, inv_s.data_ptr(), stream));
  C10_CUDA_CHECK(cuda::rkd_inv_sides(acc, in.gram_t.data_ptr(), B, n, eps, inv_t.data_ptr(), stream));
  const at::Tensor coef = (wd * aw / n3).contiguous();
  at::Tensor partial = at::empty({B, cuda::rkd_angle_tiles(n)}, coef.options());
  auto mat = [&](bool want) { return want ? at::empty_like(in.gram_s) : at::Tensor(); };
  at::Tensor As = mat(want_s), Rs = mat(want_s), Ss = mat(want_s);
  at::Tensor At = mat(want_t), Rt = mat(want_t), St = mat(want_t);
  auto ptr = [](at::Tensor& x) { return x.defined() ? x.data_ptr() : nullptr; };
  cuda::RkdAngleArgs a;
  a.acc = acc;
  a.gram_s = in.gram_s.data_ptr(), a.gram_t = in.gram_t.data_ptr();
  a.inv_s = inv_s.data_ptr(), a.inv_t = inv_t.data_ptr();
  a.B = B, a.n = n, a.delta = delta;
  a.coef = coef.data_ptr<double>();
  a.loss_partial = partial.data_ptr<double>();
  a.a_s = ptr(As), a.a_t = ptr(At), a.r_s = ptr(Rs), a.r_t = ptr(Rt), a.s_s = ptr(Ss), a.s_t = ptr(St);
  C10_CUDA_CHECK(cuda::rkd_angle(a, stream));
  Term r;
  r.loss = partial.sum(1) / n3 * aw;
  if (want_s) r.gGs = compose_angle_grad(in.gram_s, inv_s, As, Rs, Ss, eps);
  if (want_t) r.gGt = compose_angle_grad(in.gram_t, inv_t, At, Rt, St, eps);
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
  TORCH_CHECK(std::isfinite(dw) && std::isfinite(aw), "rkd: the term weights must be finite");
  const c10::cuda::CUDAGuard guard(s.device());
  if (dw == 0 && aw == 0) {
    check_relation_inputs(s, t, w, "rkd");
    return zero_relation_result(s, t, want_s, want_t);
  }
  RelationInputs in(s, t, w, "rkd");
  const cudaStream_t stream = stream_of(s);
  const at::Tensor wd = w.to(at::kDouble);
  at::Tensor loss = at::zeros({in.B}, wd.options());
  at::Tensor gGs, gGt;  // both terms add to one Gram gradient per side: one product back to points
  auto add = [&](const Term& r) {
    loss.add_(r.loss);
    accumulate(gGs, r.gGs);
    accumulate(gGt, r.gGt);
  };
  // a term of weight 0 is not computed
  if (dw != 0) add(distance_term(in, wd, dw, delta, squared, eps, want_s, want_t, stream));
  if (aw != 0) add(angle_term(in, wd, aw, delta, eps, want_s, want_t, stream));
  return {loss.to(in.acc), in.grad_points_s(drop_zero_weight(gGs, w)), in.grad_points_t(drop_zero_weight(gGt, w))};
}

at::Tensor pairwise_distances_cuda(const at::Tensor& x, bool squared, bool normalize, double eps) {
  check_same_cuda("pairwise_distances", {x});
  const c10::cuda::CUDAGuard guard(x.device());
  PointsGram in(x, "pairwise_distances");
  Dist d = pdist(in.gram, squared, eps);
  if (!normalize) return d.dist;
  return d.dist / d.mean.to(d.dist.scalar_type()).view({-1, 1, 1});
}

at::Tensor pairwise_distances_backward_cuda(const at::Tensor& grad, const at::Tensor& x, bool squared, bool normalize,
                                            double eps) {
  check_same_cuda("pairwise_distances_backward", {grad, x});
  const c10::cuda::CUDAGuard guard(x.device());
  PointsGram in(x, "pairwise_distances_backward");
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == in.B && grad.size(1) == in.N && grad.size(2) == in.N,
              "pairwise_distances_backward: grad must be (B, N, N)");
  const at::Tensor g = grad.to(in.gram.scalar_type()).contiguous();
  Dist d = pdist(in.gram, squared, eps);
  return grad_points(pdist_backward(in.gram, d, squared, normalize, eps, g), in.centred, x.scalar_type());
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("rkd", &kdfast::rkd_cuda);
  m.impl("pairwise_distances", &kdfast::pairwise_distances_cuda);
  m.impl("pairwise_distances_backward", &kdfast::pairwise_distances_backward_cuda);
}
