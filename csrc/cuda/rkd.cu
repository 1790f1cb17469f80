// Relational KD kernels on CUDA: the n x n elementwise parts of the distance term and the tiled
// n^3 angle loop, in O(n^2) memory, from Gram matrices (see csrc/common/rkd.h and csrc/cpu/rkd.cpp
// for the math). The glue (csrc/cuda/rkd_ops.cpp) centres the points, forms the Gram matrices and
// the final products with ATen's matmul, and does the per-group reductions with ATen sums.
//
// Angle, with c_ijk the cosine at vertex i of (j, k), x = c_s - c_t, h = coef * Huber'(x) and
// gN_ijk = h / (n_ij n_ik):  A_jk = sum_i gN_ijk,  R_ij = sum_k gN_ijk,  S_ij = sum_k h c_ijk.
// Two kernels, each owning its output tile, so that every sum has one fixed order (deterministic,
// no atomics): angle_jk walks i for a (j, k) tile (loss and A), angle_ij walks k for an (i, j) tile
// (R and S). Both use that G and the inverse side lengths are symmetric.
#include <cstdint>

#include "common/rkd.h"
#include "cuda/compat.cuh"
#include "cuda/kernels.h"

namespace kdfast {
namespace cuda {
namespace {

using kernel::DType;

constexpr int kThreads = 256;

template <typename A>
__device__ __forceinline__ A side_sq(const A* G, int64_t n, int64_t i, int64_t j) {
  if (i == j) return A(0);
  return rkd::sq_dist(G[i * n + i], G[j * n + j], G[i * n + j], rkd::gram_noise<A>());
}

// Block sum of a double, result in thread 0.
__device__ __forceinline__ double block_sum(double v) {
  KD_SHARED(double, red, [32]);
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  double r = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < nw; ++w) r += red[w];
  }
  return r;
}

// ------------------------------------------------------------------ n x n elementwise kernels

// inv[b, i, j] = 1 / max(|x_j - x_i|, eps), 0 for a zero-length side (and on the diagonal).
template <typename A>
__global__ void inv_sides_kernel(const A* gram, int64_t n, A eps, A* inv) {
  const int64_t nn = n * n;
  const A* G = gram + blockIdx.y * nn;
  A* out = inv + blockIdx.y * nn;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < nn;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / n, j = e - i * n;
    out[e] = rkd::inv_side(side_sq(G, n, i, j), eps);
  }
}

// Distances clamped at eps (before the square root), 0 on the diagonal.
template <typename A>
__global__ void pdist_kernel(const A* gram, int64_t n, bool squared, A eps, A* dist) {
  const int64_t nn = n * n;
  const A* G = gram + blockIdx.y * nn;
  A* D = dist + blockIdx.y * nn;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < nn;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / n, j = e - i * n;
    A d = 0;
    if (i != j) {
      A v = side_sq(G, n, i, j);
      v = v < eps ? eps : v;  // clamp(min=eps); NaN stays NaN
      d = squared ? v : sqrt(v);
    }
    D[e] = d;
  }
}

// M = d loss / d D2 of the distance backward (add_sqdist_grad turns it into d loss / d G).
template <typename A>
__global__ void pdist_backward_kernel(const A* gram, const A* dist, const A* gout, const double* inv_mean,
                                      const double* k, int64_t n, bool squared, A eps, A* M) {
  const int64_t nn = n * n, b = blockIdx.y;
  const A* G = gram + b * nn;
  const A* D = dist + b * nn;
  const A* go = gout + b * nn;
  A* out = M + b * nn;
  const A im = static_cast<A>(inv_mean[b]);
  const A kk = static_cast<A>(k[b]);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < nn;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / n, j = e - i * n;
    const A gd = go[e] * im - (D[e] > A(0) ? kk : A(0));
    const A v = side_sq(G, n, i, j);
    out[e] = (j != i && v > eps) ? (squared ? gd : gd / (A(2) * D[e])) : A(0);
  }
}

// Huber between psi_s = D_s / mean_s and psi_t = D_t / mean_t: partial loss sums per block and
// coef * Huber' as the gradient with respect to psi_s (and its negative for psi_t).
template <typename A>
__global__ void distance_huber_kernel(const A* ds, const A* dt, const double* inv_ms, const double* inv_mt,
                                      const double* coef, int64_t nn, A delta, double* partial, A* gps, A* gpt) {
  const int64_t b = blockIdx.y;
  const A ims = static_cast<A>(inv_ms[b]), imt = static_cast<A>(inv_mt[b]), c = static_cast<A>(coef[b]);
  double acc = 0;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < nn;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = b * nn + e;
    const A x = ds[o] * ims - dt[o] * imt;
    acc += static_cast<double>(rkd::huber(x, delta));
    const A g = c * rkd::huber_grad(x, delta);
    if (gps) gps[o] = g;
    if (gpt) gpt[o] = -g;
  }
  const double s = block_sum(acc);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = s;
}

// S -> M in place: M_ab = -S_ab / n_ab^2 where the side length is above eps (else it is clamped
// and carries no gradient).
template <typename A>
__global__ void angle_side_kernel(const A* gram, const A* inv, int64_t n, A eps, A* S) {
  const int64_t nn = n * n, b = blockIdx.y;
  const A* G = gram + b * nn;
  const A* I = inv + b * nn;
  A* out = S + b * nn;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < nn;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t a = e / n, c = e - a * n;
    const A d2 = side_sq(G, n, a, c);
    out[e] = (d2 > A(0) && sqrt(d2) > eps) ? -out[e] * I[e] * I[e] : A(0);
  }
}

// ------------------------------------------------------------------ the n^3 angle loop

constexpr int kTile = 64;  // (j, k) tile of angle_jk; j tile of angle_ij
constexpr int kTileI = 32; // i tile of angle_ij
constexpr int kChunk = 8;  // vertices (or k) staged in shared memory per step

template <typename A>
struct AngleParams {
  const A* gs;
  const A* gt;
  const A* is;  // inverse side lengths
  const A* it;
  const double* coef;  // per group: weight / n^3 (0: no gradient for the group)
  int64_t n;
  A delta;
  double* partial;  // per group and (j, k) tile: sum of Huber values
  A *as, *at, *rs, *rt, *ss, *st;  // outputs, or null
};

// Group b's n x n matrices (Gram and inverse side lengths, student and teacher) and scalars.
template <typename A>
struct AngleGroup {
  const A *Gs, *Gt, *Is, *It;
  A coef, delta;
  __device__ __forceinline__ AngleGroup(const AngleParams<A>& p, int64_t b, int64_t nn)
      : Gs(p.gs + b * nn), Gt(p.gt + b * nn), Is(p.is + b * nn), It(p.it + b * nn),
        coef(static_cast<A>(p.coef[b])), delta(p.delta) {}
};

// One (j, k) tile of 64 x 64 per block, 4 x 4 per thread; walks every vertex i.
template <typename A, bool kGrad>
__global__ void __launch_bounds__(kThreads) angle_jk_kernel(AngleParams<A> p) {
  KD_SHARED(A, sh, [kChunk][8][kTile]);  // per i: G_ij, inv_ij (s, t) on the j tile; G_ik, inv_ik on the k tile
  KD_SHARED(A, shd, [kChunk][2]);        // G_ii (s, t)
  const int64_t n = p.n, nn = n * n, b = blockIdx.z;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile, k0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const AngleGroup<A> g(p, b, nn);
  const A *Gs = g.Gs, *Gt = g.Gt, *Is = g.Is, *It = g.It;
  const A coef = g.coef, delta = g.delta;
  const bool grad = kGrad && coef != A(0);

  A gjk_s[4][4], gjk_t[4][4], acc_s[4][4], acc_t[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t j = j0 + 4 * ty + a, k = k0 + 4 * tx + c;
      const bool ok = j < n && k < n;
      gjk_s[a][c] = ok ? Gs[j * n + k] : A(0);
      gjk_t[a][c] = ok ? Gt[j * n + k] : A(0);
      acc_s[a][c] = acc_t[a][c] = A(0);
    }
  }
  double loss = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    __syncthreads();
    for (int e = threadIdx.x; e < kChunk * 8 * kTile; e += kThreads) {
      const int ii = e / (8 * kTile), q = (e / kTile) % 8, l = e % kTile;
      const int64_t i = i0 + ii, col = (q < 4 ? j0 : k0) + l;
      const A* src = (q & 3) == 0 ? Gs : (q & 3) == 1 ? Is : (q & 3) == 2 ? Gt : It;
      sh[ii][q][l] = (i < n && col < n) ? src[i * n + col] : A(0);
    }
    if (threadIdx.x < 2 * kChunk) {
      const int ii = threadIdx.x >> 1;
      const int64_t i = i0 + ii;
      shd[ii][threadIdx.x & 1] = i < n ? ((threadIdx.x & 1) ? Gt : Gs)[i * n + i] : A(0);
    }
    __syncthreads();
    A part = 0;
#pragma unroll 1
    for (int ii = 0; ii < kChunk; ++ii) {
      A gij_s[4], iij_s[4], gij_t[4], iij_t[4], gik_s[4], iik_s[4], gik_t[4], iik_t[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        gij_s[a] = sh[ii][0][4 * ty + a], iij_s[a] = sh[ii][1][4 * ty + a];
        gij_t[a] = sh[ii][2][4 * ty + a], iij_t[a] = sh[ii][3][4 * ty + a];
        gik_s[a] = sh[ii][4][4 * tx + a], iik_s[a] = sh[ii][5][4 * tx + a];
        gik_t[a] = sh[ii][6][4 * tx + a], iik_t[a] = sh[ii][7][4 * tx + a];
      }
      const A gii_s = shd[ii][0], gii_t = shd[ii][1];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        const A bs = gii_s - gij_s[a], bt = gii_t - gij_t[a];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const A ws = iij_s[a] * iik_s[c], wt = iij_t[a] * iik_t[c];
          const A cs = (gjk_s[a][c] - gik_s[c] + bs) * ws;
          const A ct = (gjk_t[a][c] - gik_t[c] + bt) * wt;
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

// One (i, j) tile of 32 x 64 per block, 2 x 4 per thread; walks every k. Uses G_jk = G_kj and
// inv_ik = inv_ki to read rows k only.
template <typename A>
__global__ void __launch_bounds__(kThreads) angle_ij_kernel(AngleParams<A> p) {
  KD_SHARED(A, sh, [kChunk][2][kTile]);    // per k: G_kj (s, t) on the j tile
  KD_SHARED(A, shi, [kChunk][4][kTileI]);  // per k: G_ki, inv_ki (s, t) on the i tile
  const int64_t n = p.n, nn = n * n, b = blockIdx.z;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTileI, j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const AngleGroup<A> g(p, b, nn);
  const A *Gs = g.Gs, *Gt = g.Gt, *Is = g.Is, *It = g.It;
  const A coef = g.coef, delta = g.delta;
  const bool grad = coef != A(0);

  A bs[2][4], bt[2][4], ws_ij[2][4], wt_ij[2][4], r_s[2][4], r_t[2][4], s_s[2][4], s_t[2][4];
#pragma unroll
  for (int a = 0; a < 2; ++a) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t i = i0 + 2 * ty + a, j = j0 + 4 * tx + c;
      const bool ok = i < n && j < n;
      bs[a][c] = ok ? Gs[i * n + i] - Gs[i * n + j] : A(0);
      bt[a][c] = ok ? Gt[i * n + i] - Gt[i * n + j] : A(0);
      ws_ij[a][c] = ok ? Is[i * n + j] : A(0);
      wt_ij[a][c] = ok ? It[i * n + j] : A(0);
      r_s[a][c] = r_t[a][c] = s_s[a][c] = s_t[a][c] = A(0);
    }
  }
  // A group of weight 0 skips the walk and stores its zero accumulators (grad is block-uniform: no
  // barrier is skipped).
  for (int64_t k0 = 0; grad && k0 < n; k0 += kChunk) {
    __syncthreads();
    for (int e = threadIdx.x; e < kChunk * 2 * kTile; e += kThreads) {
      const int kk = e / (2 * kTile), q = (e / kTile) % 2, l = e % kTile;
      const int64_t k = k0 + kk, col = j0 + l;
      sh[kk][q][l] = (k < n && col < n) ? (q ? Gt : Gs)[k * n + col] : A(0);
    }
    for (int e = threadIdx.x; e < kChunk * 4 * kTileI; e += kThreads) {
      const int kk = e / (4 * kTileI), q = (e / kTileI) % 4, l = e % kTileI;
      const int64_t k = k0 + kk, col = i0 + l;
      const A* src = q == 0 ? Gs : q == 1 ? Is : q == 2 ? Gt : It;
      shi[kk][q][l] = (k < n && col < n) ? src[k * n + col] : A(0);
    }
    __syncthreads();
#pragma unroll 2
    for (int kk = 0; kk < kChunk; ++kk) {
      A gjk_s[4], gjk_t[4], gik_s[2], iik_s[2], gik_t[2], iik_t[2];
#pragma unroll
      for (int c = 0; c < 4; ++c) gjk_s[c] = sh[kk][0][4 * tx + c], gjk_t[c] = sh[kk][1][4 * tx + c];
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        gik_s[a] = shi[kk][0][2 * ty + a], iik_s[a] = shi[kk][1][2 * ty + a];
        gik_t[a] = shi[kk][2][2 * ty + a], iik_t[a] = shi[kk][3][2 * ty + a];
      }
#pragma unroll
      for (int a = 0; a < 2; ++a) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const A ws = ws_ij[a][c] * iik_s[a], wt = wt_ij[a][c] * iik_t[a];
          const A cs = (gjk_s[c] - gik_s[a] + bs[a][c]) * ws;
          const A ct = (gjk_t[c] - gik_t[a] + bt[a][c]) * wt;
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

cudaError_t rkd_inv_sides(DType acc, const void* gram, int64_t B, int64_t n, double eps, void* inv, cudaStream_t stream) {
  if (B == 0 || n == 0) return cudaSuccess;  // no groups: no launch (a 0-sized grid is an error)
  return by_acc(acc, [&](auto tag) {
    using A = decltype(tag);
    KD_LAUNCH(elementwise_grid(B, n * n), kThreads, 0, stream, inv_sides_kernel<A>)(
        static_cast<const A*>(gram), n, static_cast<A>(eps), static_cast<A*>(inv));
    return cudaGetLastError();
  });
}

cudaError_t rkd_pdist(DType acc, const void* gram, int64_t B, int64_t n, bool squared, double eps, void* dist,
                      cudaStream_t stream) {
  if (B == 0 || n == 0) return cudaSuccess;  // no groups: no launch (a 0-sized grid is an error)
  return by_acc(acc, [&](auto tag) {
    using A = decltype(tag);
    KD_LAUNCH(elementwise_grid(B, n * n), kThreads, 0, stream, pdist_kernel<A>)(
        static_cast<const A*>(gram), n, squared, static_cast<A>(eps), static_cast<A*>(dist));
    return cudaGetLastError();
  });
}

cudaError_t rkd_pdist_backward(DType acc, const void* gram, const void* dist, const void* grad_out,
                               const double* inv_mean, const double* k, int64_t B, int64_t n, bool squared,
                               double eps, void* m, cudaStream_t stream) {
  if (B == 0 || n == 0) return cudaSuccess;  // no groups: no launch (a 0-sized grid is an error)
  return by_acc(acc, [&](auto tag) {
    using A = decltype(tag);
    KD_LAUNCH(elementwise_grid(B, n * n), kThreads, 0, stream, pdist_backward_kernel<A>)(
        static_cast<const A*>(gram), static_cast<const A*>(dist), static_cast<const A*>(grad_out), inv_mean, k, n,
        squared, static_cast<A>(eps), static_cast<A*>(m));
    return cudaGetLastError();
  });
}

int rkd_distance_blocks(int64_t n) { return static_cast<int>(elementwise_grid(1, n * n).x); }

cudaError_t rkd_distance_huber(DType acc, const void* ds, const void* dt, const double* inv_mean_s,
                               const double* inv_mean_t, const double* coef, int64_t B, int64_t n, double delta,
                               double* partial, void* gps, void* gpt, cudaStream_t stream) {
  if (B == 0 || n == 0) return cudaSuccess;  // no groups: no launch (a 0-sized grid is an error)
  return by_acc(acc, [&](auto tag) {
    using A = decltype(tag);
    KD_LAUNCH(elementwise_grid(B, n * n), kThreads, 0, stream, distance_huber_kernel<A>)(
        static_cast<const A*>(ds), static_cast<const A*>(dt), inv_mean_s, inv_mean_t, coef, n * n,
        static_cast<A>(delta), partial, static_cast<A*>(gps), static_cast<A*>(gpt));
    return cudaGetLastError();
  });
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
    p.gs = static_cast<const A*>(a.gram_s), p.gt = static_cast<const A*>(a.gram_t);
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

cudaError_t rkd_angle_side_grad(DType acc, const void* gram, const void* inv, int64_t B, int64_t n, double eps,
                                void* s, cudaStream_t stream) {
  if (B == 0 || n == 0) return cudaSuccess;  // no groups: no launch (a 0-sized grid is an error)
  return by_acc(acc, [&](auto tag) {
    using A = decltype(tag);
    KD_LAUNCH(elementwise_grid(B, n * n), kThreads, 0, stream, angle_side_kernel<A>)(
        static_cast<const A*>(gram), static_cast<const A*>(inv), n, static_cast<A>(eps), static_cast<A*>(s));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdfast
