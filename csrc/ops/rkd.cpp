// CPU implementation of the relation ops: centring, Gram matrices and the final products with
// ATen's matrix multiply; the n x n and n^3 work in the kernels of cpu/rkd.cpp. Memory is
// O(B n^2) beyond the inputs and their gradients. User-facing validation is in kdfast/functional.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/alloc.h"
#include "cpu/kernels.h"
#include "ops/rkd_common.h"

namespace kdfast {
namespace {

cpu::DType acc_kernel_dtype(at::ScalarType acc) {
  return acc == at::kDouble ? cpu::DType::Double : cpu::DType::Float;
}

// Distances of one group (n x n, acc type): returns (dist, mean of the positive entries, count).
struct GroupDist {
  at::Tensor dist;
  double mean;
  int64_t count;
};

GroupDist group_dist(const at::Tensor& G, bool squared, double eps) {
  const int64_t n = G.size(0);
  GroupDist r{at::empty({n, n}, G.options()), 0, 0};
  cpu::PdistArgs a{acc_kernel_dtype(G.scalar_type()), G.data_ptr(), n, squared, eps, r.dist.data_ptr(), 0, 0};
  cpu::selected_kernels().pdist(a);
  r.count = a.pos_count;
  r.mean = a.pos_sum / static_cast<double>(a.pos_count);  // 0/0 = NaN, as torch's mean of nothing
  return r;
}

void group_dist_backward(const at::Tensor& G, const GroupDist& d, bool squared, bool normalize, double eps,
                         const at::Tensor& grad_out, at::Tensor grad_gram) {
  cpu::PdistBackwardArgs a{acc_kernel_dtype(G.scalar_type()), G.data_ptr(), d.dist.data_ptr(), G.size(0),
                           squared, normalize, eps, d.mean, d.count, grad_out.data_ptr(),
                           grad_gram.data_ptr()};
  cpu::selected_kernels().pdist_backward(a);
}

// Adds group b's distance term (weighted by dw) to loss and to the Gram gradients gGs / gGt.
void distance_term(const RelationInputs& in, int64_t b, double wb, double dw, double delta, bool squared,
                   double eps, double& loss, const at::Tensor& gGs, const at::Tensor& gGt) {
  const int64_t n = in.N;
  const double nn = double(n) * double(n);
  const bool want_s = gGs.defined() && wb != 0, want_t = gGt.defined() && wb != 0;  // weight 0: no gradient
  GroupDist ds = group_dist(in.gram_s[b], squared, eps), dt = group_dist(in.gram_t[b], squared, eps);
  at::Tensor gps = want_s ? at::empty({n, n}, in.opts()) : at::Tensor();
  at::Tensor gpt = want_t ? at::empty({n, n}, in.opts()) : at::Tensor();
  cpu::DistanceHuberArgs a{acc_kernel_dtype(in.acc), ds.dist.data_ptr(), dt.dist.data_ptr(), n,
                           1.0 / ds.mean, 1.0 / dt.mean, delta, wb * dw / nn, 0,
                           want_s ? gps.data_ptr() : nullptr, want_t ? gpt.data_ptr() : nullptr};
  cpu::selected_kernels().distance_huber(a);
  loss += dw * (a.loss / nn);
  if (want_s) group_dist_backward(in.gram_s[b], ds, squared, true, eps, gps, gGs[b]);
  if (want_t) group_dist_backward(in.gram_t[b], dt, squared, true, eps, gpt, gGt[b]);
}

// Adds group b's angle term (weighted by aw) to loss and to the Gram gradients gGs / gGt.
void angle_term(const RelationInputs& in, int64_t b, double wb, double aw, double delta, double eps, double& loss,
                const at::Tensor& gGs, const at::Tensor& gGt) {
  const int64_t n = in.N;
  const double n3 = double(n) * double(n) * double(n);
  const bool grads = wb != 0;
  cpu::AngleArgs a{acc_kernel_dtype(in.acc), in.gram_s[b].data_ptr(), in.gram_t[b].data_ptr(), n, eps, delta,
                   wb * aw / n3, 0, (gGs.defined() && grads) ? gGs[b].data_ptr() : nullptr,
                   (gGt.defined() && grads) ? gGt[b].data_ptr() : nullptr};
  cpu::selected_kernels().angle(a);
  loss += aw * (a.loss / n3);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rkd_cpu(const at::Tensor& s, const at::Tensor& t, double dw, double aw,
                                                       double delta, bool squared, double eps, const at::Tensor& w,
                                                       bool want_s, bool want_t) {
  TORCH_CHECK(std::isfinite(dw) && std::isfinite(aw), "rkd: the term weights must be finite");
  if (dw == 0 && aw == 0) {
    check_relation_inputs(s, t, w, "rkd");
    return zero_relation_result(s, t, want_s, want_t);
  }
  RelationInputs in(s, t, w, "rkd");
  const int64_t B = in.B, n = in.N;
  // Both terms add to one Gram gradient per side: one product back to points for the two.
  at::Tensor gGs = want_s ? at::zeros({B, n, n}, in.opts()) : at::Tensor();
  at::Tensor gGt = want_t ? at::zeros({B, n, n}, in.opts()) : at::Tensor();
  const std::vector<double> wa = in.weights();
  std::vector<double> loss(B, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    if (dw != 0) distance_term(in, b, wa[b], dw, delta, squared, eps, loss[b], gGs, gGt);
    if (aw != 0) angle_term(in, b, wa[b], aw, delta, eps, loss[b], gGs, gGt);
  }
  at::Tensor out = at::tensor(loss, at::TensorOptions().dtype(at::kDouble)).to(in.acc);
  return {out, in.grad_points_s(gGs), in.grad_points_t(gGt)};
}

at::Tensor pairwise_distances_cpu(const at::Tensor& x, bool squared, bool normalize, double eps) {
  PointsGram in(x, "pairwise_distances");
  at::Tensor out = at::empty({in.B, in.N, in.N}, in.gram.options());
  for (int64_t b = 0; b < in.B; ++b) {
    GroupDist d = group_dist(in.gram[b], squared, eps);
    out[b].copy_(normalize ? d.dist / d.mean : d.dist);
  }
  return out;
}

at::Tensor pairwise_distances_backward_cpu(const at::Tensor& grad, const at::Tensor& x, bool squared,
                                           bool normalize, double eps) {
  PointsGram in(x, "pairwise_distances_backward");
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == in.B && grad.size(1) == in.N && grad.size(2) == in.N,
              "pairwise_distances_backward: grad must be (B, N, N)");
  at::Tensor g = grad.to(in.gram.scalar_type()).contiguous();
  at::Tensor gG = at::zeros_like(in.gram);
  for (int64_t b = 0; b < in.B; ++b) {
    GroupDist d = group_dist(in.gram[b], squared, eps);
    group_dist_backward(in.gram[b], d, squared, normalize, eps, g[b], gG[b]);
  }
  return grad_points(gG, in.centred, x.scalar_type());
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("rkd", &kdfast::rkd_cpu);
  m.impl("pairwise_distances", &kdfast::pairwise_distances_cpu);
  m.impl("pairwise_distances_backward", &kdfast::pairwise_distances_backward_cpu);
}
