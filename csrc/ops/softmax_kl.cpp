// The softmax_kl and scale_rows_ ops: schemas and the checks both devices share. Kernels:
// csrc/cpu/softmax_kl.cpp and csrc/cuda/softmax_kl.cu; glue: csrc/{cpu,cuda}/softmax_kl_ops.cpp;
// math: csrc/common/softmax_kl.h; autograd and fake kernels: kdfast/.
#include "ops/softmax_kl.h"

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

}  // namespace kdfast

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // Per-row temperature softmax-KL, or another divergence of the family. Returns (kl_rows, grad_student, grad_teacher): kl_rows is the
  // unweighted KL of each row (0 where row_weight is 0), and each gradient is
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
}
