#pragma once
// The sparse_kl op (schema in sparse_kl.cpp): the checks and the kernel arguments that its CPU and
// CUDA implementations share.
#include <ATen/core/Tensor.h>

#include "common/args.h"

namespace kdfast {

void check_sparse_kl(const at::Tensor& s, const at::Tensor& t, const at::Tensor& idx, double inv_temperature,
                     int64_t tail, const at::Tensor& row_weight);

// Kernel arguments for outputs already allocated (gs / gt are ignored unless asked for); status
// points at the kernel's error word (see kernel::SparseKLArgs), set to kSparseOk by the caller.
kernel::SparseKLArgs sparse_kl_args(const at::Tensor& s, const at::Tensor& t, const at::Tensor& idx,
                                    double inv_temperature, int64_t tail, const at::Tensor& row_weight,
                                    at::Tensor& loss, at::Tensor& gs, at::Tensor& gt, bool grad_student,
                                    bool grad_teacher, int64_t* status);

// Raises the error the kernels' status word describes (a ValueError naming the argument), if any.
void check_sparse_kl_status(int64_t status, int64_t K, int64_t V);

}  // namespace kdfast
