// The softmax_kl and scale_rows_ ops: schemas and the checks both devices share. Kernels:
// csrc/cpu/softmax_kl.cpp and csrc/cuda/softmax_kl.cu; glue: csrc/{cpu,cuda}/softmax_kl_ops.cpp;
// math: csrc/common/softmax_kl.h; autograd and fake kernels: kdfast/.
#include "ops/softmax_kl.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>

#include "ops/row_pair.h"

#include <utility>

namespace kdfast {

using kernel::Divergence;

void check_softmax_kl(const at::Tensor& s, const at::Tensor& t, double inv_temperature, int64_t divergence,
                      double mix, const at::Tensor& row_weight, double grad_scale) {
  check_row_inputs("softmax_kl", s, t, row_weight, grad_scale);
  TORCH_CHECK(s.size(1) > 0, "softmax_kl: the vocabulary (last dim) is empty");
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0,
              "softmax_kl: inv_temperature must be finite and > 0, got ", inv_temperature);
  TORCH_CHECK(divergence >= 0 && divergence <= static_cast<int64_t>(Divergence::TVD),
              "softmax_kl: divergence must be 0 (kl) .. 5 (tvd), got ", divergence);
  TORCH_CHECK(mix >= 0 && mix <= 1, "softmax_kl: mix must be in [0, 1], got ", mix);
}

kernel::SoftmaxKLArgs softmax_kl_args(const at::Tensor& s, const at::Tensor& t, double inv_temperature,
                                      int64_t divergence, double mix, const at::Tensor& row_weight, at::Tensor& kl,
                                      at::Tensor& gs, at::Tensor& gt, bool grad_student, bool grad_teacher,
                                      double grad_scale) {
  kernel::SoftmaxKLArgs a;
  set_row_pair(a, s, t, row_weight, kl, gs, gt, grad_student, grad_teacher, grad_scale);
  a.inv_temperature = inv_temperature;
  // The kernels see KL, JSD with 0 < beta < 1, skew KL with alpha > 0 and TVD (common/args.h):
  // the endpoints JSD(0) = KL(P||Q), JSD(1) = KL(Q||P) and skew(0) = KL are taken exactly (as TRL
  // defines them), and a reverse form is its forward one with the roles of the inputs swapped.
  Divergence d = static_cast<Divergence>(divergence);
  bool swap = false;
  switch (d) {
    case Divergence::ReverseKL: d = Divergence::KL, swap = true; break;
    case Divergence::JSD:
      if (mix == 0 || mix == 1) swap = mix == 1, d = Divergence::KL;
      break;
    case Divergence::SkewReverseKL: swap = true, d = mix == 0 ? Divergence::KL : Divergence::SkewKL; break;
    case Divergence::SkewKL: d = mix == 0 ? Divergence::KL : Divergence::SkewKL; break;
    default: break;
  }
  a.divergence = d;
  a.mix = mix;
  if (swap) {
    std::swap(a.student, a.teacher);
    std::swap(a.student_row_stride, a.teacher_row_stride);
    std::swap(a.grad_student, a.grad_teacher);
  }
  return a;
}

void check_scale_rows(const at::Tensor& grad, const at::Tensor& ratio) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), "scale_rows_: grad must be contiguous 2-D");
  check_kernel_dtype("scale_rows_", "grad", grad.scalar_type());
  TORCH_CHECK(ratio.dim() == 1 && ratio.size(0) == grad.size(0), "scale_rows_: ratio must have one entry per row");
  TORCH_CHECK(ratio.device() == grad.device(), "scale_rows_: grad and ratio must be on one device, got ",
              grad.device(), " and ", ratio.device());
}

void check_softmax_kl_shard(const char* name, const at::Tensor& s, const at::Tensor& t, double inv_temperature,
                            int64_t divergence, double mix, const at::Tensor& state, const at::Tensor& row_sums,
                            const at::Tensor& coef) {
  TORCH_CHECK(s.dim() == 2 && t.dim() == 2, name, ": student and teacher must be 2-D (rows, V_local)");
  TORCH_CHECK(s.sizes() == t.sizes(), name, ": student ", s.sizes(), " and teacher ", t.sizes(), " differ in shape");
  TORCH_CHECK(s.scalar_type() == t.scalar_type(), name, ": student and teacher dtypes differ");
  check_kernel_dtype(name, "student", s.scalar_type());
  TORCH_CHECK(t.device() == s.device(), name, ": student and teacher must be on one device");
  const bool empty = s.size(0) == 0 || s.size(1) == 0;
  TORCH_CHECK(empty || s.stride(1) == 1 || s.size(1) == 1, name, ": student must have unit stride along V_local");
  TORCH_CHECK(empty || t.stride(1) == 1 || t.size(1) == 1, name, ": teacher must have unit stride along V_local");
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0, name,
              ": inv_temperature must be finite and > 0, got ", inv_temperature);
  const auto d = static_cast<Divergence>(divergence);
  TORCH_CHECK(d == Divergence::KL || d == Divergence::TVD || (d == Divergence::JSD && mix > 0 && mix < 1) ||
                  (d == Divergence::SkewKL && mix > 0 && mix <= 1),
              name, ": divergence must be 0 (kl), 2 (jsd, 0 < mix < 1), 3 (skew_kl, 0 < mix <= 1) or 5 (tvd), got ",
              divergence, " with mix ", mix);
  const auto acc = acc_type(s.scalar_type());
  const int64_t R = s.size(0);
  auto rows_of = [&](const at::Tensor& x, const char* arg, int64_t k0, int64_t k1) {
    if (!x.defined()) return;
    TORCH_CHECK(x.dim() == 2 && x.size(0) >= k0 && x.size(0) <= k1 && x.size(1) == R && x.scalar_type() == acc &&
                    x.is_contiguous() && x.device() == s.device(),
                name, ": ", arg, " must be a contiguous ", acc, " tensor of shape (", k0 == k1 ? "" : "4 or ", k1,
                ", rows) on the inputs' device, got ", x.sizes(), " ", x.scalar_type());
  };
  rows_of(state, "state", d == Divergence::KL ? 5 : 4, 5);
  rows_of(row_sums, "row_sums", 3, 3);
  if (coef.defined()) {
    TORCH_CHECK(coef.dim() == 1 && coef.size(0) == R && coef.scalar_type() == acc && coef.is_contiguous() &&
                    coef.device() == s.device(),
                name, ": coef must be a contiguous ", acc, " vector of length rows");
  }
}

namespace {

kernel::ShardArgs shard_args(const at::Tensor& s, const at::Tensor& t, double inv_temperature, int64_t divergence,
                             double mix) {
  kernel::ShardArgs a{};
  set_pair(a, s, t);
  a.inv_temperature = inv_temperature;
  a.divergence = static_cast<Divergence>(divergence);
  a.mix = mix;
  return a;
}

}  // namespace

ShardCall shard_stats_call(const at::Tensor& s, const at::Tensor& t, double inv_temperature, bool with_a) {
  check_softmax_kl_shard("softmax_kl_shard_stats", s, t, inv_temperature, 0, 0.0, at::Tensor(), at::Tensor(),
                         at::Tensor());
  ShardCall c;
  const int64_t R = s.size(0);
  c.out = at::empty({with_a ? 5 : 4, R}, s.options().dtype(acc_type(s.scalar_type())));
  if (R == 0) return c;  // (an empty slice still has its rows: maxima -inf, sums 0, from the kernel)
  c.a = shard_args(s, t, inv_temperature, 0, 0.0);
  c.a.with_a = with_a;
  c.a.out = c.out.data_ptr();
  c.run = true;
  return c;
}

ShardCall shard_sums_call(const at::Tensor& s, const at::Tensor& t, double inv_temperature, int64_t divergence,
                          double mix, const at::Tensor& state) {
  check_softmax_kl_shard("softmax_kl_shard_sums", s, t, inv_temperature, divergence, mix, state, at::Tensor(),
                         at::Tensor());
  TORCH_CHECK(divergence != static_cast<int64_t>(Divergence::KL),
              "softmax_kl_shard_sums: KL needs no term sums (its value comes from the statistics)");
  ShardCall c;
  c.out = at::zeros({3, s.size(0)}, state.options());
  if (s.size(0) == 0 || s.size(1) == 0) return c;
  c.a = shard_args(s, t, inv_temperature, divergence, mix);
  c.a.state = state.data_ptr();
  c.a.out = c.out.data_ptr();
  c.run = true;
  return c;
}

ShardCall shard_grads_call(const at::Tensor& s, const at::Tensor& t, double inv_temperature, int64_t divergence,
                           double mix, const at::Tensor& state, const at::Tensor& row_sums, const at::Tensor& coef,
                           bool grad_student, bool grad_teacher, at::Tensor (*empty_like_rows)(const at::Tensor&)) {
  const bool kl = divergence == static_cast<int64_t>(Divergence::KL);
  check_softmax_kl_shard("softmax_kl_shard_grads", s, t, inv_temperature, divergence, mix, state,
                         kl ? at::Tensor() : row_sums, coef);
  ShardCall c;
  c.grad_student = grad_student ? empty_like_rows(s) : at::empty({0}, s.options());
  c.grad_teacher = grad_teacher ? empty_like_rows(t) : at::empty({0}, t.options());
  if (s.size(0) == 0 || s.size(1) == 0 || !(grad_student || grad_teacher)) return c;
  c.a = shard_args(s, t, inv_temperature, divergence, mix);
  c.a.with_a = kl;
  c.a.state = state.data_ptr();
  c.a.row_sums = kl ? nullptr : row_sums.data_ptr();
  c.a.coef = coef.data_ptr();
  c.a.grad_student = grad_student ? c.grad_student.data_ptr() : nullptr;
  c.a.grad_teacher = grad_teacher ? c.grad_teacher.data_ptr() : nullptr;
  c.run = true;
  return c;
}

}  // namespace kdfast

#if !defined(KDFAST_CUDA_EMULATE)  // (the emulation build of the CUDA glue includes this file for its checks)
TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // Per-row temperature softmax-KL, or another divergence of the family. Returns (kl_rows, grad_student, grad_teacher): kl_rows is the
  // unweighted KL of each row (0 where row_weight is 0), in float64 for every input dtype (the KL of
  // float logits reaches 2 FLT_MAX / T, where T^2 KL is still a float), and each gradient is
  // grad_scale * row_weight[r] * dKL_r/d(input) when asked for, else an empty tensor; the product
  // with grad_scale is rounded as a scale_rows_ pass after the op would round it. Leading dims are
  // flattened by the caller; the last dim must have unit stride.
  // divergence: 0 KL(P||Q), 1 KL(Q||P), 2 generalized JSD (mix = beta), 3 skew KL(P || mix P +
  // (1 - mix) Q), 4 its reverse KL(Q || mix Q + (1 - mix) P), 5 total variation; P the teacher's
  // softmax, Q the student's (csrc/common/divergence.h). mix is ignored by 0, 1 and 5.
  m.def("softmax_kl(Tensor student, Tensor teacher, float inv_temperature, int divergence, float mix, "
        "Tensor row_weight, bool grad_student, bool grad_teacher, float grad_scale=1.0) -> (Tensor, Tensor, Tensor)");
  // grad[r, :] *= ratio[r] in place, skipping rows whose ratio is exactly 1 (the usual case, where
  // the upstream gradient is the one the forward already applied).
  m.def("scale_rows_(Tensor(a!) grad, Tensor ratio) -> ()");
  // The per-shard passes of the vocab-parallel losses (kdfast/distributed.py), on a slice (rows,
  // V_local) of each row's vocabulary; results in the accumulation dtype (double for double, else
  // float). CPU and CUDA kernels (csrc/{cpu,cuda}/softmax_kl_shard_ops.cpp).
  // stats: (4, rows) slice maxima m_s, m_t of the raw logits, Z_s = sum exp((s - m_s) / T), Z_t
  // likewise, and with with_a a fifth row A = sum exp((t - m_t) / T) ((t - m_t) - (s - m_s)) / T (a
  // term with exp 0 is 0; a slice row without mass has maximum -inf, sums 0 and reference 0).
  m.def("softmax_kl_shard_stats(Tensor student, Tensor teacher, float inv_temperature, bool with_a) -> Tensor");
  // sums: (3, rows) F, SU, SW of common/divergence.h over the slice, given state = the row's global
  // maxima and sums relative to them (4 rows, as stats gives them, merged over the ranks).
  m.def("softmax_kl_shard_sums(Tensor student, Tensor teacher, float inv_temperature, int divergence, float mix, "
        "Tensor state) -> Tensor");
  // grads: the slice's gradients of sum_r coef[r] * D_r, given the global state (KL: 5 rows, the fifth
  // A / Z_t) and, for the others, row_sums = the global F, SU, SW; (empty tensors where not asked).
  m.def("softmax_kl_shard_grads(Tensor student, Tensor teacher, float inv_temperature, int divergence, float mix, "
        "Tensor state, Tensor row_sums, Tensor coef, bool grad_student, bool grad_teacher) -> (Tensor, Tensor)");
}
#endif
