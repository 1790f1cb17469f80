// CPU implementation of the sparse_kl op (schema: csrc/ops/sparse_kl.cpp): checks, output
// allocation, kernel call, and the kernel's verdict on the indices.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/alloc.h"
#include "cpu/kernels.h"
#include "ops/sparse_kl.h"

namespace kdfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_kl_cpu(const at::Tensor& s, const at::Tensor& t,
                                                             const at::Tensor& idx, double inv_temperature,
                                                             int64_t tail, const at::Tensor& row_weight,
                                                             bool grad_student, bool grad_teacher) {
  check_sparse_kl(s, t, idx, inv_temperature, tail, row_weight);
  const int64_t R = s.size(0), V = s.size(1), K = t.size(1);
  at::Tensor loss = at::empty({R}, row_weight.options().dtype(at::kDouble));  // as softmax_kl's rows
  at::Tensor gs = grad_student ? empty_cpu_fast({R, V}, s.scalar_type()) : at::empty({0}, s.options());
  at::Tensor gt = grad_teacher ? at::empty({R, K}, t.options()) : at::empty({0}, t.options());
  if (R == 0) return {loss, gs, gt};
  int64_t status = kernel::kSparseOk;
  const kernel::SparseKLArgs a =
      sparse_kl_args(s, t, idx, inv_temperature, tail, row_weight, loss, gs, gt, grad_student, grad_teacher, &status);
  cpu::selected_kernels().sparse_kl(a);
  check_sparse_kl_status(status, K, V);
  return {loss, gs, gt};
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) { m.impl("sparse_kl", &kdfast::sparse_kl_cpu); }
