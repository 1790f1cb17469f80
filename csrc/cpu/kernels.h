#pragma once
// The table of CPU kernels. The same kernel sources are compiled once per instruction set
// (baseline into the main library, AVX2 and AVX-512 into libraries of their own); the main library
// loads the best one the CPU supports at run time. The kernels see raw pointers only, so the
// ISA-specific libraries need none of the heavy tensor headers.
#include <cstdint>

#include "common/args.h"

namespace kdfast {
namespace cpu {

// Rows per at::parallel_for task such that a task holds at least min_elems elements: below that an
// OpenMP fork/join (microseconds, much more when another process holds a core) costs more than
// the work it would share.
inline int64_t rows_per_task(int64_t row_len, int64_t min_elems) {
  return row_len >= min_elems ? 1 : min_elems / (row_len > 0 ? row_len : 1);
}

// The row ops' contract is device-neutral (common/args.h); the relation kernels' structs below
// are the CPU's own.
using kernel::DType;
using kernel::FeatureArgs;
using kernel::RowPairArgs;
using kernel::ShardArgs;
using kernel::SoftmaxKLArgs;
using kernel::SparseKLArgs;

// Relation kernels work on one group's n x n matrices, all contiguous, from the exact squared
// distances of its points (see csrc/common/rkd.h); their gradients come out as d loss / d D2 in
// double, which the caller takes back to the points. Distances are in the caller's scaled units
// and eps is scaled with them.

// D2_ij = |x_i - x_j|^2 summed from the differences, for n points of dim coordinates (double,
// row-major). Symmetric, exact zero diagonal.
struct SqDistArgs {
  const double* points;
  int64_t n, dim;
  double* d2;  // out: n x n
};

struct PdistArgs {
  const double* d2;
  int64_t n;
  bool squared;
  double eps;        // the clamp of the squared distance
  double* dist;      // out: distances clamped at eps, zero diagonal, not normalised
  double pos_sum;    // out: sum and count of the positive distances (psi divides by their mean)
  int64_t pos_count;
};

struct PdistBackwardArgs {
  const double* d2;
  const double* dist;  // as PdistArgs wrote it
  int64_t n;
  bool squared, normalize;
  double eps, mean;  // mean of the positive distances (used when normalize)
  int64_t pos_count;
  const double* grad_out;  // d loss / d psi (normalize) or d loss / d dist
  double* grad_d2;         // in/out: d loss / d D2 (not symmetrised) is added to it
};

// Huber between psi_s = dist_s / mean_s and psi_t = dist_t / mean_t over n x n entries (double).
struct DistanceHuberArgs {
  const double* dist_s;
  const double* dist_t;
  int64_t n;
  double inv_mean_s, inv_mean_t, delta, coef;  // coef scales the gradients (weight / n^2)
  double loss;                                  // out: sum of Huber values
  double* grad_psi_s;                           // out or null: coef * Huber'
  double* grad_psi_t;
};

// Angle Huber over the n^3 triplets of one group, with the sums its gradient needs (see rkd.cpp),
// in the accumulation type (Float or Double).
struct AngleArgs {
  DType dtype;
  const double* d2_s;
  const double* d2_t;
  int64_t n;
  double eps_s, eps_t;  // the side-length clamp of each side, in its own units
  double delta, coef;   // coef scales the gradients (weight / n^3)
  double loss;          // out: sum of Huber values
  double* grad_d2_s;    // in/out or null: d loss / d D2_s (not symmetrised) is added; n x n
  double* grad_d2_t;
  // null, or the group's scaled points (n x dim, before centring) where its span needs D2's low
  // parts (rkd::D2Span::wide; the angle loop takes them from the points' differences)
  const double* x_s = nullptr;
  const double* x_t = nullptr;
  int64_t dim_s = 0, dim_t = 0;
};

// The kernel table of one ISA build; the main library selects one at import (csrc/kdfast.cpp).
struct Kernels {
  const char* isa;
  void (*softmax_kl)(const SoftmaxKLArgs&);
  void (*sq_dists)(const SqDistArgs&);
  void (*pdist)(PdistArgs&);
  void (*pdist_backward)(const PdistBackwardArgs&);
  void (*distance_huber)(DistanceHuberArgs&);
  void (*angle)(AngleArgs&);
  void (*feature_match)(const FeatureArgs&);
  void (*sparse_kl)(const SparseKLArgs&);
  void (*softmax_kl_shard_stats)(const ShardArgs&);
  void (*softmax_kl_shard_pass)(const ShardArgs&);  // term sums (no gradient pointer) or gradients
};

// The selected kernel build (the baseline until Python picks one). Main library only.
const Kernels& selected_kernels();

}  // namespace cpu
}  // namespace kdfast

extern "C" {
// Exported by each ISA library (and, as kdfast_cpu_kernels_default, by the main one).
typedef const kdfast::cpu::Kernels* (*kdfast_cpu_kernels_fn)();
}
