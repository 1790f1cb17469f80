#pragma once
// The tensor side of the row ops' launch contract (softmax_kl, feature_match; common/args.h):
// the checks that guard the kernels of both devices against direct torch.ops calls (user-facing
// validation is in kdfast/_validation.py) and the filling of the kernel arguments.
#include <ATen/core/Tensor.h>

#include <cmath>

#include "ops/kernel_dtype.h"

namespace kdfast {

// The (rows, D) operand pair of a row op and its row weights.
inline void check_row_inputs(const char* op, const at::Tensor& s, const at::Tensor& t, const at::Tensor& w,
                             double grad_scale) {
  TORCH_CHECK(std::isfinite(grad_scale), op, ": grad_scale must be finite, got ", grad_scale);
  TORCH_CHECK(s.dim() == 2 && t.dim() == 2, op, ": student and teacher must be 2-D (rows, D)");
  TORCH_CHECK(s.sizes() == t.sizes(), op, ": student ", s.sizes(), " and teacher ", t.sizes(), " differ in shape");
  TORCH_CHECK(s.scalar_type() == t.scalar_type(), op, ": student and teacher dtypes differ");
  check_kernel_dtype(op, "student", s.scalar_type());
  TORCH_CHECK(t.device() == s.device() && w.device() == s.device(), op,
              ": student, teacher and row_weight must be on one device, got ", s.device(), ", ", t.device(), ", ",
              w.device());
  const bool empty = s.size(0) == 0;  // no row is read
  TORCH_CHECK(empty || s.stride(1) == 1 || s.size(1) <= 1, op, ": student must have unit stride along D");
  TORCH_CHECK(empty || t.stride(1) == 1 || t.size(1) <= 1, op, ": teacher must have unit stride along D");
  const auto acc = acc_type(s.scalar_type());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == s.size(0) && w.scalar_type() == acc && w.is_contiguous(), op,
              ": row_weight must be a contiguous ", acc, " vector of length rows");
}

// The pair's element type, data, shape and row strides in kernel arguments (RowPairArgs, ShardArgs).
template <typename Args>
inline void set_pair(Args& a, const at::Tensor& s, const at::Tensor& t) {
  a.dtype = to_kernel_dtype(s.scalar_type());
  a.student = s.data_ptr();
  a.teacher = t.data_ptr();
  a.rows = s.size(0);
  a.cols = s.size(1);
  a.student_row_stride = s.stride(0);
  a.teacher_row_stride = t.stride(0);
}

// Kernel arguments for outputs already allocated (gs / gt are ignored unless asked for).
inline void set_row_pair(kernel::RowPairArgs& a, const at::Tensor& s, const at::Tensor& t, const at::Tensor& w,
                         at::Tensor& loss, at::Tensor& gs, at::Tensor& gt, bool grad_student, bool grad_teacher,
                         double grad_scale) {
  set_pair(a, s, t);
  a.row_weight = w.data_ptr();
  a.loss_rows = loss.data_ptr();
  a.grad_student = grad_student ? gs.data_ptr() : nullptr;
  a.grad_teacher = grad_teacher ? gt.data_ptr() : nullptr;
  a.grad_scale = grad_scale;
}

}  // namespace kdfast
