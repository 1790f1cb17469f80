// The feature_match op: schema and the checks both devices share. Kernels:
// csrc/cpu/feature_match.cpp and csrc/cuda/feature_match.cu; glue: csrc/{cpu,cuda}/feature_match_ops.cpp;
// math: csrc/common/feature_match.h.
#include "ops/feature_match.h"

#include <torch/library.h>

#include <cmath>

#include "ops/row_pair.h"

namespace kdfast {

void check_feature_match(const at::Tensor& s, const at::Tensor& t, double eps, const at::Tensor& row_weight,
                         double grad_scale) {
  check_row_inputs("feature_match", s, t, row_weight, grad_scale);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "feature_match: eps must be finite and >= 0, got ", eps);
}

kernel::FeatureArgs feature_match_args(const at::Tensor& s, const at::Tensor& t, bool cosine, double eps,
                                       const at::Tensor& row_weight, at::Tensor& loss, at::Tensor& gs,
                                       at::Tensor& gt, bool grad_student, bool grad_teacher, double grad_scale) {
  kernel::FeatureArgs a;
  set_row_pair(a, s, t, row_weight, loss, gs, gt, grad_student, grad_teacher, grad_scale);
  a.cosine = cosine;
  a.eps = eps;
  return a;
}

}  // namespace kdfast

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // Feature matching per row of (rows, D), in the forward-and-gradient form of softmax_kl: the
  // squared error sum_d (s - t)^2 (cosine=False) or the cosine distance
  // 1 - <s, t> / (max(|s|, eps) max(|t|, eps)) (cosine=True; gradients as F.cosine_similarity gives
  // them, see csrc/common/feature_match.h).
  m.def("feature_match(Tensor student, Tensor teacher, bool cosine, float eps, Tensor row_weight, "
        "bool grad_student, bool grad_teacher, float grad_scale=1.0) -> (Tensor, Tensor, Tensor)");
}
