// CUDA implementation of the softmax-KL ops: argument checks, output allocation on the current
// stream's device, kernel call (csrc/cuda/softmax_kl.cu). Same contract as the CPU ops in
// csrc/ops/softmax_kl.cpp; user-facing validation happens in kdfast/_validation.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/grad_scale.h"
#include "cuda/kernels.h"
#include "ops/cpu_dispatch.h"
#include "ops/row_args.h"

namespace kdfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_cuda(const at::Tensor& s, const at::Tensor& t,
                                                               double inv_temperature,
                                                               const at::Tensor& row_weight,
                                                               bool grad_student, bool grad_teacher,
                                                               double grad_scale) {
  check_kl_inputs(s, t, row_weight, grad_scale);
  TORCH_CHECK(s.is_cuda(), "softmax_kl: expected CUDA tensors, got ", s.device());
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t R = s.size(0), V = s.size(1);
  at::Tensor kl = at::empty({R}, row_weight.options());
  at::Tensor gs = grad_student ? at::empty({R, V}, s.options()) : at::empty({0}, s.options());
  at::Tensor gt = grad_teacher ? at::empty({R, V}, t.options()) : at::empty({0}, t.options());
  if (R == 0) return {kl, gs, gt};
  cpu::SoftmaxKLArgs a = kl_args(s, t, inv_temperature, row_weight, kl, gs, gt, grad_student, grad_teacher, 1.0);
  const size_t ws_bytes = cuda::softmax_kl_workspace(a);
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, s.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(s.get_device()).stream();
  C10_CUDA_CHECK(cuda::softmax_kl(a, ws_bytes > 0 ? ws.data_ptr() : nullptr, stream));
  apply_grad_scale(grad_scale, gs, gt, row_weight.options(), stream);
  return {kl, gs, gt};
}

void scale_rows_cuda(at::Tensor& grad, const at::Tensor& ratio) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), "scale_rows_: grad must be contiguous 2-D");
  TORCH_CHECK(ratio.dim() == 1 && ratio.size(0) == grad.size(0), "scale_rows_: ratio must have one entry per row");
  TORCH_CHECK(grad.is_cuda() && ratio.device() == grad.device(),
              "scale_rows_: grad and ratio must be on one CUDA device, got ", grad.device(), " and ",
              ratio.device());
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // On the device: no host synchronisation. Strided as handed over (often an expanded scalar).
  const at::Tensor r = ratio.to(acc);
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
