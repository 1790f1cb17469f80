#pragma once
// The feature_match op (schema in feature_match.cpp): the checks and the kernel arguments that its
// CPU and CUDA implementations share.
#include <ATen/core/Tensor.h>

#include "common/args.h"

namespace kdfast {

void check_feature_match(const at::Tensor& s, const at::Tensor& t, double eps, const at::Tensor& row_weight,
                         double grad_scale);

kernel::FeatureArgs feature_match_args(const at::Tensor& s, const at::Tensor& t, bool cosine, double eps,
                                       const at::Tensor& row_weight, at::Tensor& loss, at::Tensor& gs,
                                       at::Tensor& gt, bool grad_student, bool grad_teacher, double grad_scale);

}  // namespace kdfast
