#pragma once
// The tuning constants of kdfast's C++ and CUDA code, in one place (the Python ones are in
// kdfast/_tuning.py). Each names the bench case whose plan or speed it decides: the CPU cases of
// `python -m bench` (bench/results/<machine>/table.md) and the GPU cases of bench/gpu_check.py
// (KL_CASES; bench/results/gpu-*). Figures live there and in commit messages, not here. Constants
// that shape a kernel rather than tune it (threads per block, tile sizes tied to a shared-memory
// layout, vector widths) stay beside their kernels.
#include <cstddef>
#include <cstdint>

namespace kdfast {
namespace tuning {

// ---------------------------------------------------------------- CPU: parallel grains
// A parallel task holds at least this many elements (cpu::rows_per_task): below it an OpenMP
// fork/join costs more than the work it shares. Softmax-KL rows ("KD 128x100 fp32",
// "KD 256x1000 fp32"), feature-matching rows ("logit_mse 2048x4096", "cosine 8192x768") and the
// scale_rows_ pass ("0.5 x KD 2048x32000 fp32").
constexpr int64_t kKLRowGrain = 8192;
constexpr int64_t kFeatureRowGrain = 16384;
constexpr int64_t kScaleRowsGrain = 32768;

// ---------------------------------------------------------------- CPU: softmax-KL
// Rows are split into chunks of kKLSplitChunk elements (partial maxima and sums combined in chunk
// order) when there are fewer than kKLSplitFewRows rows of at least two chunks, or when a row is
// longer than kKLSplitRowsAbove ("KD 256x131072 fp32"; the vocabulary sweep 256 x 4096..131072).
constexpr int64_t kKLSplitChunk = int64_t(1) << 15;
constexpr int64_t kKLSplitFewRows = 16;
constexpr int64_t kKLSplitRowsAbove = int64_t(1) << 20;
// Elements of a row processed per block while it sits in L1, the next block prefetched meanwhile
// ("KD 2048x32000 fp32").
constexpr int64_t kKLBlock = 2048;
// How far ahead of its stores the gradient pass prefetches its destination, in bytes
// ("KD 2048x32000 fp32").
constexpr int64_t kKLWriteAheadBytes = 2048;

// ---------------------------------------------------------------- CPU: feature matching
// Rows are split into chunks of this many elements across tasks ("logit_mse 2048x4096").
constexpr int64_t kFeatureSplitChunk = int64_t(1) << 15;

// ---------------------------------------------------------------- CPU: memory
// Outputs of at least this many bytes are written with non-temporal stores: nothing reads them soon
// ("KD 2048x32000 fp32", "KD 256x131072 fp32", "logit_mse 2048x4096"). Smaller ones stay in cache.
constexpr int64_t kStreamBytes = int64_t(8) << 20;
// Outputs of at least kCachedBytes come from the block cache (cpu/alloc.cpp) instead of malloc's
// heap ("KD 256x1000 fp32"); from kHugeBytes on they are 2 MB-aligned and advised for transparent
// huge pages ("KD 2048x32000 fp32").
constexpr size_t kCachedBytes = size_t(64) << 10;
constexpr size_t kHugeBytes = size_t(8) << 20;

// ---------------------------------------------------------------- CPU: relation ops
// The ATen steps around the relation kernels run on one thread below this many elements, where a
// parallel region's start costs more than the work ("RKD N=64 D=512").
constexpr int64_t kRelationSerialBelow = int64_t(1) << 20;

// ---------------------------------------------------------------- CUDA: softmax-KL plan
// Shared memory held back from a CTA's budget for static shared memory and the per-block reservation.
constexpr int64_t kSmemReserve = 4096;
// Few rows are spread over clusters of up to this many CTAs (256 x 128256: 256 rows on 132 SMs) ...
constexpr int kMaxSpreadCluster = 8;
// ... while the rows times the cluster size stay below this many CTAs per SM (256 x 128256) ...
constexpr int kSpreadCtasPerSm = 2;
// ... and each slice keeps at least this many elements (256 x 1000 stays one CTA a row).
constexpr int64_t kMinSpreadSlice = 8192;
// Fallback paths: rows longer than this are chunked (8192 x 131072 without clusters) ...
constexpr int64_t kChunkRowsAbove = 32768;
// ... as are rows longer than this when there are fewer rows than SMs (256 x 128256 on pre-sm_90).
constexpr int64_t kChunkFewRowsAbove = 8192;
// Chunk lengths of the chunks path for long rows (8192 x 131072) and for the rest (256 x 128256).
constexpr int64_t kLongRowChunk = 16384;
constexpr int64_t kShortRowChunk = 4096;
// scale_rows_: chunk length, and the blocks per SM that few rows are cut into (256 x 128256 backward).
constexpr int64_t kScaleChunk = 16384;
constexpr int64_t kScaleBlocksPerSm = 4;

// ---------------------------------------------------------------- CUDA: feature matching
// Squared error: elements per warp; cosine rows longer than kCosChunk are split across warps
// (gpu_check's logit_mse and cosine cases).
constexpr int64_t kSqChunk = 4096;
constexpr int64_t kCosChunk = 8192;

}  // namespace tuning
}  // namespace kdfast
