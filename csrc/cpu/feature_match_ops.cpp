// CPU implementation of the feature_match op (schema: csrc/ops/feature_match.cpp): checks, output
// allocation, kernel call.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/alloc.h"
#include "cpu/kernels.h"
#include "ops/feature_match.h"

namespace kdfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_match_cpu(const at::Tensor& s, const at::Tensor& t, bool cosine,
                                                                 double eps, const at::Tensor& row_weight,
                                                                 bool grad_student, bool grad_teacher,
                                                                 double grad_scale) {
  check_feature_match(s, t, eps, row_weight, grad_scale);
  const int64_t R = s.size(0), D = s.size(1);
  at::Tensor loss = at::empty({R}, row_weight.options());
  at::Tensor gs = grad_student ? empty_cpu_fast({R, D}, s.scalar_type()) : at::empty({0}, s.options());
  at::Tensor gt = grad_teacher ? empty_cpu_fast({R, D}, t.scalar_type()) : at::empty({0}, t.options());
  if (R == 0) return {loss, gs, gt};
  kernel::FeatureArgs a = feature_match_args(s, t, cosine, eps, row_weight, loss, gs, gt, grad_student, grad_teacher, grad_scale);
  cpu::selected_kernels().feature_match(a);
  return {loss, gs, gt};
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) { m.impl("feature_match", &kdfast::feature_match_cpu); }
