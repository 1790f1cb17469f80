// CUDA implementation of the sparse_kl op (schema and shared checks: csrc/ops/sparse_kl.cpp):
// output allocation on the current stream's device, kernel call (csrc/cuda/sparse_kl.cu), and the
// kernel's verdict on the ids, which costs one host synchronisation (an 8-byte copy): bad ids are
// a ValueError here, as on the CPU, rather than a device-side assert that ends the process.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "cuda/kernels.h"
#include "ops/sparse_kl.h"

namespace kdfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_kl_cuda(const at::Tensor& s, const at::Tensor& t,
                                                              const at::Tensor& idx, double inv_temperature,
                                                              int64_t tail, const at::Tensor& row_weight,
                                                              bool grad_student, bool grad_teacher) {
  check_sparse_kl(s, t, idx, inv_temperature, tail, row_weight);
  TORCH_CHECK(s.is_cuda(), "sparse_kl: expected CUDA tensors, got ", s.device());
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t R = s.size(0), V = s.size(1), K = t.size(1);
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, s.get_device()));
  TORCH_CHECK(cuda::sparse_kl_smem(V) + 4096 <= static_cast<size_t>(optin), "sparse_kl: a vocabulary of ", V,
              " ids does not fit this GPU's shared-memory bitmap (at most ", (static_cast<int64_t>(optin) - 4096) * 8,
              ")");
  at::Tensor loss = at::empty({R}, row_weight.options().dtype(at::kDouble));  // as softmax_kl's rows
  at::Tensor gs = grad_student ? at::empty({R, V}, s.options()) : at::empty({0}, s.options());
  at::Tensor gt = grad_teacher ? at::empty({R, K}, t.options()) : at::empty({0}, t.options());
  if (R == 0) return {loss, gs, gt};
  at::Tensor status = at::full({1}, kernel::kSparseOk, s.options().dtype(at::kLong));
  const kernel::SparseKLArgs a = sparse_kl_args(s, t, idx, inv_temperature, tail, row_weight, loss, gs, gt,
                                                grad_student, grad_teacher, status.data_ptr<int64_t>());
  C10_CUDA_CHECK(cuda::sparse_kl(a, c10::cuda::getCurrentCUDAStream(s.get_device()).stream()));
  check_sparse_kl_status(status.item<int64_t>(), K, V);
  return {loss, gs, gt};
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) { m.impl("sparse_kl", &kdfast::sparse_kl_cuda); }
