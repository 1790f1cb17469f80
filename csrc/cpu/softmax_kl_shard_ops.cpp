// CPU implementation of the per-shard passes of the vocab-parallel losses, softmax_kl_shard_stats,
// _sums and _grads (schemas and checks: csrc/ops/softmax_kl.cpp; kernels: the end of
// csrc/cpu/softmax_kl.cpp; caller: kdfast/distributed.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu/alloc.h"
#include "cpu/kernels.h"
#include "ops/kernel_dtype.h"
#include "ops/softmax_kl.h"

namespace kdfast {
namespace {

using kernel::Divergence;

cpu::ShardArgs shard_args(const at::Tensor& s, const at::Tensor& t, double inv_temperature, int64_t divergence,
                          double mix) {
  cpu::ShardArgs a{};
  a.dtype = to_kernel_dtype(s.scalar_type());
  a.student = s.data_ptr();
  a.teacher = t.data_ptr();
  a.rows = s.size(0);
  a.cols = s.size(1);
  a.student_row_stride = s.stride(0);
  a.teacher_row_stride = t.stride(0);
  a.inv_temperature = inv_temperature;
  a.divergence = static_cast<Divergence>(divergence);
  a.mix = mix;
  return a;
}

at::Tensor shard_stats_cpu(const at::Tensor& s, const at::Tensor& t, double inv_temperature, bool with_a) {
  check_softmax_kl_shard("softmax_kl_shard_stats", s, t, inv_temperature, 0, 0.0, at::Tensor(), at::Tensor(),
                         at::Tensor());
  const int64_t R = s.size(0);
  at::Tensor out = at::empty({with_a ? 5 : 4, R}, s.options().dtype(acc_type(s.scalar_type())));
  if (R == 0) return out;
  cpu::ShardArgs a = shard_args(s, t, inv_temperature, 0, 0.0);
  a.with_a = with_a;
  a.out = out.data_ptr();
  cpu::selected_kernels().softmax_kl_shard_stats(a);
  return out;
}

at::Tensor shard_sums_cpu(const at::Tensor& s, const at::Tensor& t, double inv_temperature, int64_t divergence,
                          double mix, const at::Tensor& state) {
  check_softmax_kl_shard("softmax_kl_shard_sums", s, t, inv_temperature, divergence, mix, state, at::Tensor(),
                         at::Tensor());
  TORCH_CHECK(divergence != static_cast<int64_t>(Divergence::KL),
              "softmax_kl_shard_sums: KL needs no term sums (its value comes from the statistics)");
  at::Tensor out = at::zeros({3, s.size(0)}, state.options());
  if (s.size(0) == 0 || s.size(1) == 0) return out;
  cpu::ShardArgs a = shard_args(s, t, inv_temperature, divergence, mix);
  a.state = state.data_ptr();
  a.out = out.data_ptr();
  cpu::selected_kernels().softmax_kl_shard_pass(a);
  return out;
}

std::tuple<at::Tensor, at::Tensor> shard_grads_cpu(const at::Tensor& s, const at::Tensor& t, double inv_temperature,
                                                   int64_t divergence, double mix, const at::Tensor& state,
                                                   const at::Tensor& row_sums, const at::Tensor& coef,
                                                   bool grad_student, bool grad_teacher) {
  const bool kl = divergence == static_cast<int64_t>(Divergence::KL);
  check_softmax_kl_shard("softmax_kl_shard_grads", s, t, inv_temperature, divergence, mix, state,
                         kl ? at::Tensor() : row_sums, coef);
  const int64_t R = s.size(0), V = s.size(1);
  at::Tensor gs = grad_student ? empty_cpu_fast({R, V}, s.scalar_type()) : at::empty({0}, s.options());
  at::Tensor gt = grad_teacher ? empty_cpu_fast({R, V}, t.scalar_type()) : at::empty({0}, t.options());
  if (R == 0 || V == 0 || !(grad_student || grad_teacher)) return {gs, gt};
  cpu::ShardArgs a = shard_args(s, t, inv_temperature, divergence, mix);
  a.with_a = kl;
  a.state = state.data_ptr();
  a.row_sums = kl ? nullptr : row_sums.data_ptr();
  a.coef = coef.data_ptr();
  a.grad_student = grad_student ? gs.data_ptr() : nullptr;
  a.grad_teacher = grad_teacher ? gt.data_ptr() : nullptr;
  cpu::selected_kernels().softmax_kl_shard_pass(a);
  return {gs, gt};
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("softmax_kl_shard_stats", &kdfast::shard_stats_cpu);
  m.impl("softmax_kl_shard_sums", &kdfast::shard_sums_cpu);
  m.impl("softmax_kl_shard_grads", &kdfast::shard_grads_cpu);
}
