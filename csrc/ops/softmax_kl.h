#pragma once
// The softmax_kl and scale_rows_ ops (schemas in softmax_kl.cpp): the checks and the kernel
// arguments that their CPU and CUDA implementations share.
#include <ATen/core/Tensor.h>

#include "common/args.h"

namespace kdfast {

void check_softmax_kl(const at::Tensor& s, const at::Tensor& t, double inv_temperature, int64_t divergence,
                      double mix, const at::Tensor& row_weight, double grad_scale);

// Kernel arguments for outputs already allocated (gs / gt are ignored unless asked for), with the
// divergence reduced to the kinds the kernels implement (see the function).
kernel::SoftmaxKLArgs softmax_kl_args(const at::Tensor& s, const at::Tensor& t, double inv_temperature,
                                      int64_t divergence, double mix, const at::Tensor& row_weight, at::Tensor& kl,
                                      at::Tensor& gs, at::Tensor& gt, bool grad_student, bool grad_teacher,
                                      double grad_scale);

void check_scale_rows(const at::Tensor& grad, const at::Tensor& ratio);

// The per-shard passes of the vocab-parallel losses (softmax_kl_shard_*): the checks of one op
// (name) on a slice pair s, t and, where given (defined), its per-row state, row sums and coef.
// divergence must be a kind the kernels implement (0 KL, 2 JSD with 0 < mix < 1, 3 skew KL with
// mix > 0, 5 TVD): the caller swaps the inputs for the reverse forms.
void check_softmax_kl_shard(const char* name, const at::Tensor& s, const at::Tensor& t, double inv_temperature,
                            int64_t divergence, double mix, const at::Tensor& state, const at::Tensor& row_sums,
                            const at::Tensor& coef);

// One call of a per-shard op, checked and prepared for a device's kernel (cpu::Kernels or
// csrc/cuda/kernels.h): outputs allocated on the inputs' device, arguments set. run is false where
// the kernel has nothing to do (no rows, an empty slice, no gradient asked for): the outputs are
// then already final.
struct ShardCall {
  kernel::ShardArgs a{};
  at::Tensor out;                          // stats, sums
  at::Tensor grad_student, grad_teacher;   // grads (empty where not asked for)
  bool run = false;
};
ShardCall shard_stats_call(const at::Tensor& s, const at::Tensor& t, double inv_temperature, bool with_a);
ShardCall shard_sums_call(const at::Tensor& s, const at::Tensor& t, double inv_temperature, int64_t divergence,
                          double mix, const at::Tensor& state);
// empty_like_rows(x): an uninitialised contiguous tensor of x's shape and dtype on x's device (the
// device's fastest allocation).
ShardCall shard_grads_call(const at::Tensor& s, const at::Tensor& t, double inv_temperature, int64_t divergence,
                           double mix, const at::Tensor& state, const at::Tensor& row_sums, const at::Tensor& coef,
                           bool grad_student, bool grad_teacher, at::Tensor (*empty_like_rows)(const at::Tensor&));

}  // namespace kdfast
