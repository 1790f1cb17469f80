// CPU implementation of the relation ops rkd and pairwise_distances (schemas: csrc/ops/rkd.cpp,
// csrc/ops/pairwise_distances.cpp): scaling and centring (ops/rkd.h), the squared distances, n x n
// and n^3 work in the kernels of cpu/rkd.cpp, the product back to points with ATen's matrix
// multiply. Memory is O(B n^2) beyond the inputs and their gradients.
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/alloc.h"
#include "common/rkd.h"
#include "cpu/kernels.h"
#include "ops/kernel_dtype.h"
#include "ops/rkd.h"

namespace kdfast {
namespace {

// D2 of every group from its (scaled) points, with the CPU kernel.
void sq_dists_cpu(const at::Tensor& points, at::Tensor& d2) {
  const int64_t B = points.size(0), n = points.size(1), dim = points.size(2);
  for (int64_t b = 0; b < B; ++b)
    cpu::selected_kernels().sq_dists({points.data_ptr<double>() + b * n * dim, n, dim, d2.data_ptr<double>() + b * n * n});
}

at::Tensor wide_span_cpu(const at::Tensor& d2) {
  const int64_t B = d2.size(0), nn = d2.size(1) * d2.size(2);
  at::Tensor wide = at::empty({B}, d2.options().dtype(at::kBool));
  const double* D2 = d2.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    rkd::D2Span span;
    for (int64_t e = b * nn; e < (b + 1) * nn; ++e) span.add(D2[e]);
    wide.data_ptr<bool>()[b] = span.wide();
  }
  return wide;
}

void grad_wide_cpu(const at::Tensor& W, const at::Tensor& points, const at::Tensor& wide, at::Tensor& g) {
  const int64_t n = g.size(1), dim = g.size(2);
  for (int64_t b = 0; b < g.size(0); ++b) {
    if (!wide.data_ptr<bool>()[b]) continue;
    TORCH_INTERNAL_ASSERT(W.is_contiguous() && points.is_contiguous() && g.is_contiguous());
    const double* w = W.data_ptr<double>() + b * n * n;
    const double* X = points.data_ptr<double>() + b * n * dim;
    double* G = g.data_ptr<double>() + b * n * dim;
    at::parallel_for(0, n, 1, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        std::fill(G + m * dim, G + (m + 1) * dim, 0.0);
        for (int64_t j = 0; j < n; ++j) {
          const double wmj = w[m * n + j];
          if (j == m || wmj == 0) continue;
          for (int64_t k = 0; k < dim; ++k) G[m * dim + k] += wmj * (X[m * dim + k] - X[j * dim + k]);
        }
      }
    });
  }
}

const RelationKernels kCpuKernels{sq_dists_cpu, wide_span_cpu, grad_wide_cpu, /*host=*/true};

// Distances of one group (n x n, double): returns (dist, mean of the positive entries, count).
struct GroupDist {
  at::Tensor dist;
  double mean;
  int64_t count;
};

GroupDist group_dist(const at::Tensor& d2, bool squared, double eps) {
  const int64_t n = d2.size(0);
  GroupDist r{at::empty({n, n}, d2.options()), 0, 0};
  cpu::PdistArgs a{d2.data_ptr<double>(), n, squared, eps, r.dist.data_ptr<double>(), 0, 0};
  cpu::selected_kernels().pdist(a);
  r.count = a.pos_count;
  r.mean = a.pos_sum / static_cast<double>(a.pos_count);  // 0/0 = NaN, as torch's mean of nothing
  return r;
}

// Adds d loss / d D2 to grad_d2, from grad_out = d loss / d dist (or d psi when normalize).
void group_dist_backward(const at::Tensor& d2, const GroupDist& d, bool squared, bool normalize, double eps,
                         const at::Tensor& grad_out, const at::Tensor& grad_d2) {
  cpu::PdistBackwardArgs a{d2.data_ptr<double>(), d.dist.data_ptr<double>(), d2.size(0), squared, normalize, eps,
                           d.mean, d.count, grad_out.data_ptr<double>(), grad_d2.data_ptr<double>()};
  cpu::selected_kernels().pdist_backward(a);
}

double at_b(const at::Tensor& v, int64_t b) { return v.data_ptr<double>()[b]; }

// Adds group b's distance term (weighted by dw) to loss and to the D2 gradients Ms / Mt.
void distance_term(const RelationInputs& in, int64_t b, double wb, double dw, double delta, bool squared,
                   double eps, double& loss, const at::Tensor& Ms, const at::Tensor& Mt) {
  const int64_t n = in.N;
  const double nn = double(n) * double(n);
  const bool want_s = Ms.defined() && wb != 0, want_t = Mt.defined() && wb != 0;  // weight 0: no gradient
  const double eps_s = eps * at_b(in.ps.scale, b) * at_b(in.ps.scale, b);
  const double eps_t = eps * at_b(in.pt.scale, b) * at_b(in.pt.scale, b);
  GroupDist ds = group_dist(in.ps.d2[b], squared, eps_s), dt = group_dist(in.pt.d2[b], squared, eps_t);
  const auto opts = in.ps.d2.options();
  at::Tensor gps = want_s ? at::empty({n, n}, opts) : at::Tensor();
  at::Tensor gpt = want_t ? at::empty({n, n}, opts) : at::Tensor();
  cpu::DistanceHuberArgs a{ds.dist.data_ptr<double>(), dt.dist.data_ptr<double>(), n, 1.0 / ds.mean, 1.0 / dt.mean,
                           delta, wb * dw / nn, 0, want_s ? gps.data_ptr<double>() : nullptr,
                           want_t ? gpt.data_ptr<double>() : nullptr};
  cpu::selected_kernels().distance_huber(a);
  loss += dw * (a.loss / nn);
  if (want_s) group_dist_backward(in.ps.d2[b], ds, squared, true, eps_s, gps, Ms[b]);
  if (want_t) group_dist_backward(in.pt.d2[b], dt, squared, true, eps_t, gpt, Mt[b]);
}

// Adds group b's angle term (weighted by aw) to loss and to the D2 gradients Ms / Mt.
void angle_term(const RelationInputs& in, int64_t b, double wb, double aw, double delta, double eps, double& loss,
                const at::Tensor& Ms, const at::Tensor& Mt) {
  const int64_t n = in.N;
  const double n3 = double(n) * double(n) * double(n);
  const bool grads = wb != 0;
  cpu::AngleArgs a{to_kernel_dtype(in.acc), in.ps.d2[b].data_ptr<double>(), in.pt.d2[b].data_ptr<double>(), n,
                   eps * at_b(in.ps.scale, b), eps * at_b(in.pt.scale, b), delta, wb * aw / n3, 0,
                   (Ms.defined() && grads) ? Ms[b].data_ptr<double>() : nullptr,
                   (Mt.defined() && grads) ? Mt[b].data_ptr<double>() : nullptr};
  a.dim_s = in.ps.centred.size(2), a.dim_t = in.pt.centred.size(2);
  if (in.ps.wide().data_ptr<bool>()[b]) a.x_s = in.ps.scaled[b].data_ptr<double>();
  if (in.pt.wide().data_ptr<bool>()[b]) a.x_t = in.pt.scaled[b].data_ptr<double>();
  cpu::selected_kernels().angle(a);
  loss += aw * (a.loss / n3);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rkd_cpu(const at::Tensor& s, const at::Tensor& t, double dw, double aw,
                                                       double delta, bool squared, double eps, const at::Tensor& w,
                                                       bool want_s, bool want_t) {
  check_rkd_scalars(dw, aw, delta, eps);
  if (dw == 0 && aw == 0) {
    check_relation_inputs(s, t, w, "rkd");
    return zero_relation_result(s, t, want_s, want_t);
  }
  RelationInputs in(s, t, w, "rkd", kCpuKernels);
  const int64_t B = in.B, n = in.N;
  // Both terms add to one D2 gradient per side: one product back to points for the two.
  const auto opts = in.ps.d2.options();
  at::Tensor Ms = want_s ? at::zeros({B, n, n}, opts) : at::Tensor();
  at::Tensor Mt = want_t ? at::zeros({B, n, n}, opts) : at::Tensor();
  const std::vector<double> wa = in.weights();
  std::vector<double> loss(B, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    if (dw != 0) distance_term(in, b, wa[b], dw, delta, squared, eps, loss[b], Ms, Mt);
    if (aw != 0) angle_term(in, b, wa[b], aw, delta, eps, loss[b], Ms, Mt);
  }
  at::Tensor out = at::tensor(loss, at::TensorOptions().dtype(at::kDouble)).to(in.acc);
  return {out, in.grad_points_s(Ms), in.grad_points_t(Mt)};
}

at::Tensor pairwise_distances_cpu(const at::Tensor& x, bool squared, bool normalize, double eps) {
  check_pairwise_eps("pairwise_distances", eps);
  RelationPoints p(x, "pairwise_distances", "x", kCpuKernels);
  at::Tensor dist = at::empty_like(p.d2), mean = at::empty({p.B}, p.d2.options());
  for (int64_t b = 0; b < p.B; ++b) {
    const double sc = at_b(p.scale, b);
    GroupDist d = group_dist(p.d2[b], squared, eps * sc * sc);
    dist[b].copy_(d.dist);
    mean.data_ptr<double>()[b] = d.mean;
  }
  return pairwise_output(dist, mean, p, squared, normalize).to(relation_acc(x.scalar_type()));
}

at::Tensor pairwise_distances_backward_cpu(const at::Tensor& grad, const at::Tensor& x, bool squared,
                                           bool normalize, double eps) {
  check_pairwise_eps("pairwise_distances_backward", eps);
  RelationPoints p(x, "pairwise_distances_backward", "x", kCpuKernels);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == p.B && grad.size(1) == p.N && grad.size(2) == p.N,
              "pairwise_distances_backward: grad must be (B, N, N)");
  at::Tensor g = grad.to(at::kDouble).contiguous();
  at::Tensor M = at::zeros_like(p.d2);
  for (int64_t b = 0; b < p.B; ++b) {
    const double sc = at_b(p.scale, b);
    GroupDist d = group_dist(p.d2[b], squared, eps * sc * sc);
    group_dist_backward(p.d2[b], d, squared, normalize, eps * sc * sc, g[b], M[b]);
  }
  return grad_points(M, p, pairwise_grad_factor(p, squared, normalize), x.scalar_type());
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("rkd", &kdfast::rkd_cpu);
  m.impl("pairwise_distances", &kdfast::pairwise_distances_cpu);
  m.impl("pairwise_distances_backward", &kdfast::pairwise_distances_backward_cpu);
}
