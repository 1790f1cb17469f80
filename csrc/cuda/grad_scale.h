#pragma once
// The grad_scale argument of the CUDA row ops: a scale_rows pass over the gradients after the
// kernel (the CPU kernels fuse it into their stores; kdfast's Python asks for it only there).
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>

#include "cuda/kernels.h"
#include "ops/kernel_dtype.h"

namespace kdfast {

inline void apply_grad_scale(double grad_scale, at::Tensor& gs, at::Tensor& gt, const at::TensorOptions& acc,
                             cudaStream_t stream) {
  if (grad_scale == 1.0) return;
  const at::Tensor f = at::full({1}, grad_scale, acc);  // read with stride 0: one factor for every row
  for (at::Tensor* g : {&gs, &gt}) {
    if (g->numel() == 0) continue;
    C10_CUDA_CHECK(cuda::scale_rows(to_kernel_dtype(g->scalar_type()), g->data_ptr(), g->size(0), g->size(1),
                                    f.data_ptr(), 0, stream));
  }
}

}  // namespace kdfast
