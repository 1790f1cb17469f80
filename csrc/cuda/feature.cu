// Feature matching on CUDA: squared error or cosine distance per row, forward and gradients in one
// launch (math in csrc/common/feature.h).
//
// A warp owns a slice and walks it in 16-byte vector groups (scalar where the operands' offsets
// within 16 bytes differ), reducing its sums with shuffles: no shared memory, no block barriers.
//  * squared error: a warp per (row, chunk of kSqChunk elements) writes its chunk's gradient in the
//    same pass and one partial sum; rows of one chunk write their loss directly, longer rows leave
//    partials that the glue sums per row (in a fixed order: deterministic).
//  * cosine: a warp per row sums <s, t>, |s|^2 and |t|^2, then writes the gradients in a second
//    pass over the row, which L1/L2 serve for the row lengths features have.
// 64-bit offsets throughout.
#include <algorithm>
#include <cstdint>

#include "common/feature.h"
#include "cuda/compat.cuh"
#include "cuda/elem.cuh"
#include "cuda/kernels.h"

namespace kdfast {
namespace cuda {
namespace {

using cpu::FeatureArgs;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kSqChunk = 4096;      // squared error: elements per warp
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
  int64_t chunk, nchunk;  // squared error: elements per warp, chunks per row
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

template <typename T>
__global__ void __launch_bounds__(kThreads) cosine_kernel(Params p) {
  using A = typename Elem<T>::acc;
  const int lane = threadIdx.x & 31;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); r < p.rows;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    const A w = static_cast<const A*>(p.w)[r];
    A st = 0, ss = 0, tt = 0;
    slice_of<T>(p, r, 0, p.dim, false).walk(lane, [&](auto& a, auto& b, auto&, auto&) {
      constexpr int P = sizeof(a) / sizeof(a[0]);
#pragma unroll
      for (int q = 0; q < P; ++q) st += a[q] * b[q], ss += a[q] * a[q], tt += b[q] * b[q];
    });
    st = warp_sum(st), ss = warp_sum(ss), tt = warp_sum(tt);
    double dst = st, dss = ss, dtt = tt, ms = 1, mt = 1;
    if (!(isfinite(dst) && isfinite(dss) && isfinite(dtt))) {
      // The sums overflowed (float beyond |x| ~ 1e19, double beyond ~ 1e154): again in double over
      // the inputs divided by their largest magnitudes, as the CPU kernel does. Rare.
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
      dst = dss = dtt = 0;
      x.walk(lane, [&](auto& a, auto& b, auto&, auto&) {
        constexpr int P = sizeof(a) / sizeof(a[0]);
#pragma unroll
        for (int q = 0; q < P; ++q) {
          const double u = a[q] * is, v = b[q] * it;
          dst += u * v, dss += u * u, dtt += v * v;
        }
      });
      dst = warp_sum(dst), dss = warp_sum(dss), dtt = warp_sum(dtt);
    }
    const auto k = feature::cosine_row<double>(dst, dss, dtt, ms, mt, p.eps, static_cast<double>(w));
    const bool skip = w == A(0);
    if (lane == 0) static_cast<A*>(p.out)[r] = skip ? A(0) : static_cast<A>(k.loss);
    if (p.gs == nullptr && p.gt == nullptr) continue;
    const auto ks = feature::side_as<A>(k.s), kt = feature::side_as<A>(k.t);
    slice_of<T>(p, r, 0, p.dim, true).walk(lane, [&](auto& a, auto& b, auto& x, auto& y) {
      constexpr int P = sizeof(a) / sizeof(a[0]);
#pragma unroll
      for (int q = 0; q < P; ++q) {
        x[q] = skip ? A(0) : feature::cosine_grad(ks, a[q], b[q]);
        y[q] = skip ? A(0) : feature::cosine_grad(kt, b[q], a[q]);
      }
    });
  }
}

}  // namespace

int64_t feature_match_chunks(const FeatureArgs& a) {
  if (a.cosine || a.dim <= kSqChunk) return 1;
  return (a.dim + kSqChunk - 1) / kSqChunk;
}

cudaError_t feature_match(const FeatureArgs& a, void* partial, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  Params p{a.student, a.teacher, a.rows, a.dim, a.student_row_stride, a.teacher_row_stride,
           kSqChunk,  feature_match_chunks(a), a.eps, a.row_weight, a.loss_rows, a.grad_student,
           a.grad_teacher};
  if (p.nchunk > 1) p.out = partial;
  const int64_t items = a.cosine ? a.rows : a.rows * p.nchunk;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((items + kWarps - 1) / kWarps, kMaxBlocks));
  return by_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.cosine) {
      KD_LAUNCH(blocks, kThreads, 0, stream, cosine_kernel<T>)(p);
    } else {
      KD_LAUNCH(blocks, kThreads, 0, stream, sq_error_kernel<T>)(p);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdfast
