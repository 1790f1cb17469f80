#pragma once
// The relation ops, rkd and pairwise_distances (schemas and scalar-argument checks in
// csrc/ops/rkd.cpp and csrc/ops/pairwise_distances.cpp): the checks and the device-independent
// parts (scaling and centring the points, the product of d loss / d D2 back to the points) that
// their CPU and CUDA implementations (csrc/{cpu,cuda}/rkd_ops.cpp) share. The math:
// csrc/common/rkd.h.
#include <ATen/ATen.h>

#include <ATen/Parallel.h>

#include "common/tuning.h"
#include "ops/kernel_dtype.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

namespace kdfast {

// Runs f without intra-op parallelism when the work is small. ATen ops called inside an
// at::parallel_for body run on the calling thread; for the few small matrix ops around the kernels,
// a parallel region's start and barrier cost more than the work, and far more on a busy machine.
template <typename F>
auto serial_if_small(int64_t elements, F f) {
  using R = decltype(f());
  if (elements > tuning::kRelationSerialBelow) return f();
  R out;
  at::parallel_for(0, 1, 2, [&](int64_t, int64_t) { out = f(); });
  return out;
}

inline at::ScalarType relation_acc(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The scalar arguments: rkd's term weights (finite, >= 0), delta (finite, > 0) and eps (finite,
// >= 0); pairwise_distances' eps. Defined with the schemas.
void check_rkd_scalars(double distance_weight, double angle_weight, double delta, double eps);
void check_pairwise_eps(const char* op, double eps);

// The argument checks of one side's points (B, N, D), `arg` naming them.
inline void check_points(const at::Tensor& x, const char* op, const char* arg) {
  TORCH_CHECK(x.dim() == 3, op, ": ", arg, " must be (B, N, D) points, got ", x.dim(), " dims");
  TORCH_CHECK(x.size(1) >= 2, op, ": ", arg, " needs at least 2 points");
  TORCH_CHECK(x.size(2) >= 1, op, ": ", arg, " points need at least one coordinate (D >= 1)");
  check_kernel_dtype(op, arg, x.scalar_type());
}

// 2^-e per group (B, 1, 1) with e the exponent of the group's largest |x| (so that it scales into
// [0.5, 1)); 1 for a group of zeros, or one holding inf or NaN (which then reach the loss).
inline at::Tensor pow2_scale(const at::Tensor& x) {
  const auto [lo, hi] = at::aminmax(x.flatten(1), 1);  // one pass, no |x| temporary
  const at::Tensor m = at::maximum(hi, -lo).view({-1, 1, 1});
  const at::Tensor e = std::get<1>(at::frexp(m));
  const at::Tensor ok = at::isfinite(m) & (m > 0);
  return at::where(ok, at::ldexp(at::ones_like(m), -e), at::ones_like(m));
}

// The device parts of the relation ops that the shared code below calls.
struct RelationKernels {
  // D2 (B, N, N) of the points (B, N, D), both double
  void (*sq_dists)(const at::Tensor& points, at::Tensor& d2);
  // (B,) bool: the groups whose squared sides span more than rkd::kLowPartsSpan (rkd::D2Span)
  at::Tensor (*wide_span)(const at::Tensor& d2);
  // g_m = sum_n W_mn (x_m - x_n) from the differences of the points (B, N, D) as given, in place
  // of g (B, N, D) in the wide groups: there W holds terms of size 1 / near^2 that cancel, and the
  // Gram form's rounding, eps_64 |W| |x| with |x| ~ far, would be eps_64 x ratio^2 of one point's share
  void (*grad_wide)(const at::Tensor& W, const at::Tensor& points, const at::Tensor& wide, at::Tensor& g);
  // wide_span's answer is in host memory (CPU): RelationPoints then asks it at once and keeps the
  // uncentred points only when some group needs them (a device answer would cost a host sync)
  bool host;
};

// One side's points for the relation kernels, in double: each group scaled by a power of 2 (exact),
// so that any finite input has finite squared distances; its squared distances (exact, from the
// differences), taken before centring, because the differences of the points as given are exact
// (fp32 and narrower in double; nearby fp64 values by Sterbenz) where centred coordinates carry a
// rounding of the largest |x| that moves close points by eps |x| (and a NaN would reach every
// point through the mean); and the points centred for grad_points' matrix product.
struct RelationPoints {
  // (B, N, D) double, twice (scaled undefined where kept by no group); (B,) double; (B, N, N) double
  at::Tensor scaled, centred, scale, d2;
  int64_t B, N;
  const RelationKernels* kernels;
  RelationPoints(const at::Tensor& x, const char* op, const char* arg, const RelationKernels& k) : kernels(&k) {
    check_points(x, op, arg);
    B = x.size(0), N = x.size(1);
    // Autocast must not lower these products.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    std::tie(scaled, scale) = serial_if_small(x.numel(), [&] {
      // in place on one double copy: fewer passes and allocations
      at::Tensor xd = x.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
      const at::Tensor s = pow2_scale(xd);  // largest |x| in [0.5, 1): |x_i - x_j|^2 <= 4 D
      xd.mul_(s);
      return std::make_tuple(xd, s.view({-1}));
    });
    d2 = at::empty({B, N, N}, scaled.options());
    k.sq_dists(scaled, d2);
    const bool keep = !k.host || wide().any().item<bool>();
    centred = serial_if_small(x.numel(), [&] {
      const at::Tensor mean = scaled.mean({1}, true);
      return keep ? scaled - mean : scaled.sub_(mean);
    });
    if (!keep) scaled = at::Tensor();  // (centred in place: no group reads them)
  }
  // The groups that take D2's low parts and the product from differences (usually none), found
  // when first asked (on CUDA pairwise_distances' forward never asks; the CPU asks at once).
  const at::Tensor& wide() const {
    if (!wide_.defined()) wide_ = kernels->wide_span(d2);
    return wide_;
  }
  // The per-group eps of the kernels: the side-length clamp scales with the points, the clamp of
  // the squared distance with their square.
  at::Tensor eps_side(double eps) const { return scale * eps; }
  at::Tensor eps_sq(double eps) const { return scale * scale * eps; }

 private:
  mutable at::Tensor wide_;
};

// dL/dX (dtype) from M = dL/dD2 (B, N, N, double, not symmetrised) of the points that
// RelationPoints made, times factor (B,) per group:
//   dL/dx_m = 2 sum_n (M_mn + M_nm) (x_m - x_n),
// in double, where the matrix product's cancellation (eps |x| against a sum of differences) is
// far below float rounding, except in the wide-span groups, which take the differences.
inline at::Tensor grad_points(const at::Tensor& M, const RelationPoints& p, const at::Tensor& factor,
                              at::ScalarType dtype) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return serial_if_small(M.numel() + p.centred.numel(), [&] {
    at::Tensor W = M + M.transpose(1, 2);
    W.diagonal(0, 1, 2).zero_();
    W.mul_((factor * 2).view({-1, 1, 1}));
    at::Tensor g = at::baddbmm(W.sum(-1, true) * p.centred, W, p.centred, 1, -1);
    p.kernels->grad_wide(W, p.scaled, p.wide(), g);
    return g.to(dtype);
  });
}

// The argument checks of the relation ops (student, teacher: (B, N, D); group_weight: (B,)).
inline void check_relation_inputs(const at::Tensor& s, const at::Tensor& t, const at::Tensor& weight, const char* op) {
  check_points(s, op, "student");
  check_points(t, op, "teacher");
  TORCH_CHECK(s.size(0) == t.size(0) && s.size(1) == t.size(1), op,
              ": student and teacher must have the same B and N");
  TORCH_CHECK(s.scalar_type() == t.scalar_type(), op, ": student and teacher dtypes differ");
  const auto acc = relation_acc(s.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == s.size(0) && weight.scalar_type() == acc, op,
              ": group_weight must be a ", acc, " vector of length B");
}

// The result when every term has weight 0: zero losses and gradients, nothing computed (so no
// inf or NaN in the points can reach them, as the reference leaves such terms out). The gradients
// are contiguous whatever the inputs' strides, as every gradient the op returns.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> zero_relation_result(const at::Tensor& s, const at::Tensor& t,
                                                                           bool want_s, bool want_t) {
  return {at::zeros({s.size(0)}, s.options().dtype(relation_acc(s.scalar_type()))),
          want_s ? at::zeros(s.sizes(), s.options()) : at::empty({0}, s.options()),
          want_t ? at::zeros(t.sizes(), t.options()) : at::empty({0}, t.options())};
}

// Both sides of a relation op, checked before anything is computed.
struct RelationInputs {
  RelationPoints ps, pt;
  at::Tensor w;
  at::ScalarType acc, dtype_s, dtype_t;
  int64_t B, N;
  RelationInputs(const at::Tensor& s, const at::Tensor& t, const at::Tensor& weight, const char* op,
                 const RelationKernels& k)
      : ps((check_relation_inputs(s, t, weight, op), s), op, "student", k), pt(t, op, "teacher", k) {
    acc = relation_acc(s.scalar_type());
    w = weight;
    dtype_s = s.scalar_type(), dtype_t = t.scalar_type();
    B = s.size(0), N = s.size(1);
  }
  std::vector<double> weights() const {
    at::Tensor c = w.to(at::kDouble).cpu().contiguous();
    return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
  }
  // The loss does not change with the scale: dL/dx = scale dL/d(scaled x).
  at::Tensor grad_points_s(const at::Tensor& M) const {
    return M.defined() ? grad_points(M, ps, ps.scale, dtype_s) : at::empty({0}, ps.centred.options().dtype(dtype_s));
  }
  at::Tensor grad_points_t(const at::Tensor& M) const {
    return M.defined() ? grad_points(M, pt, pt.scale, dtype_t) : at::empty({0}, pt.centred.options().dtype(dtype_t));
  }
};

// pairwise_distances' output from the distances of the scaled points (B, N, N, double) and the
// mean of their positive entries (B): psi when normalize (scale-free), else the distances in the
// points' own units.
inline at::Tensor pairwise_output(const at::Tensor& dist, const at::Tensor& mean, const RelationPoints& p,
                                  bool squared, bool normalize) {
  const at::Tensor div = normalize ? mean : (squared ? p.scale * p.scale : p.scale);
  return dist / div.view({-1, 1, 1});
}

// The factor that takes pairwise_distances' gradient with respect to the scaled points (computed
// from the upstream gradient as it is) to the points: see pairwise_output.
inline at::Tensor pairwise_grad_factor(const RelationPoints& p, bool squared, bool normalize) {
  if (normalize) return p.scale;
  return squared ? 1.0 / p.scale : at::ones_like(p.scale);
}

}  // namespace kdfast
