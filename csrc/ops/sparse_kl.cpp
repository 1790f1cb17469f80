// The sparse_kl op (the KL from a top-k teacher): schema and the checks both devices share.
// Kernels: csrc/cpu/sparse_kl.cpp and csrc/cuda/sparse_kl.cu; glue: csrc/{cpu,cuda}/sparse_kl_ops.cpp;
// math: csrc/common/sparse_kl.h; autograd and fake kernels: kdfast/.
#include "ops/sparse_kl.h"

#include <torch/library.h>

#include <cmath>

#include "ops/kernel_dtype.h"

namespace kdfast {

void check_sparse_kl(const at::Tensor& s, const at::Tensor& t, const at::Tensor& idx, double inv_temperature,
                     int64_t tail, const at::Tensor& w) {
  const char* op = "sparse_kl";
  TORCH_CHECK(s.dim() == 2, op, ": student must be 2-D (rows, V), got ", s.sizes());
  check_kernel_dtype(op, "student", s.scalar_type());
  TORCH_CHECK(s.size(1) > 0, op, ": the vocabulary (student's last dim) is empty");
  const auto acc = acc_type(s.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == s.size(0), op, ": teacher_logprobs must be (rows, K) with the student's ",
              s.size(0), " rows, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, op, ": teacher_logprobs must be ", acc, " (the student's accumulation type), got ",
              t.scalar_type());
  TORCH_CHECK(t.size(1) > 0, op, ": teacher_logprobs has no entries (K = 0)");
  TORCH_CHECK(t.size(1) <= s.size(1), op, ": K = ", t.size(1), " distinct ids cannot fit a vocabulary of ", s.size(1));
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, op,
                   ": teacher_topk_indices must be int64 or int32, got ", idx.scalar_type());
  TORCH_CHECK(idx.sizes() == t.sizes(), op, ": teacher_topk_indices ", idx.sizes(), " and teacher_logprobs ",
              t.sizes(), " differ in shape");
  TORCH_CHECK(t.device() == s.device() && idx.device() == s.device() && w.device() == s.device(), op,
              ": student, teacher_logprobs, teacher_topk_indices and row_weight must be on one device");
  const bool empty = s.size(0) == 0;
  TORCH_CHECK(empty || s.stride(1) == 1 || s.size(1) <= 1, op, ": student must have unit stride along V");
  TORCH_CHECK(empty || t.stride(1) == 1 || t.size(1) <= 1, op, ": teacher_logprobs must have unit stride along K");
  TORCH_CHECK(empty || idx.stride(1) == 1 || idx.size(1) <= 1, op,
              ": teacher_topk_indices must have unit stride along K");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == s.size(0) && w.scalar_type() == acc && w.is_contiguous(), op,
              ": row_weight must be a contiguous ", acc, " vector of length rows");
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0, op,
              ": inv_temperature must be finite and > 0, got ", inv_temperature);
  TORCH_CHECK_VALUE(tail == 0 || tail == 1, op, ": tail must be 0 (renormalize) or 1 (bucket), got ", tail);
}

kernel::SparseKLArgs sparse_kl_args(const at::Tensor& s, const at::Tensor& t, const at::Tensor& idx,
                                    double inv_temperature, int64_t tail, const at::Tensor& w, at::Tensor& loss,
                                    at::Tensor& gs, at::Tensor& gt, bool grad_student, bool grad_teacher,
                                    int64_t* status) {
  kernel::SparseKLArgs a;
  a.dtype = to_kernel_dtype(s.scalar_type());
  a.student = s.data_ptr();
  a.teacher = t.data_ptr();
  a.indices = idx.data_ptr();
  a.indices_int32 = idx.scalar_type() == at::kInt;
  a.rows = s.size(0);
  a.vocab = s.size(1);
  a.k = t.size(1);
  a.student_row_stride = s.stride(0);
  a.teacher_row_stride = t.stride(0);
  a.index_row_stride = idx.stride(0);
  a.inv_temperature = inv_temperature;
  a.tail = static_cast<kernel::SparseTail>(tail);
  a.row_weight = w.data_ptr();
  a.loss_rows = loss.data_ptr();
  a.grad_student = grad_student ? gs.data_ptr() : nullptr;
  a.grad_teacher = grad_teacher ? gt.data_ptr() : nullptr;
  a.status = status;
  return a;
}

void check_sparse_kl_status(int64_t status, int64_t K, int64_t V) {
  if (status == kernel::kSparseOk) return;
  const int64_t at = status / 2, row = at / K, k = at % K;
  TORCH_CHECK_VALUE(status % 2 == 1, "sparse_kl: teacher_topk_indices[", row, ", ", k,
                    "] is out of range for a vocabulary of ", V, " (ids must be in [0, ", V, "))");
  TORCH_CHECK_VALUE(false, "sparse_kl: teacher_topk_indices[", row, ", ", k,
                    "] repeats an id listed earlier in its row (the top-k ids of a row must be distinct)");
}

}  // namespace kdfast

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // The KL from a teacher known by its top-k log-probabilities (at T = 1) to the student's
  // temperature softmax over all of V, per row (csrc/common/sparse_kl.h). tail: 0 renormalize, 1
  // bucket. Returns (loss_rows, grad_student, grad_teacher) as softmax_kl does: loss_rows the
  // unweighted value of each row (0 where row_weight is 0; such rows' indices are not read), each
  // gradient row_weight[r] * dL_r/d(input) when asked for, else an empty tensor. teacher_logprobs is
  // in the student's accumulation type, and so is its gradient. Leading dims are flattened by the
  // caller; last dims must have unit stride.
  m.def("sparse_kl(Tensor student, Tensor teacher_logprobs, Tensor indices, float inv_temperature, int tail, "
        "Tensor row_weight, bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)");
}
