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
using kernel::SoftmaxKLArgs;

// Relation kernels work on one group's n x n matrices in the accumulation type (Float or Double),
// all contiguous. The caller forms the Gram matrix of the centred points with a matrix product.
struct PdistArgs {
  DType dtype;
  const void* gram;
  int64_t n;
  bool squared;
  double eps;
  void* dist;        // out: distances clamped at eps, zero diagonal, not normalised
  double pos_sum;    // out: sum and count of the positive distances (psi divides by their mean)
  int64_t pos_count;
};

struct PdistBackwardArgs {
  DType dtype;
  const void* gram;
  const void* dist;  // as PdistArgs wrote it
  int64_t n;
  bool squared, normalize;
  double eps, mean;  // mean of the positive distances (used when normalize)
  int64_t pos_count;
  const void* grad_out;  // d loss / d psi (normalize) or d loss / d dist
  void* grad_gram;       // in/out: d loss / d G (not symmetrised) is added to it
};

// Huber between psi_s = dist_s / mean_s and psi_t = dist_t / mean_t over n x n entries.
struct DistanceHuberArgs {
  DType dtype;
  const void* dist_s;
  const void* dist_t;
  int64_t n;
  double inv_mean_s, inv_mean_t, delta, coef;  // coef scales the gradients (weight / n^2)
  double loss;                                  // out: sum of Huber values
  void* grad_psi_s;                             // out or null: coef * Huber'
  void* grad_psi_t;
};

// Angle Huber over the n^3 triplets of one group, with the sums its gradient needs (see rkd.cpp).
struct AngleArgs {
  DType dtype;
  const void* gram_s;
  const void* gram_t;
  int64_t n;
  double eps, delta, coef;  // coef scales the gradients (weight / n^3)
  double loss;              // out: sum of Huber values
  void* grad_gram_s;        // in/out or null: d loss / d G_s (not symmetrised) is added; n x n
  void* grad_gram_t;
};

// The kernel table of one ISA build; the main library selects one at import (csrc/kdfast.cpp).
struct Kernels {
  const char* isa;
  void (*softmax_kl)(const SoftmaxKLArgs&);
  void (*pdist)(PdistArgs&);
  void (*pdist_backward)(const PdistBackwardArgs&);
  void (*distance_huber)(DistanceHuberArgs&);
  void (*angle)(AngleArgs&);
  void (*feature_match)(const FeatureArgs&);
};

// The selected kernel build (the baseline until Python picks one). Main library only.
const Kernels& selected_kernels();

}  // namespace cpu
}  // namespace kdfast

extern "C" {
// Exported by each ISA library (and, as kdfast_cpu_kernels_default, by the main one).
typedef const kdfast::cpu::Kernels* (*kdfast_cpu_kernels_fn)();
}
