// The softmax_kl and scale_rows_ ops: schemas and the checks both devices share. Kernels:
// csrc/cpu/softmax_kl.cpp and csrc/cuda/softmax_kl.cu; glue: csrc/{cpu,cuda}/softmax_kl_ops.cpp;
// math: csrc/common/softmax_kl.h; autograd and fake kernels: kdfast/.
#include "ops/softmax_kl.h"

#include <torch/library.h>

#include <cmath>

#include "ops/row_pair.h"

namespace kdfast {

void check_softmax_kl(const at::Tensor& s, const at::Tensor& t, double inv_temperature, const at::Tensor& row_weight,
                      double grad_scale) {
  check_row_inputs("softmax_kl", s, t, row_weight, grad_scale);
  TORCH_CHECK(s.size(1) > 0, "softmax_kl: the vocabulary (last dim) is empty");
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0,
              "softmax_kl: inv_temperature must be finite and > 0, got ", inv_temperature);
}

kernel::SoftmaxKLArgs softmax_kl_args(const at::Tensor& s, const at::Tensor& t, double inv_temperature,
                                      const at::Tensor& row_weight, at::Tensor& kl, at::Tensor& gs, at::Tensor& gt,
                                      bool grad_student, bool grad_teacher, double grad_scale) {
  kernel::SoftmaxKLArgs a;
  set_row_pair(a, s, t, row_weight, kl, gs, gt, grad_student, grad_teacher, grad_scale);
  a.inv_temperature = inv_temperature;
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
  // Per-row temperature softmax-KL. Returns (kl_rows, grad_student, grad_teacher): kl_rows is the
  // unweighted KL of each row (0 where row_weight is 0), and each gradient is
  // grad_scale * row_weight[r] * dKL_r/d(input) when asked for, else an empty tensor; the product
  // with grad_scale is rounded as a scale_rows_ pass after the op would round it. Leading dims are
  // flattened by the caller; the last dim must have unit stride.
  m.def("softmax_kl(Tensor student, Tensor teacher, float inv_temperature, Tensor row_weight, "
        "bool grad_student, bool grad_teacher, float grad_scale=1.0) -> (Tensor, Tensor, Tensor)");
  // grad[r, :] *= ratio[r] in place, skipping rows whose ratio is exactly 1 (the usual case, where
  // the upstream gradient is the one the forward already applied).
  m.def("scale_rows_(Tensor(a!) grad, Tensor ratio) -> ()");
}
