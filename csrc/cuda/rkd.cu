// Relational KD kernels on CUDA: the squared distances, the n x n elementwise parts of the distance
// term and the tiled n^3 angle loop, in O(n^2) memory (see csrc/common/rkd.h and csrc/cpu/rkd.cpp
// for the math). The glue (csrc/cuda/rkd_ops.cpp) scales and centres the points, takes d loss / d D2
// back to them with ATen's matmul, and does the per-group reductions with ATen sums.
//
// Angle, with c_ijk the cosine at vertex i of (j, k), x = c_s - c_t, h = coef * Huber'(x) and
// gN_ijk = h / (n_ij n_ik):  A_jk = sum_i gN_ijk,  R_ij = sum_k gN_ijk,  S_ij = sum_k h c_ijk.
// Two kernels, each owning its output tile, so that every sum has one fixed order (deterministic,
// no atomics): angle_jk walks i for a (j, k) tile (loss and A), angle_ij walks k for an (i, j) tile
// (R and S). Both use that H and the inverse side lengths are symmetric.
#include <cstdint>

#include "common/rkd.h"
#include "cuda/compat.cuh"
#include "cuda/kernels.h"

namespace kdfast {
namespace cuda {
namespace {

using kernel::DType;

constexpr int kThreads = 256;

// Block reduction of a double with op (associative and commutative), result in thread 0.
template <typename Op>
__device__ __forceinline__ double block_reduce(double v, Op op) {
  KD_SHARED(double, red, [32]);
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  double r = red[0];
  if (threadIdx.x == 0) {
    for (int w = 1; w < nw; ++w) r = op(r, red[w]);
  }
  return r;
}

struct Plus {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct Max {
  __device__ double operator()(double a, double b) const { return a > b ? a : b; }
};
struct Min {
  __device__ double operator()(double a, double b) const { return a < b ? a : b; }
};

__device__ __forceinline__ double block_sum(double v) { return block_reduce(v, Plus{}); }

// ------------------------------------------------------------------ n x n elementwise kernels

constexpr int kSqTile = 16;  // (i, j) tile of sq_dists: one pair per thread
constexpr int kSqChunk = 32; // coordinates staged per step

// D2 = |x_i - x_j|^2 from the differences in double; both halves (the same bits: (a - b)^2 =
// (b - a)^2, summed in the same order), exact 0 on the diagonal.
__global__ void __launch_bounds__(kThreads) sq_dists_kernel(const double* x, int64_t n, int64_t dim, double* d2) {
  KD_SHARED(double, xi, [kSqTile][kSqChunk + 1]);
  KD_SHARED(double, xj, [kSqTile][kSqChunk + 1]);
  const int64_t b = blockIdx.z;
  const double* X = x + b * n * dim;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kSqTile, j0 = static_cast<int64_t>(blockIdx.x) * kSqTile;
  const int tx = threadIdx.x % kSqTile, ty = threadIdx.x / kSqTile;
  double acc = 0;
  for (int64_t c0 = 0; c0 < dim; c0 += kSqChunk) {
    __syncthreads();
    for (int e = threadIdx.x; e < kSqTile * kSqChunk; e += kThreads) {
      const int r = e / kSqChunk, c = e % kSqChunk;
      const bool okc = c0 + c < dim;
      xi[r][c] = (okc && i0 + r < n) ? X[(i0 + r) * dim + c0 + c] : 0.0;
      xj[r][c] = (okc && j0 + r < n) ? X[(j0 + r) * dim + c0 + c] : 0.0;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kSqChunk; ++c) {
      const double d = xi[ty][c] - xj[tx][c];
      acc = fma(d, d, acc);
    }
  }
  const int64_t i = i0 + ty, j = j0 + tx;
  if (i < n && j < n) d2[b * n * n + i * n + j] = i == j ? 0.0 : acc;
}

// The angle loop's inputs of one side: H = -D2 / 2 as hi + lo (with the group's quantum from its
// largest D2) and 1 / max(side length, eps), 0 for a zero-length side and on the diagonal.
// In the wide groups (rkd::D2Span::wide), D2's low parts come from the differences of the points x
// (B, n, dim) as given: n^2 dim more work for those groups alone.
template <typename A>
__global__ void angle_prep_kernel(const double* d2, const double* max_d2, const double* eps, const double* x,
                                  int64_t dim, const bool* wide, int64_t n, A* hi, A* lo, A* inv) {
  const int64_t nn = n * n, b = blockIdx.y;
  const double q = rkd::h_quantum(0.5 * max_d2[b]), e_b = eps[b];
  const double* X = wide[b] ? x + b * n * dim : nullptr;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < nn;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = b * nn + e, i = e / n;
    const double d2_lo = X ? rkd::d2_low_part(X + i * dim, X + (e - i * n) * dim, dim, d2[o]) : 0.0;
    rkd::split_h(d2[o], q, hi[o], lo[o], d2_lo);
    inv[o] = static_cast<A>(rkd::inv_side(d2[o], e_b));
  }
}

// Per block of a group's D2 entries: the largest (+inf for a group holding inf or NaN) and the
// smallest positive, for rkd_wide_span to combine.
__global__ void __launch_bounds__(kThreads) span_parts_kernel(const double* d2, int64_t n, double* part_max,
                                                              double* part_min) {
  const int64_t nn = n * n, b = blockIdx.y;
  rkd::D2Span span;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < nn;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    span.add(d2[b * nn + e]);
  const double mx = block_reduce(span.finite ? span.mx : INFINITY, Max{});
  const double mn = block_reduce(span.mn, Min{});
  if (threadIdx.x == 0) part_max[b * gridDim.x + blockIdx.x] = mx, part_min[b * gridDim.x + blockIdx.x] = mn;
}

// One thread per group: D2Span::wide of the merged parts.
__global__ void span_finish_kernel(const double* part_max, const double* part_min, int64_t B, int parts, bool* wide) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  rkd::D2Span span;
  for (int p = 0; p < parts; ++p) {
    span.mx = part_max[b * parts + p] > span.mx ? part_max[b * parts + p] : span.mx;
    span.mn = part_min[b * parts + p] < span.mn ? part_min[b * parts + p] : span.mn;
  }
  span.finite = span.mx < INFINITY;
  wide[b] = span.wide();
}

// g_m = sum_j W_mj (x_m - x_j) (one thread per coordinate of a point) in the wide groups; other
// groups' blocks return at once.
__global__ void __launch_bounds__(kThreads) grad_wide_kernel(const double* W, const double* x, const bool* wide,
                                                             int64_t n, int64_t dim, double* g) {
  const int64_t b = blockIdx.y;
  if (!wide[b]) return;
  const double* w = W + b * n * n;
  const double* X = x + b * n * dim;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n * dim;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = e / dim, k = e - m * dim;
    const double xm = X[e];
    double acc = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double wmj = w[m * n + j];
      if (j != m && wmj != 0) acc += wmj * (xm - X[j * dim + k]);
    }
    g[b * n * dim + e] = acc;
  }
}

// Distances clamped at eps (per group, before the square root), 0 on the diagonal.
__global__ void pdist_kernel(const double* d2, int64_t n, bool squared, const double* eps, double* dist) {
  const int64_t nn = n * n, b = blockIdx.y;
  const double e_b = eps[b];
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < nn;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / n, j = e - i * n;
    double d = 0;
    if (i != j) {
      double v = d2[b * nn + e];
      v = v < e_b ? e_b : v;  // clamp(min=eps); NaN stays NaN
      d = squared ? v : sqrt(v);
    }
    dist[b * nn + e] = d;
  }
}

// M = d loss / d D2 of the distance backward.
__global__ void pdist_backward_kernel(const double* d2, const double* dist, const double* gout, const double* inv_mean,
                                      const double* k, int64_t n, bool squared, const double* eps, double* M) {
  const int64_t nn = n * n, b = blockIdx.y;
  const double im = inv_mean[b], kk = k[b], e_b = eps[b];
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < nn;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / n, j = e - i * n, o = b * nn + e;
    const double gd = gout[o] * im - (dist[o] > 0 ? kk : 0.0);
    // a NaN 1 / mean: psi undefined (see rkd::pdist_grad_d2); inv_mean is 1 without normalize
    M[o] = j != i ? rkd::pdist_grad_d2(d2[o], dist[o], gd, e_b, squared, im != im) : 0.0;
  }
}

// Huber between psi_s = D_s / mean_s and psi_t = D_t / mean_t: partial loss sums per block and
// coef * Huber' as the gradient with respect to psi_s (and its negative for psi_t).
__global__ void distance_huber_kernel(const double* ds, const double* dt, const double* inv_ms, const double* inv_mt,
                                      const double* coef, int64_t nn, double delta, double* partial, double* gps,
                                      double* gpt) {
  const int64_t b = blockIdx.y;
  const double ims = inv_ms[b], imt = inv_mt[b], c = coef[b];
  double acc = 0;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < nn;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = b * nn + e;
    const double x = ds[o] * ims - dt[o] * imt;
    acc += rkd::huber(x, delta);
    const double g = c * rkd::huber_grad(x, delta);
    if (gps) gps[o] = g;
    if (gpt) gpt[o] = -g;
  }
  const double s = block_sum(acc);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = s;
}

// d loss / d D2 of the angle term from A, R, S: R - A / 2 through the numerator, -S / D2 through
// the side lengths where they are above eps (else clamped: no gradient); 0 on the diagonal.
template <typename A>
__global__ void angle_grad_kernel(const double* d2, const A* a, const A* r, const A* s, const double* eps, int64_t n,
                                  double* M) {
  const int64_t nn = n * n, b = blockIdx.y;
  const double e_b = eps[b];
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < nn;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / n, j = e - i * n, o = b * nn + e;
    double g = static_cast<double>(r[o]) - 0.5 * static_cast<double>(a[o]);
    if (rkd::side_unclamped(d2[o], e_b)) g -= static_cast<double>(s[o]) / d2[o];
    M[o] = i == j ? 0.0 : g;
  }
}

// ------------------------------------------------------------------ the n^3 angle loop

constexpr int kTile = 64;  // (j, k) tile of angle_jk; j tile of angle_ij
constexpr int kTileI = 32; // i tile of angle_ij

// Vertices (or k) staged in shared memory per step: 24 KB of rows for either type.
template <typename A>
struct Chunk {
  static constexpr int v = sizeof(A) == 8 ? 4 : 8;
};

template <typename A>
struct AngleParams {
  const A *hs, *ls, *ht, *lt;  // H = hi + lo, student and teacher
  const A* is;                 // inverse side lengths
  const A* it;
  const double* coef;  // per group: weight / n^3 (0: no gradient for the group)
  int64_t n;
  A delta;
  double* partial;  // per group and (j, k) tile: sum of Huber values
  A *as, *at, *rs, *rt, *ss, *st;  // outputs, or null
};

// Group b's n x n matrices (H as hi + lo and inverse side lengths, student and teacher) and scalars.
template <typename A>
struct AngleGroup {
  const A *Hs, *Ls, *Ht, *Lt, *Is, *It;
  A coef, delta;
  __device__ __forceinline__ AngleGroup(const AngleParams<A>& p, int64_t b, int64_t nn)
      : Hs(p.hs + b * nn), Ls(p.ls + b * nn), Ht(p.ht + b * nn), Lt(p.lt + b * nn), Is(p.is + b * nn),
        It(p.it + b * nn), coef(static_cast<A>(p.coef[b])), delta(p.delta) {}
  // row q of the six staged per index: H hi, H lo, inv (student), then the teacher's
  __device__ __forceinline__ const A* mat(int q) const {
    return q == 0 ? Hs : q == 1 ? Ls : q == 2 ? Is : q == 3 ? Ht : q == 4 ? Lt : It;
  }
};

// The numerator H_jk - H_ik - H_ij of the cosine at vertex i: the hi parts sum exactly (see
// common/rkd.h), then the lo parts are added. bh, bl: -H_ij's parts.
template <typename A>
__device__ __forceinline__ A numerator(A hjk, A ljk, A hik, A lik, A bh, A bl) {
  return ((hjk - hik) + bh) + ((ljk - lik) + bl);
}

// One (j, k) tile of 64 x 64 per block, 4 x 4 per thread; walks every vertex i.
template <typename A, bool kGrad>
__global__ void __launch_bounds__(kThreads) angle_jk_kernel(AngleParams<A> p) {
  constexpr int kC = Chunk<A>::v;
  KD_SHARED(A, sh, [kC][12][kTile]);  // per i: H hi, lo, inv (s, t) of (i, j) on the j tile, then of (i, k) on the k tile
  const int64_t n = p.n, nn = n * n, b = blockIdx.z;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile, k0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const AngleGroup<A> g(p, b, nn);
  const A coef = g.coef, delta = g.delta;
  const bool grad = kGrad && coef != A(0);

  A hjk_s[4][4], ljk_s[4][4], hjk_t[4][4], ljk_t[4][4], acc_s[4][4], acc_t[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t j = j0 + 4 * ty + a, k = k0 + 4 * tx + c;
      const bool ok = j < n && k < n;
      hjk_s[a][c] = ok ? g.Hs[j * n + k] : A(0);
      ljk_s[a][c] = ok ? g.Ls[j * n + k] : A(0);
      hjk_t[a][c] = ok ? g.Ht[j * n + k] : A(0);
      ljk_t[a][c] = ok ? g.Lt[j * n + k] : A(0);
      acc_s[a][c] = acc_t[a][c] = A(0);
    }
  }
  double loss = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kC) {
    __syncthreads();
    for (int e = threadIdx.x; e < kC * 12 * kTile; e += kThreads) {
      const int ii = e / (12 * kTile), q = (e / kTile) % 12, l = e % kTile;
      const int64_t i = i0 + ii, col = (q < 6 ? j0 : k0) + l;
      sh[ii][q][l] = (i < n && col < n) ? g.mat(q % 6)[i * n + col] : A(0);
    }
    __syncthreads();
    A part = 0;
#pragma unroll 1
    for (int ii = 0; ii < kC; ++ii) {
      A hij_s[4], lij_s[4], iij_s[4], hij_t[4], lij_t[4], iij_t[4];
      A hik_s[4], lik_s[4], iik_s[4], hik_t[4], lik_t[4], iik_t[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        hij_s[a] = sh[ii][0][4 * ty + a], lij_s[a] = sh[ii][1][4 * ty + a], iij_s[a] = sh[ii][2][4 * ty + a];
        hij_t[a] = sh[ii][3][4 * ty + a], lij_t[a] = sh[ii][4][4 * ty + a], iij_t[a] = sh[ii][5][4 * ty + a];
        hik_s[a] = sh[ii][6][4 * tx + a], lik_s[a] = sh[ii][7][4 * tx + a], iik_s[a] = sh[ii][8][4 * tx + a];
        hik_t[a] = sh[ii][9][4 * tx + a], lik_t[a] = sh[ii][10][4 * tx + a], iik_t[a] = sh[ii][11][4 * tx + a];
      }
#pragma unroll
      for (int a = 0; a < 4; ++a) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const A ws = iij_s[a] * iik_s[c], wt = iij_t[a] * iik_t[c];
          const A cs = numerator(hjk_s[a][c], ljk_s[a][c], hik_s[c], lik_s[c], -hij_s[a], -lij_s[a]) * ws;
          const A ct = numerator(hjk_t[a][c], ljk_t[a][c], hik_t[c], lik_t[c], -hij_t[a], -lij_t[a]) * wt;
          const A x = cs - ct;
          part += rkd::huber(x, delta);
          if (kGrad) {
            const A h = grad ? coef * rkd::huber_grad(x, delta) : A(0);
            acc_s[a][c] += h * ws;
            acc_t[a][c] -= h * wt;
          }
        }
      }
    }
    loss += static_cast<double>(part);
  }
  const double tile_loss = block_sum(loss);
  if (threadIdx.x == 0) p.partial[b * gridDim.x * gridDim.y + blockIdx.y * gridDim.x + blockIdx.x] = tile_loss;
  if constexpr (kGrad) {
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t j = j0 + 4 * ty + a, k = k0 + 4 * tx + c;
        if (j < n && k < n) {
          if (p.as) p.as[b * nn + j * n + k] = acc_s[a][c];
          if (p.at) p.at[b * nn + j * n + k] = acc_t[a][c];
        }
      }
    }
  }
}

// One (i, j) tile of 32 x 64 per block, 2 x 4 per thread; walks every k. Uses H_jk = H_kj and
// inv_ik = inv_ki to read rows k only.
template <typename A>
__global__ void __launch_bounds__(kThreads) angle_ij_kernel(AngleParams<A> p) {
  constexpr int kC = Chunk<A>::v;
  KD_SHARED(A, sh, [kC][4][kTile]);    // per k: H_kj hi, lo (s, t) on the j tile
  KD_SHARED(A, shi, [kC][6][kTileI]);  // per k: H_ki hi, lo, inv_ki (s, t) on the i tile
  const int64_t n = p.n, nn = n * n, b = blockIdx.z;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTileI, j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const AngleGroup<A> g(p, b, nn);
  const A coef = g.coef, delta = g.delta;
  const bool grad = coef != A(0);

  A bh_s[2][4], bl_s[2][4], bh_t[2][4], bl_t[2][4], ws_ij[2][4], wt_ij[2][4];
  A r_s[2][4], r_t[2][4], s_s[2][4], s_t[2][4];
#pragma unroll
  for (int a = 0; a < 2; ++a) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t i = i0 + 2 * ty + a, j = j0 + 4 * tx + c;
      const bool ok = i < n && j < n;
      bh_s[a][c] = ok ? -g.Hs[i * n + j] : A(0);
      bl_s[a][c] = ok ? -g.Ls[i * n + j] : A(0);
      bh_t[a][c] = ok ? -g.Ht[i * n + j] : A(0);
      bl_t[a][c] = ok ? -g.Lt[i * n + j] : A(0);
      ws_ij[a][c] = ok ? g.Is[i * n + j] : A(0);
      wt_ij[a][c] = ok ? g.It[i * n + j] : A(0);
      r_s[a][c] = r_t[a][c] = s_s[a][c] = s_t[a][c] = A(0);
    }
  }
  // A group of weight 0 skips the walk and stores its zero accumulators (grad is block-uniform: no
  // barrier is skipped).
  for (int64_t k0 = 0; grad && k0 < n; k0 += kC) {
    __syncthreads();
    for (int e = threadIdx.x; e < kC * 4 * kTile; e += kThreads) {
      const int kk = e / (4 * kTile), q = (e / kTile) % 4, l = e % kTile;
      const int64_t k = k0 + kk, col = j0 + l;
      const A* src = q == 0 ? g.Hs : q == 1 ? g.Ls : q == 2 ? g.Ht : g.Lt;
      sh[kk][q][l] = (k < n && col < n) ? src[k * n + col] : A(0);
    }
    for (int e = threadIdx.x; e < kC * 6 * kTileI; e += kThreads) {
      const int kk = e / (6 * kTileI), q = (e / kTileI) % 6, l = e % kTileI;
      const int64_t k = k0 + kk, col = i0 + l;
      shi[kk][q][l] = (k < n && col < n) ? g.mat(q)[k * n + col] : A(0);
    }
    __syncthreads();
#pragma unroll 2
    for (int kk = 0; kk < kC; ++kk) {
      A hjk_s[4], ljk_s[4], hjk_t[4], ljk_t[4], hik_s[2], lik_s[2], iik_s[2], hik_t[2], lik_t[2], iik_t[2];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        hjk_s[c] = sh[kk][0][4 * tx + c], ljk_s[c] = sh[kk][1][4 * tx + c];
        hjk_t[c] = sh[kk][2][4 * tx + c], ljk_t[c] = sh[kk][3][4 * tx + c];
      }
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        hik_s[a] = shi[kk][0][2 * ty + a], lik_s[a] = shi[kk][1][2 * ty + a], iik_s[a] = shi[kk][2][2 * ty + a];
        hik_t[a] = shi[kk][3][2 * ty + a], lik_t[a] = shi[kk][4][2 * ty + a], iik_t[a] = shi[kk][5][2 * ty + a];
      }
#pragma unroll
      for (int a = 0; a < 2; ++a) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const A ws = ws_ij[a][c] * iik_s[a], wt = wt_ij[a][c] * iik_t[a];
          const A cs = numerator(hjk_s[c], ljk_s[c], hik_s[a], lik_s[a], bh_s[a][c], bl_s[a][c]) * ws;
          const A ct = numerator(hjk_t[c], ljk_t[c], hik_t[a], lik_t[a], bh_t[a][c], bl_t[a][c]) * wt;
          const A h = coef * rkd::huber_grad(cs - ct, delta);
          r_s[a][c] += h * ws;
          r_t[a][c] -= h * wt;
          s_s[a][c] += h * cs;
          s_t[a][c] -= h * ct;
        }
      }
    }
  }
#pragma unroll
  for (int a = 0; a < 2; ++a) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t i = i0 + 2 * ty + a, j = j0 + 4 * tx + c;
      if (i < n && j < n) {
        const int64_t o = b * nn + i * n + j;
        if (p.rs) p.rs[o] = r_s[a][c], p.ss[o] = s_s[a][c];
        if (p.rt) p.rt[o] = r_t[a][c], p.st[o] = s_t[a][c];
      }
    }
  }
}

// ------------------------------------------------------------------ host side

dim3 elementwise_grid(int64_t B, int64_t nn) {
  const int64_t blocks = (nn + kThreads - 1) / kThreads;
  return dim3(static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096), static_cast<unsigned>(B));
}

template <typename F>
cudaError_t by_acc(DType acc, F&& f) {
  return acc == DType::Double ? f(double{}) : f(float{});
}

}  // namespace

cudaError_t rkd_sq_dists(const double* points, int64_t B, int64_t n, int64_t dim, double* d2, cudaStream_t stream) {
  if (B == 0 || n == 0) return cudaSuccess;  // no groups: no launch (a 0-sized grid is an error)
  const unsigned t = static_cast<unsigned>((n + kSqTile - 1) / kSqTile);
  KD_LAUNCH(dim3(t, t, static_cast<unsigned>(B)), kThreads, 0, stream, sq_dists_kernel)(points, n, dim, d2);
  return cudaGetLastError();
}

cudaError_t rkd_angle_prep(DType acc, const double* d2, const double* max_d2, const double* eps, const double* points,
                           int64_t dim, const bool* wide, int64_t B, int64_t n, void* hi, void* lo, void* inv,
                           cudaStream_t stream) {
  if (B == 0 || n == 0) return cudaSuccess;
  return by_acc(acc, [&](auto tag) {
    using A = decltype(tag);
    KD_LAUNCH(elementwise_grid(B, n * n), kThreads, 0, stream, angle_prep_kernel<A>)(
        d2, max_d2, eps, points, dim, wide, n, static_cast<A*>(hi), static_cast<A*>(lo), static_cast<A*>(inv));
    return cudaGetLastError();
  });
}

int rkd_span_parts(int64_t n) { return static_cast<int>(elementwise_grid(1, n * n).x); }

cudaError_t rkd_wide_span(const double* d2, int64_t B, int64_t n, double* part_max, double* part_min, bool* wide,
                          cudaStream_t stream) {
  if (B == 0 || n == 0) return cudaSuccess;
  const dim3 grid = elementwise_grid(B, n * n);
  KD_LAUNCH(grid, kThreads, 0, stream, span_parts_kernel)(d2, n, part_max, part_min);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const unsigned blocks = static_cast<unsigned>((B + kThreads - 1) / kThreads);
  KD_LAUNCH(dim3(blocks), kThreads, 0, stream, span_finish_kernel)(part_max, part_min, B, static_cast<int>(grid.x),
                                                                   wide);
  return cudaGetLastError();
}

cudaError_t rkd_grad_wide(const double* W, const double* points, const bool* wide, int64_t B, int64_t n, int64_t dim,
                          double* g, cudaStream_t stream) {
  if (B == 0 || n == 0 || dim == 0) return cudaSuccess;
  KD_LAUNCH(elementwise_grid(B, n * dim), kThreads, 0, stream, grad_wide_kernel)(W, points, wide, n, dim, g);
  return cudaGetLastError();
}

cudaError_t rkd_pdist(const double* d2, int64_t B, int64_t n, bool squared, const double* eps, double* dist,
                      cudaStream_t stream) {
  if (B == 0 || n == 0) return cudaSuccess;
  KD_LAUNCH(elementwise_grid(B, n * n), kThreads, 0, stream, pdist_kernel)(d2, n, squared, eps, dist);
  return cudaGetLastError();
}

cudaError_t rkd_pdist_backward(const double* d2, const double* dist, const double* grad_out, const double* inv_mean,
                               const double* k, int64_t B, int64_t n, bool squared, const double* eps, double* m,
                               cudaStream_t stream) {
  if (B == 0 || n == 0) return cudaSuccess;
  KD_LAUNCH(elementwise_grid(B, n * n), kThreads, 0, stream, pdist_backward_kernel)(d2, dist, grad_out, inv_mean, k,
                                                                                      n, squared, eps, m);
  return cudaGetLastError();
}

int rkd_distance_blocks(int64_t n) { return static_cast<int>(elementwise_grid(1, n * n).x); }

cudaError_t rkd_distance_huber(const double* ds, const double* dt, const double* inv_mean_s, const double* inv_mean_t,
                               const double* coef, int64_t B, int64_t n, double delta, double* partial, double* gps,
                               double* gpt, cudaStream_t stream) {
  if (B == 0 || n == 0) return cudaSuccess;
  KD_LAUNCH(elementwise_grid(B, n * n), kThreads, 0, stream, distance_huber_kernel)(
      ds, dt, inv_mean_s, inv_mean_t, coef, n * n, delta, partial, gps, gpt);
  return cudaGetLastError();
}

int rkd_angle_tiles(int64_t n) {
  const int64_t t = (n + kTile - 1) / kTile;
  return static_cast<int>(t * t);
}

cudaError_t rkd_angle(const RkdAngleArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.n == 0) return cudaSuccess;
  return by_acc(a.acc, [&](auto tag) {
    using A = decltype(tag);
    AngleParams<A> p;
    p.hs = static_cast<const A*>(a.hi_s), p.ls = static_cast<const A*>(a.lo_s);
    p.ht = static_cast<const A*>(a.hi_t), p.lt = static_cast<const A*>(a.lo_t);
    p.is = static_cast<const A*>(a.inv_s), p.it = static_cast<const A*>(a.inv_t);
    p.coef = a.coef;
    p.n = a.n;
    p.delta = static_cast<A>(a.delta);
    p.partial = a.loss_partial;
    p.as = static_cast<A*>(a.a_s), p.at = static_cast<A*>(a.a_t);
    p.rs = static_cast<A*>(a.r_s), p.rt = static_cast<A*>(a.r_t);
    p.ss = static_cast<A*>(a.s_s), p.st = static_cast<A*>(a.s_t);
    const unsigned t = static_cast<unsigned>((a.n + kTile - 1) / kTile);
    const bool grad = p.as != nullptr || p.at != nullptr;
    const dim3 grid_jk(t, t, static_cast<unsigned>(a.B));
    if (grad) KD_LAUNCH(grid_jk, kThreads, 0, stream, angle_jk_kernel<A, true>)(p);
    else KD_LAUNCH(grid_jk, kThreads, 0, stream, angle_jk_kernel<A, false>)(p);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess || !grad) return e;
    const dim3 grid_ij(static_cast<unsigned>((a.n + kTileI - 1) / kTileI), t, static_cast<unsigned>(a.B));
    KD_LAUNCH(grid_ij, kThreads, 0, stream, angle_ij_kernel<A>)(p);
    return cudaGetLastError();
  });
}

cudaError_t rkd_angle_grad(DType acc, const double* d2, const void* a, const void* r, const void* s, const double* eps,
                           int64_t B, int64_t n, double* m, cudaStream_t stream) {
  if (B == 0 || n == 0) return cudaSuccess;
  return by_acc(acc, [&](auto tag) {
    using A = decltype(tag);
    KD_LAUNCH(elementwise_grid(B, n * n), kThreads, 0, stream, angle_grad_kernel<A>)(
        d2, static_cast<const A*>(a), static_cast<const A*>(r), static_cast<const A*>(s), eps, n, m);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdfast
