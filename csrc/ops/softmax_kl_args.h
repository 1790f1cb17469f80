#pragma once
// What the CPU and CUDA softmax-KL ops share: the checks that guard the kernels against direct
// torch.ops calls (user-facing validation is in kdfast/_validation.py) and the kernel arguments.
#include <ATen/core/Tensor.h>

#include "ops/cpu_dispatch.h"

namespace kdfast {

inline void check_kl_inputs(const at::Tensor& s, const at::Tensor& t, const at::Tensor& w) {
  TORCH_CHECK(s.dim() == 2 && t.dim() == 2, "softmax_kl: student and teacher must be 2-D (rows, V)");
  TORCH_CHECK(s.sizes() == t.sizes(), "softmax_kl: student ", s.sizes(), " and teacher ", t.sizes(),
              " differ in shape");
  TORCH_CHECK(s.scalar_type() == t.scalar_type(), "softmax_kl: student and teacher dtypes differ");
  TORCH_CHECK(t.device() == s.device() && w.device() == s.device(),
              "softmax_kl: student, teacher and row_weight must be on one device, got ", s.device(), ", ",
              t.device(), ", ", w.device());
  const bool empty = s.size(0) == 0;  // no row is read
  TORCH_CHECK(empty || s.stride(1) == 1 || s.size(1) <= 1, "softmax_kl: student must have unit stride along V");
  TORCH_CHECK(empty || t.stride(1) == 1 || t.size(1) <= 1, "softmax_kl: teacher must have unit stride along V");
  auto acc = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(w.dim() == 1 && w.size(0) == s.size(0) && w.scalar_type() == acc && w.is_contiguous(),
              "softmax_kl: row_weight must be a contiguous ", acc, " vector of length rows");
  TORCH_CHECK(s.size(1) > 0, "softmax_kl: the vocabulary (last dim) is empty");
}

// Kernel arguments for outputs already allocated (gs / gt are ignored unless asked for).
inline cpu::SoftmaxKLArgs kl_args(const at::Tensor& s, const at::Tensor& t, double inv_temperature,
                                  const at::Tensor& w, at::Tensor& kl, at::Tensor& gs, at::Tensor& gt,
                                  bool grad_student, bool grad_teacher) {
  cpu::SoftmaxKLArgs a;
  a.dtype = to_kernel_dtype(s.scalar_type());
  a.student = s.data_ptr();
  a.teacher = t.data_ptr();
  a.rows = s.size(0);
  a.vocab = s.size(1);
  a.student_row_stride = s.stride(0);
  a.teacher_row_stride = t.stride(0);
  a.inv_temperature = inv_temperature;
  a.row_weight = w.data_ptr();
  a.kl_rows = kl.data_ptr();
  a.grad_student = grad_student ? gs.data_ptr() : nullptr;
  a.grad_teacher = grad_teacher ? gt.data_ptr() : nullptr;
  return a;
}

}  // namespace kdfast
