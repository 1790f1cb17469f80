#pragma once
// The launch contract of the row ops (softmax_kl, feature_match), shared by the CPU and CUDA
// kernels: element types and argument structs of raw pointers. No tensor headers, so the CPU
// kernel libraries (one per ISA) and the .cu files compile without them.
#include <cstdint>

namespace kdfast {
namespace kernel {

enum class DType : int32_t { Float = 0, Double = 1, Half = 2, BFloat16 = 3 };

// What the row ops share: a (rows, cols) student / teacher pair, a weight per row, each row's
// unweighted loss out and, when asked, the gradients of sum(row_weight * loss) in the same call.
struct RowPairArgs {
  DType dtype;
  const void* student;  // rows x cols, unit stride along cols
  const void* teacher;
  int64_t rows, cols;
  int64_t student_row_stride, teacher_row_stride;  // in elements; 0 broadcasts one row
  const void* row_weight;  // rows, acc type (double for double input, else float); 0 skips a row
  void* loss_rows;         // rows, acc type: unweighted loss, 0 on skipped rows
  void* grad_student;      // rows x cols contiguous, or null: row_weight * dL/ds (0 on skipped rows)
  void* grad_teacher;      // rows x cols contiguous, or null
  double grad_scale = 1;   // gradients times this, with the bits of a scale_rows_ pass after them
};

// The divergences of the softmax-KL op (csrc/common/divergence.h). The op's glue
// (csrc/ops/softmax_kl.cpp) hands the kernels only KL, JSD with 0 < mix < 1, SkewKL with 0 < mix
// and TVD: the reverse forms swap student and teacher, and the endpoints that equal a KL become it.
enum class Divergence : int32_t { KL = 0, ReverseKL = 1, JSD = 2, SkewKL = 3, SkewReverseKL = 4, TVD = 5 };

// A divergence between the temperature softmaxes of each row: cols is the vocabulary.
struct SoftmaxKLArgs : RowPairArgs {
  double inv_temperature;
  Divergence divergence = Divergence::KL;
  double mix = 0;  // JSD: beta; skew KL: alpha (the weight of the first argument in the mixture)
};

// Feature matching per row (see csrc/common/feature_match.h): squared error or cosine distance
// over the cols features of a row.
struct FeatureArgs : RowPairArgs {
  bool cosine;
  double eps;  // cosine: the norm clamp
};

}  // namespace kernel
}  // namespace kdfast
