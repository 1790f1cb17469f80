#pragma once
// Device-independent parts of the relation ops (centring, Gram matrices, the products back to
// points), shared by the CPU and CUDA implementations.
#include <ATen/ATen.h>

#include <ATen/Parallel.h>

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
  if (elements > (int64_t(1) << 20)) return f();
  R out;
  at::parallel_for(0, 1, 2, [&](int64_t, int64_t) { out = f(); });
  return out;
}

inline at::ScalarType relation_acc(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Points (B, N, D) centred per group in the accumulation type, and their symmetric Gram matrices.
struct PointsGram {
  at::Tensor centred, gram;
  int64_t B, N;
  PointsGram(const at::Tensor& x, const char* op) {
    TORCH_CHECK(x.dim() == 3, op, ": points must be (B, N, D)");
    TORCH_CHECK(x.size(1) >= 2, op, ": needs at least 2 points");
    B = x.size(0), N = x.size(1);
    // Autocast must not lower these products: the kernels read G in the accumulation type.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    std::tie(centred, gram) = serial_if_small(x.numel() + B * N * N, [&] {
      at::Tensor xa = x.to(relation_acc(x.scalar_type()));
      at::Tensor xc = xa - xa.mean({1}, true);
      at::Tensor g = at::bmm(xc, xc.transpose(1, 2));
      // exactly symmetric: the kernels rely on it
      const auto acc = relation_acc(x.scalar_type());
      return std::make_tuple(xc.to(acc), ((g + g.transpose(1, 2)) * 0.5).to(acc).contiguous());
    });
  }
};

// dL/dX from dL/dG (B, N, N) for G = Xc Xc^T with Xc = X - mean(X).
inline at::Tensor grad_points(const at::Tensor& gG, const at::Tensor& centred, at::ScalarType dtype) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return serial_if_small(gG.numel() + centred.numel(), [&] {
    at::Tensor g = at::bmm(gG + gG.transpose(1, 2), centred);
    return (g - g.mean({1}, true)).to(dtype);
  });
}

// The argument checks of the relation ops (student, teacher: (B, N, D); group_weight: (B,)).
inline void check_relation_inputs(const at::Tensor& s, const at::Tensor& t, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(s.dim() == 3 && t.dim() == 3, op, ": points must be (B, N, D)");
  TORCH_CHECK(s.size(1) >= 2, op, ": needs at least 2 points");
  TORCH_CHECK(s.size(0) == t.size(0) && s.size(1) == t.size(1), op,
              ": student and teacher must have the same B and N");
  TORCH_CHECK(s.scalar_type() == t.scalar_type(), op, ": student and teacher dtypes differ");
  const auto acc = relation_acc(s.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == s.size(0) && weight.scalar_type() == acc, op,
              ": group_weight must be a ", acc, " vector of length B");
}

// The result when every term has weight 0: zero losses and gradients, nothing computed (so no
// inf or NaN in the points can reach them, as the reference leaves such terms out).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> zero_relation_result(const at::Tensor& s, const at::Tensor& t,
                                                                           bool want_s, bool want_t) {
  return {at::zeros({s.size(0)}, s.options().dtype(relation_acc(s.scalar_type()))),
          want_s ? at::zeros_like(s) : at::empty({0}, s.options()),
          want_t ? at::zeros_like(t) : at::empty({0}, t.options())};
}

struct RelationInputs {
  PointsGram ps, pt;
  at::Tensor gram_s, gram_t, w;
  at::ScalarType acc, dtype_s, dtype_t;
  int64_t B, N;
  RelationInputs(const at::Tensor& s, const at::Tensor& t, const at::Tensor& weight, const char* op)
      : ps(s, op), pt(t, op) {
    check_relation_inputs(s, t, weight, op);
    acc = relation_acc(s.scalar_type());
    gram_s = ps.gram, gram_t = pt.gram, w = weight;
    dtype_s = s.scalar_type(), dtype_t = t.scalar_type();
    B = s.size(0), N = s.size(1);
  }
  at::TensorOptions opts() const { return gram_s.options(); }
  std::vector<double> weights() const {
    at::Tensor c = w.to(at::kDouble).cpu().contiguous();
    return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
  }
  at::Tensor grad_points_s(const at::Tensor& gG) const {
    return gG.defined() ? grad_points(gG, ps.centred, dtype_s) : at::empty({0}, ps.centred.options().dtype(dtype_s));
  }
  at::Tensor grad_points_t(const at::Tensor& gG) const {
    return gG.defined() ? grad_points(gG, pt.centred, dtype_t) : at::empty({0}, pt.centred.options().dtype(dtype_t));
  }
};

}  // namespace kdfast
