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

}  // namespace kdfast
