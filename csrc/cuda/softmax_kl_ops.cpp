// CUDA implementation of the softmax_kl and scale_rows_ ops (schemas and shared checks:
// csrc/ops/softmax_kl.cpp): output allocation on the current stream's device, kernel call
// (csrc/cuda/softmax_kl.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/grad_scale.h"
#include "cuda/kernels.h"
#include "ops/kernel_dtype.h"
#include "ops/softmax_kl.h"

namespace kdfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_cuda(const at::Tensor& s, const at::Tensor& t,
                                                               double inv_temperature, int64_t divergence,
                                                               double mix, const at::Tensor& row_weight,
                                                               bool grad_student, bool grad_teacher,
                                                               double grad_scale) {
  check_softmax_kl(s, t, inv_temperature, divergence, mix, row_weight, grad_scale);
  TORCH_CHECK(s.is_cuda(), "softmax_kl: expected CUDA tensors, got ", s.device());
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t R = s.size(0), V = s.size(1);
  at::Tensor kl = at::empty({R}, row_weight.options().dtype(at::kDouble));  // a KL of float logits may exceed FLT_MAX
  at::Tensor gs = grad_student ? at::empty({R, V}, s.options()) : at::empty({0}, s.options());
  at::Tensor gt = grad_teacher ? at::empty({R, V}, t.options()) : at::empty({0}, t.options());
  if (R == 0) return {kl, gs, gt};
  kernel::SoftmaxKLArgs a = softmax_kl_args(s, t, inv_temperature, divergence, mix, row_weight, kl, gs, gt, grad_student, grad_teacher, 1.0);
  const size_t ws_bytes = cuda::softmax_kl_workspace(a);
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, s.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(s.get_device()).stream();
  C10_CUDA_CHECK(cuda::softmax_kl(a, ws_bytes > 0 ? ws.data_ptr() : nullptr, stream));
  apply_grad_scale(grad_scale, gs, gt, row_weight.options(), stream);
  return {kl, gs, gt};
}

void scale_rows_cuda(at::Tensor& grad, const at::Tensor& ratio) {
  check_scale_rows(grad, ratio);
  TORCH_CHECK(grad.is_cuda(), "scale_rows_: expected a CUDA tensor, got ", grad.device());
  const c10::cuda::CUDAGuard guard(grad.device());
  // On the device: no host synchronisation. Strided as handed over (often an expanded scalar).
  const at::Tensor r = ratio.to(acc_type(grad.scalar_type()));
  C10_CUDA_CHECK(cuda::scale_rows(to_kernel_dtype(grad.scalar_type()), grad.data_ptr(), grad.size(0),
                                  grad.size(1), r.data_ptr(), r.stride(0),
                                  c10::cuda::getCurrentCUDAStream(grad.get_device()).stream()));
}

}  // namespace
}  // namespace kdfast

// The CUDA softmax-KL reads its KDFAST_CUDA_KL* tuning knobs once; tests and tuning runs that change
// them between calls read them again with this op.
TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  m.def("_cuda_softmax_kl_reload_knobs() -> ()", [] { kdfast::cuda::softmax_kl_reload_knobs(); });
}

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("softmax_kl", &kdfast::softmax_kl_cuda);
  m.impl("scale_rows_", &kdfast::scale_rows_cuda);
}
