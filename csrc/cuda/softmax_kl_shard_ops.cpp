// CUDA implementation of the per-shard passes of the vocab-parallel losses, softmax_kl_shard_stats,
// _sums and _grads, as csrc/cpu/softmax_kl_shard_ops.cpp (schemas, checks and output allocation:
// csrc/ops/softmax_kl.cpp; kernels: csrc/cuda/softmax_kl.cu; caller: kdfast/distributed.py). On the
// inputs' device and its current stream; no host synchronisation. Also built for the CPU emulation
// of the kernels (csrc/cuda/emu/softmax_kl_shard_ops_emu.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#if !defined(KDFAST_CUDA_EMULATE)
#include <torch/library.h>
#endif

#include "cuda/glue_device.h"
#include "cuda/kernels.h"
#include "ops/softmax_kl.h"

namespace kdfast {
namespace {

using cuda_glue::DeviceGuard;
using cuda_glue::stream_of;

void check_cuda(const char* op, const at::Tensor& s) {
  TORCH_CHECK(s.device().type() == cuda_glue::kDevice, op, ": expected CUDA tensors, got ", s.device());
}

at::Tensor shard_stats_cuda(const at::Tensor& s, const at::Tensor& t, double inv_temperature, bool with_a) {
  check_cuda("softmax_kl_shard_stats", s);
  const DeviceGuard guard(s.device());
  ShardCall c = shard_stats_call(s, t, inv_temperature, with_a);
  if (c.run) KDFAST_CUDA_CHECK(cuda::softmax_kl_shard_stats(c.a, stream_of(s)));
  return c.out;
}

at::Tensor shard_sums_cuda(const at::Tensor& s, const at::Tensor& t, double inv_temperature, int64_t divergence,
                           double mix, const at::Tensor& state) {
  check_cuda("softmax_kl_shard_sums", s);
  const DeviceGuard guard(s.device());
  ShardCall c = shard_sums_call(s, t, inv_temperature, divergence, mix, state);
  if (c.run) KDFAST_CUDA_CHECK(cuda::softmax_kl_shard_pass(c.a, stream_of(s)));
  return c.out;
}

std::tuple<at::Tensor, at::Tensor> shard_grads_cuda(const at::Tensor& s, const at::Tensor& t, double inv_temperature,
                                                    int64_t divergence, double mix, const at::Tensor& state,
                                                    const at::Tensor& row_sums, const at::Tensor& coef,
                                                    bool grad_student, bool grad_teacher) {
  check_cuda("softmax_kl_shard_grads", s);
  const DeviceGuard guard(s.device());
  auto empty = [](const at::Tensor& x) { return at::empty(x.sizes(), x.options()); };
  ShardCall c = shard_grads_call(s, t, inv_temperature, divergence, mix, state, row_sums, coef, grad_student,
                                 grad_teacher, empty);
  if (c.run) KDFAST_CUDA_CHECK(cuda::softmax_kl_shard_pass(c.a, stream_of(s)));
  return {c.grad_student, c.grad_teacher};
}

}  // namespace
}  // namespace kdfast

#if !defined(KDFAST_CUDA_EMULATE)
TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("softmax_kl_shard_stats", &kdfast::shard_stats_cuda);
  m.impl("softmax_kl_shard_sums", &kdfast::shard_sums_cuda);
  m.impl("softmax_kl_shard_grads", &kdfast::shard_grads_cuda);
}
#endif
