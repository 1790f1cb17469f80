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
  void* loss_rows;         // rows: unweighted loss, 0 on skipped rows; acc type, but double for softmax_kl
                           // (a KL of float logits can exceed FLT_MAX where T^2 KL does not)
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

// The per-shard passes of the vocab-parallel losses (kdfast/distributed.py; ops softmax_kl_shard_*):
// a slice of each row's vocabulary (rows x cols, unit stride along cols). Accumulation-type arrays
// are (k, rows) row-major.
struct ShardArgs {
  DType dtype;
  const void* student;
  const void* teacher;
  int64_t rows, cols, student_row_stride, teacher_row_stride;
  double inv_temperature;
  Divergence divergence;  // KL, JSD (0 < mix < 1), SkewKL (mix > 0) or TVD
  double mix;
  bool with_a;           // stats: also A; passes: state holds A / Z_t (KL)
  const void* state;     // passes: (4 or 5, rows) global maxima (raw logits), sums relative to them, A / Z_t
  const void* coef;      // gradients: (rows) upstream weight of each row
  const void* row_sums;  // gradients of JSD, skew, TVD: (3, rows) F, SU, SW
  void* out;             // stats: (4 or 5, rows) slice maxima, sums relative to them (and A); sums: (3, rows)
  void* grad_student;    // gradient pass: rows x cols contiguous, or null
  void* grad_teacher;
};

// Feature matching per row (see csrc/common/feature_match.h): squared error or cosine distance
// over the cols features of a row.
struct FeatureArgs : RowPairArgs {
  bool cosine;
  double eps;  // cosine: the norm clamp
};

// Tails of the top-k KL (csrc/common/sparse_kl.h): the teacher renormalised over its K entries, or
// its given probabilities plus a (K + 1)-th bucket holding the missing mass on both sides.
enum class SparseTail : int32_t { Renormalize = 0, Bucket = 1 };
constexpr int64_t kSparseOk = INT64_MAX;

// The KL from a teacher known by its top-k log-probabilities to the student's full-vocabulary
// temperature softmax, per row. Not a RowPairArgs: the teacher is rows x K, the student rows x V.
struct SparseKLArgs {
  DType dtype;                 // the student's; teacher log-probs, row weights, losses and the
                               // teacher's gradient are in the acc type (double for double, else float)
  const void* student;         // rows x V, unit stride along V
  const void* teacher;         // rows x K log-probabilities at T = 1, unit stride along K
  const void* indices;         // rows x K vocabulary ids, int64 or int32, unit stride along K
  bool indices_int32;
  int64_t rows, vocab, k;
  int64_t student_row_stride, teacher_row_stride, index_row_stride;  // in elements
  double inv_temperature;
  SparseTail tail;
  const void* row_weight;  // rows, acc type; 0 skips a row (its indices are not read)
  void* loss_rows;         // rows, acc type: unweighted loss, 0 on skipped rows
  void* grad_student;      // rows x V contiguous, or null: row_weight * grad_scale * dL/ds
  void* grad_teacher;      // rows x K contiguous acc type, or null: the same for the log-probs
  double grad_scale = 1;
  // In/out: the caller sets it to kSparseOk; the kernels lower it (atomic min) to
  // 2 (row K + k) + repeated for the first bad index they meet: out of [0, vocab) (repeated = 0)
  // or equal to an earlier index of its row (repeated = 1). Host memory on the CPU, device memory
  // on CUDA. The outputs of a call that reports one are undefined.
  int64_t* status;
};

}  // namespace kernel
}  // namespace kdfast
