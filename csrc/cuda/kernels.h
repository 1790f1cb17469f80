#pragma once
// The CUDA kernels' host interface: raw pointers only, so the .cu files need none of the tensor
// headers (they compile in seconds) and the tensor glue lives in plain C++ (csrc/cuda/*_ops.cpp).
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/args.h"

namespace kdfast {
namespace cuda {

// Reads the KDFAST_CUDA_KL* tuning knobs again (they are read once; tests that switch paths call it).
void softmax_kl_reload_knobs();

// Scratch bytes that softmax_kl needs for these arguments on the current device (0 on most paths).
size_t softmax_kl_workspace(const kernel::SoftmaxKLArgs& a);

// Temperature softmax-KL, forward and gradients, on `stream` of the current device. Same contract as
// kernel::SoftmaxKLArgs (rows x V, unit stride along V, any row stride including 0). `workspace` holds
// softmax_kl_workspace(a) bytes. Never synchronises with the host.
cudaError_t softmax_kl(const kernel::SoftmaxKLArgs& a, void* workspace, cudaStream_t stream);

// grad[r, :] *= ratio[r * ratio_stride] for a contiguous rows x V gradient, skipping rows whose ratio
// is exactly 1. ratio has the accumulation type (double for double gradients, else float); stride 0
// reads one value for every row (an expanded scalar, as backward of a sum hands over).
cudaError_t scale_rows(kernel::DType dtype, void* grad, int64_t rows, int64_t vocab, const void* ratio,
                       int64_t ratio_stride, cudaStream_t stream);

// The per-shard passes of the vocab-parallel losses (kernel::ShardArgs contract, as the CPU's
// cpu::Kernels::softmax_kl_shard_stats / _pass), on `stream`: the statistics of each row's slice, or
// from the rows' global state its term sums (no gradient pointer; not KL) or its gradients. Never
// synchronise with the host.
cudaError_t softmax_kl_shard_stats(const kernel::ShardArgs& a, cudaStream_t stream);
cudaError_t softmax_kl_shard_pass(const kernel::ShardArgs& a, cudaStream_t stream);

// Feature matching (kernel::FeatureArgs contract). Squared error over rows longer than one chunk writes
// rows x feature_match_chunks(a) partial sums (acc type) into `partial` instead of loss_rows, for
// the caller to sum per row; otherwise `partial` is unused. `workspace` holds
// feature_match_workspace(a) bytes of scratch (cosine over long rows).
int64_t feature_match_chunks(const kernel::FeatureArgs& a);
size_t feature_match_workspace(const kernel::FeatureArgs& a);
cudaError_t feature_match(const kernel::FeatureArgs& a, void* partial, void* workspace, cudaStream_t stream);

// The top-k KL (kernel::SparseKLArgs contract), one CTA per row, on `stream`. The ids of a row are
// marked in a shared-memory bitmap of sparse_kl_smem(vocab) bytes, which must fit the device's
// per-block opt-in limit. Bad ids lower *a.status (device memory); never synchronises.
size_t sparse_kl_smem(int64_t vocab);
cudaError_t sparse_kl(const kernel::SparseKLArgs& a, cudaStream_t stream);

// ---- relational KD (B groups of n points; matrices (B, n, n) contiguous; D2 and the gradients
// d loss / d D2 in double, the angle loop's matrices in acc = Float or Double; per-group scalars
// are double device arrays of length B; eps per group in the units of the scaled points)

// D2 = |x_i - x_j|^2 from the differences of points (B, n, dim) in double.
cudaError_t rkd_sq_dists(const double* points, int64_t B, int64_t n, int64_t dim, double* d2, cudaStream_t stream);
// wide (B bools): the groups whose squared sides span more than rkd::kLowPartsSpan (rkd::D2Span),
// through part_max and part_min (B x rkd_span_parts(n) doubles of scratch).
int rkd_span_parts(int64_t n);
cudaError_t rkd_wide_span(const double* d2, int64_t B, int64_t n, double* part_max, double* part_min, bool* wide,
                          cudaStream_t stream);
// The angle loop's inputs of one side from D2: H = -D2 / 2 as hi + lo (see common/rkd.h; max_d2:
// each group's largest D2; in the wide groups with D2's low parts from the differences of points,
// (B, n, dim), as D2 was taken) and inv = 1 / max(side length, eps), 0 for zero-length sides.
cudaError_t rkd_angle_prep(kernel::DType acc, const double* d2, const double* max_d2, const double* eps,
                           const double* points, int64_t dim, const bool* wide, int64_t B, int64_t n, void* hi,
                           void* lo, void* inv, cudaStream_t stream);
// g (B, n, dim) of the wide groups := sum_j W_mj (x_m - x_j), W (B, n, n), from the points as given.
cudaError_t rkd_grad_wide(const double* W, const double* points, const bool* wide, int64_t B, int64_t n, int64_t dim,
                          double* g, cudaStream_t stream);
// Distances with D2 clamped at eps before the square root (squared: not rooted), 0 on the diagonal.
cudaError_t rkd_pdist(const double* d2, int64_t B, int64_t n, bool squared, const double* eps, double* dist,
                      cudaStream_t stream);
// d loss / d D2 of the distances from d loss / d (dist * inv_mean) minus k on the positive entries
// (k = sum(grad_out * dist) / (mean^2 count) when normalising, else 0 with inv_mean 1).
cudaError_t rkd_pdist_backward(const double* d2, const double* dist, const double* grad_out, const double* inv_mean,
                               const double* k, int64_t B, int64_t n, bool squared, const double* eps, double* m,
                               cudaStream_t stream);
// Per group: partial Huber sums (B x rkd_distance_blocks(n)) between psi_s and psi_t, and
// coef * Huber' into gps (and its negative into gpt), each optional.
int rkd_distance_blocks(int64_t n);
cudaError_t rkd_distance_huber(const double* ds, const double* dt, const double* inv_mean_s, const double* inv_mean_t,
                               const double* coef, int64_t B, int64_t n, double delta, double* partial, double* gps,
                               double* gpt, cudaStream_t stream);

struct RkdAngleArgs {
  kernel::DType acc;
  const void *hi_s, *lo_s, *hi_t, *lo_t;  // from rkd_angle_prep
  const void* inv_s;
  const void* inv_t;
  int64_t B, n;
  double delta;
  const double* coef;    // per group: weight / n^3; 0 gives that group no gradient
  double* loss_partial;  // B x rkd_angle_tiles(n): Huber sums per tile
  // Outputs (B, n, n), or null: A = sum_i gN, R = sum_k gN, S = sum_k h c, per side.
  void *a_s, *a_t, *r_s, *r_t, *s_s, *s_t;
};
int rkd_angle_tiles(int64_t n);
cudaError_t rkd_angle(const RkdAngleArgs& a, cudaStream_t stream);
// m = d loss / d D2 of the angle term of one side from its A, R, S (0 on the diagonal).
cudaError_t rkd_angle_grad(kernel::DType acc, const double* d2, const void* a, const void* r, const void* s,
                           const double* eps, int64_t B, int64_t n, double* m, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdfast
