// CUDA implementation of the feature_match op (schema and shared checks:
// csrc/ops/feature_match.cpp): output allocation on the current stream's device, kernel call
// (csrc/cuda/feature_match.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/grad_scale.h"
#include "cuda/kernels.h"
#include "ops/feature_match.h"

namespace kdfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_match_cuda(const at::Tensor& s, const at::Tensor& t,
                                                                  bool cosine, double eps,
                                                                  const at::Tensor& row_weight, bool grad_student,
                                                                  bool grad_teacher, double grad_scale) {
  check_feature_match(s, t, eps, row_weight, grad_scale);
  TORCH_CHECK(s.is_cuda(), "feature_match: expected CUDA tensors, got ", s.device());
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t R = s.size(0), D = s.size(1);
  at::Tensor loss = at::empty({R}, row_weight.options());
  at::Tensor gs = grad_student ? at::empty({R, D}, s.options()) : at::empty({0}, s.options());
  at::Tensor gt = grad_teacher ? at::empty({R, D}, t.options()) : at::empty({0}, t.options());
  if (R == 0) return {loss, gs, gt};
  kernel::FeatureArgs a = feature_match_args(s, t, cosine, eps, row_weight, loss, gs, gt, grad_student, grad_teacher, 1.0);
  const int64_t nchunk = cuda::feature_match_chunks(a);
  at::Tensor partial = nchunk > 1 ? at::empty({R, nchunk}, row_weight.options()) : at::Tensor();
  const int64_t ws_bytes = static_cast<int64_t>(cuda::feature_match_workspace(a));
  at::Tensor ws = ws_bytes > 0 ? at::empty({ws_bytes}, s.options().dtype(at::kByte)) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(s.get_device()).stream();
  C10_CUDA_CHECK(cuda::feature_match(a, nchunk > 1 ? partial.data_ptr() : nullptr,
                                     ws_bytes > 0 ? ws.data_ptr() : nullptr, stream));
  if (nchunk > 1) at::sum_out(loss, partial, {1});
  apply_grad_scale(grad_scale, gs, gt, row_weight.options(), stream);
  return {loss, gs, gt};
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) { m.impl("feature_match", &kdfast::feature_match_cuda); }
