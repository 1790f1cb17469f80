// CPU implementation of the per-shard passes of the vocab-parallel losses, softmax_kl_shard_stats,
// _sums and _grads (schemas, checks and output allocation: csrc/ops/softmax_kl.cpp; kernels: the
// end of csrc/cpu/softmax_kl.cpp; caller: kdfast/distributed.py).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cpu/alloc.h"
#include "cpu/kernels.h"
#include "ops/softmax_kl.h"

namespace kdfast {
namespace {

at::Tensor shard_stats_cpu(const at::Tensor& s, const at::Tensor& t, double inv_temperature, bool with_a) {
  ShardCall c = shard_stats_call(s, t, inv_temperature, with_a);
  if (c.run) cpu::selected_kernels().softmax_kl_shard_stats(c.a);
  return c.out;
}

at::Tensor shard_sums_cpu(const at::Tensor& s, const at::Tensor& t, double inv_temperature, int64_t divergence,
                          double mix, const at::Tensor& state) {
  ShardCall c = shard_sums_call(s, t, inv_temperature, divergence, mix, state);
  if (c.run) cpu::selected_kernels().softmax_kl_shard_pass(c.a);
  return c.out;
}

std::tuple<at::Tensor, at::Tensor> shard_grads_cpu(const at::Tensor& s, const at::Tensor& t, double inv_temperature,
                                                   int64_t divergence, double mix, const at::Tensor& state,
                                                   const at::Tensor& row_sums, const at::Tensor& coef,
                                                   bool grad_student, bool grad_teacher) {
  auto empty = [](const at::Tensor& x) { return empty_cpu_fast(x.sizes(), x.scalar_type()); };
  ShardCall c = shard_grads_call(s, t, inv_temperature, divergence, mix, state, row_sums, coef, grad_student,
                                 grad_teacher, empty);
  if (c.run) cpu::selected_kernels().softmax_kl_shard_pass(c.a);
  return {c.grad_student, c.grad_teacher};
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("softmax_kl_shard_stats", &kdfast::shard_stats_cpu);
  m.impl("softmax_kl_shard_sums", &kdfast::shard_sums_cpu);
  m.impl("softmax_kl_shard_grads", &kdfast::shard_grads_cpu);
}
