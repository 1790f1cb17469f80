#pragma once
// A tensor's element type as the kernels' launch contract spells it (common/args.h).
#include <ATen/core/Tensor.h>

#include "common/args.h"

namespace kdfast {

inline kernel::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kernel::DType::Float;
    case at::kDouble: return kernel::DType::Double;
    case at::kHalf: return kernel::DType::Half;
    case at::kBFloat16: return kernel::DType::BFloat16;
    default: TORCH_CHECK(false, "kdfast: unsupported dtype ", t);
  }
}

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_kernel_dtype(const char* op, const char* arg, at::ScalarType t) {
  TORCH_CHECK(is_kernel_dtype(t), op, ": ", arg, " must be float32, float64, float16 or bfloat16, got ", t);
}

// The type the kernels accumulate in: double for double inputs, float for the others.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace kdfast
