// Feature matching on CUDA: squared error or cosine distance per row, forward and gradients in one
// launch (math in csrc/common/feature_match.h).
//
// A warp owns a slice and walks it in 16-byte vector groups (scalar where the operands' offsets
// within 16 bytes differ), reducing its sums with shuffles: no shared memory, no block barriers.
//  * squared error: a warp per (row, chunk of kSqChunk elements) writes its chunk's gradient in the
//    same pass and one partial sum; rows of one chunk write their loss directly, longer rows leave
//    partials that the glue sums per row (in a fixed order: deterministic).
//  * cosine: a warp per row sums <s, t>, |s|^2 and |t|^2, then writes the gradients in a second
//    pass over the row, which L1/L2 serve for the row lengths features have. Rows longer than
//    kCosChunk take two launches so that few long rows still spread over the device: a warp per
//    (row, chunk) writes the chunk's sums, then a warp per (row, chunk) combines its row's sums in a
//    fixed order and writes the chunk's gradients.
// 64-bit offsets throughout.
#include <algorithm>
#include <cstdint>

#include "common/feature_match.h"
#include "common/tuning.h"
#include "cuda/compat.cuh"
#include "cuda/elem.cuh"
#include "cuda/kernels.h"

namespace kdfast {
namespace cuda {
namespace {

using kernel::FeatureArgs;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
using tuning::kCosChunk;  // cosine rows longer than this are split across warps
using tuning::kSqChunk;   // squared error: elements per warp
constexpr int64_t kMaxBlocks = 1 << 16;  // warps stride over the work beyond this

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// One slice of a row: n elements of student and teacher and, where not null, of the gradients.
template <typename T>
struct RowSlice {
  const T* s;
  const T* t;
  T* gs;
  T* gt;
  int64_t n;

  // f(a, b, x, y) for each group of P elements with a, b the inputs (0 outside the slice, so sums
  // of products are unaffected) and x, y the gradients it sets (stored inside the slice only).
  template <int P, typename F>
  __device__ __forceinline__ void walk(int o, int lane, F&& f) const {
    using A = typename Elem<T>::acc;
    const T* sb = s - o;
    const T* tb = t - o;
    T* gsb = gs ? gs - o : nullptr;
    T* gtb = gt ? gt - o : nullptr;
    const Span sp(o, n, P);
    for (int64_t gi = lane; gi < sp.groups; gi += 32) {
      const int64_t j0 = gi * P;
      A a[P], b[P], x[P], y[P];
      if (sp.full(j0, P)) {
        const Vec<T, P> vs = *reinterpret_cast<const Vec<T, P>*>(sb + j0);
        const Vec<T, P> vt = *reinterpret_cast<const Vec<T, P>*>(tb + j0);
#pragma unroll
        for (int q = 0; q < P; ++q) a[q] = Elem<T>::to(vs.v[q]), b[q] = Elem<T>::to(vt.v[q]);
        f(a, b, x, y);
        Vec<T, P> out;
        if (gsb) {
#pragma unroll
          for (int q = 0; q < P; ++q) out.v[q] = Elem<T>::from(x[q]);
          *reinterpret_cast<Vec<T, P>*>(gsb + j0) = out;
        }
        if (gtb) {
#pragma unroll
          for (int q = 0; q < P; ++q) out.v[q] = Elem<T>::from(y[q]);
          *reinterpret_cast<Vec<T, P>*>(gtb + j0) = out;
        }
      } else {
#pragma unroll
        for (int q = 0; q < P; ++q) {
          const bool ok = sp.valid(j0 + q);
          a[q] = ok ? Elem<T>::to(sb[j0 + q]) : A(0);
          b[q] = ok ? Elem<T>::to(tb[j0 + q]) : A(0);
        }
        f(a, b, x, y);
#pragma unroll
        for (int q = 0; q < P; ++q) {
          if (!sp.valid(j0 + q)) continue;
          if (gsb) gsb[j0 + q] = Elem<T>::from(x[q]);
          if (gtb) gtb[j0 + q] = Elem<T>::from(y[q]);
        }
      }
    }
  }

  // The vector walk where every operand sits at the same offset within 16 bytes, else the scalar one.
  template <typename F>
  __device__ __forceinline__ void walk(int lane, F&& f) const {
    constexpr int P = vec_elems<T>();
    const int o = align_off(s);
    if (align_off(t) == o && (gs == nullptr || align_off(gs) == o) && (gt == nullptr || align_off(gt) == o)) {
      walk<P>(o, lane, f);
    } else {
      walk<1>(0, lane, f);
    }
  }
};

struct Params {
  const void* s;
  const void* t;
  int64_t rows, dim, s_stride, t_stride;
  int64_t chunk, nchunk;  // elements per warp and chunks per row (1: a warp per row)
  double eps;
  const void* w;
  void* out;  // loss per row, or partial sums per (row, chunk) when nchunk > 1
  void* gs;
  void* gt;
};

template <typename T>
__device__ __forceinline__ RowSlice<T> slice_of(const Params& p, int64_t r, int64_t b, int64_t n, bool grads) {
  return {static_cast<const T*>(p.s) + r * p.s_stride + b, static_cast<const T*>(p.t) + r * p.t_stride + b,
          grads && p.gs ? static_cast<T*>(p.gs) + r * p.dim + b : nullptr,
          grads && p.gt ? static_cast<T*>(p.gt) + r * p.dim + b : nullptr, n};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sq_error_kernel(Params p) {
  using A = typename Elem<T>::acc;
  const int lane = threadIdx.x & 31;
  const int64_t items = p.rows * p.nchunk;
  for (int64_t it = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); it < items;
       it += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t r = it / p.nchunk, b = (it - r * p.nchunk) * p.chunk;
    const A w = static_cast<const A*>(p.w)[r];
    const bool skip = w == A(0);
    const A c = A(2) * w;
    A acc = 0;
    slice_of<T>(p, r, b, p.dim - b < p.chunk ? p.dim - b : p.chunk, true).walk(lane, [&](auto& a, auto& bb, auto& x, auto& y) {
      constexpr int P = sizeof(a) / sizeof(a[0]);
#pragma unroll
      for (int q = 0; q < P; ++q) {
        const A d = a[q] - bb[q];
        acc += d * d;
        x[q] = skip ? A(0) : c * d;
        y[q] = -x[q];
      }
    });
    acc = warp_sum(acc);
    if (lane == 0) static_cast<A*>(p.out)[it] = skip ? A(0) : acc;
  }
}

// <s, t>, |s|^2 and |t|^2 of a slice, summed over the warp (every lane gets them).
template <typename T>
__device__ __forceinline__ void cosine_sums(const RowSlice<T>& x, int lane, double& st, double& ss, double& tt) {
  using A = typename Elem<T>::acc;
  A a_st = 0, a_ss = 0, a_tt = 0;
  x.walk(lane, [&](auto& a, auto& b, auto&, auto&) {
    constexpr int P = sizeof(a) / sizeof(a[0]);
#pragma unroll
    for (int q = 0; q < P; ++q) a_st += a[q] * b[q], a_ss += a[q] * a[q], a_tt += b[q] * b[q];
  });
  st = warp_sum(a_st), ss = warp_sum(a_ss), tt = warp_sum(a_tt);
}

// The cosine constants of row r from the sums over the whole row. Where they overflowed (float beyond
// |x| ~ 1e19, double beyond ~ 1e154) the warp sums the row again in double over the inputs divided by
// their largest magnitudes, as the CPU kernel does. Rare.
template <typename T>
__device__ __forceinline__ feature::CosineRow<double> cosine_constants(const Params& p, int64_t r, double st, double ss,
                                                                       double tt, double w, int lane) {
  double ms = 1, mt = 1;
  if (!(isfinite(st) && isfinite(ss) && isfinite(tt))) {
    const RowSlice<T> x = slice_of<T>(p, r, 0, p.dim, false);
    ms = mt = 0;
    x.walk(lane, [&](auto& a, auto& b, auto&, auto&) {
      constexpr int P = sizeof(a) / sizeof(a[0]);
#pragma unroll
      for (int q = 0; q < P; ++q) ms = fmax(ms, fabs(double(a[q]))), mt = fmax(mt, fabs(double(b[q])));
    });
    ms = warp_max(ms), mt = warp_max(mt);
    if (!(ms > 0 && isfinite(ms))) ms = 1;
    if (!(mt > 0 && isfinite(mt))) mt = 1;
    const double is = 1 / ms, it = 1 / mt;
    st = ss = tt = 0;
    x.walk(lane, [&](auto& a, auto& b, auto&, auto&) {
      constexpr int P = sizeof(a) / sizeof(a[0]);
#pragma unroll
      for (int q = 0; q < P; ++q) {
        const double u = a[q] * is, v = b[q] * it;
        st += u * v, ss += u * u, tt += v * v;
      }
    });
    st = warp_sum(st), ss = warp_sum(ss), tt = warp_sum(tt);
  }
  return feature::cosine_row<double>(st, ss, tt, ms, mt, p.eps, w, p.dim);
}

// The gradients of one slice of a cosine row (0 for a row of weight 0).
template <typename T>
__device__ __forceinline__ void cosine_grads(const RowSlice<T>& x, const feature::CosineRow<double>& k, bool skip,
                                             int lane) {
  using A = typename Elem<T>::acc;
  if (x.gs == nullptr && x.gt == nullptr) return;
  const auto ks = feature::side_as<A>(k.s), kt = feature::side_as<A>(k.t);
  x.walk(lane, [&](auto& a, auto& b, auto& gx, auto& gy) {
    constexpr int P = sizeof(a) / sizeof(a[0]);
#pragma unroll
    for (int q = 0; q < P; ++q) {
      gx[q] = skip ? A(0) : feature::cosine_grad(ks, a[q], b[q]);
      gy[q] = skip ? A(0) : feature::cosine_grad(kt, b[q], a[q]);
    }
  });
}

// A warp per row: sums, constants, loss and gradients in one launch.
template <typename T>
__global__ void __launch_bounds__(kThreads) cosine_kernel(Params p) {
  using A = typename Elem<T>::acc;
  const int lane = threadIdx.x & 31;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); r < p.rows;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    const A w = static_cast<const A*>(p.w)[r];
    double st, ss, tt;
    cosine_sums(slice_of<T>(p, r, 0, p.dim, false), lane, st, ss, tt);
    const auto k = cosine_constants<T>(p, r, st, ss, tt, static_cast<double>(w), lane);
    if (lane == 0) static_cast<A*>(p.out)[r] = w == A(0) ? A(0) : static_cast<A>(k.loss);
    cosine_grads(slice_of<T>(p, r, 0, p.dim, true), k, w == A(0), lane);
  }
}

// Long rows, first launch: a warp per (row, chunk) writes the chunk's three sums to `part`.
template <typename T>
__global__ void __launch_bounds__(kThreads) cosine_sums_kernel(Params p, double* part) {
  const int lane = threadIdx.x & 31;
  const int64_t items = p.rows * p.nchunk;
  for (int64_t it = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); it < items;
       it += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t r = it / p.nchunk, b = (it - r * p.nchunk) * p.chunk;
    double st, ss, tt;
    cosine_sums(slice_of<T>(p, r, b, p.dim - b < p.chunk ? p.dim - b : p.chunk, false), lane, st, ss, tt);
    if (lane == 0) part[3 * it] = st, part[3 * it + 1] = ss, part[3 * it + 2] = tt;
  }
}

// Long rows, second launch: each (row, chunk) warp combines its row's partial sums (lane l takes
// chunks l, l + 32, ...; a fixed order), computes the constants and writes its chunk's gradients;
// chunk 0 writes the loss.
template <typename T>
__global__ void __launch_bounds__(kThreads) cosine_chunk_grad_kernel(Params p, const double* part) {
  using A = typename Elem<T>::acc;
  const int lane = threadIdx.x & 31;
  const bool grads = p.gs != nullptr || p.gt != nullptr;
  const int64_t items = p.rows * p.nchunk;
  for (int64_t it = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); it < items;
       it += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t r = it / p.nchunk, c = it - r * p.nchunk, b = c * p.chunk;
    if (!grads && c != 0) continue;
    double st = 0, ss = 0, tt = 0;
    for (int64_t j = lane; j < p.nchunk; j += 32) {
      const double* q = part + 3 * (r * p.nchunk + j);
      st += q[0], ss += q[1], tt += q[2];
    }
    st = warp_sum(st), ss = warp_sum(ss), tt = warp_sum(tt);
    const A w = static_cast<const A*>(p.w)[r];
    const auto k = cosine_constants<T>(p, r, st, ss, tt, static_cast<double>(w), lane);
    if (c == 0 && lane == 0) static_cast<A*>(p.out)[r] = w == A(0) ? A(0) : static_cast<A>(k.loss);
    cosine_grads(slice_of<T>(p, r, b, p.dim - b < p.chunk ? p.dim - b : p.chunk, true), k, w == A(0), lane);
  }
}

}  // namespace

int64_t feature_match_chunks(const FeatureArgs& a) {
  if (a.cosine || a.cols <= kSqChunk) return 1;
  return (a.cols + kSqChunk - 1) / kSqChunk;
}

namespace {
int64_t cosine_chunks(const FeatureArgs& a) {
  return a.cosine && a.cols > kCosChunk ? (a.cols + kCosChunk - 1) / kCosChunk : 1;
}
}  // namespace

size_t feature_match_workspace(const FeatureArgs& a) {
  const int64_t nc = cosine_chunks(a);
  return nc > 1 ? static_cast<size_t>(a.rows * nc) * 3 * sizeof(double) : 0;
}

cudaError_t feature_match(const FeatureArgs& a, void* partial, void* workspace, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  const int64_t nc = cosine_chunks(a);
  Params p{a.student, a.teacher, a.rows, a.cols, a.student_row_stride, a.teacher_row_stride,
           a.cosine ? kCosChunk : kSqChunk, a.cosine ? nc : feature_match_chunks(a), a.eps, a.row_weight,
           a.loss_rows, a.grad_student, a.grad_teacher};
  if (!a.cosine && p.nchunk > 1) p.out = partial;
  const int64_t items = a.rows * p.nchunk;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((items + kWarps - 1) / kWarps, kMaxBlocks));
  return by_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (!a.cosine) {
      KD_LAUNCH(blocks, kThreads, 0, stream, sq_error_kernel<T>)(p);
    } else if (nc == 1) {
      KD_LAUNCH(blocks, kThreads, 0, stream, cosine_kernel<T>)(p);
    } else {
      KD_LAUNCH(blocks, kThreads, 0, stream, cosine_sums_kernel<T>)(p, static_cast<double*>(workspace));
      const cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
      KD_LAUNCH(blocks, kThreads, 0, stream, cosine_chunk_grad_kernel<T>)(p, static_cast<const double*>(workspace));
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdfast
