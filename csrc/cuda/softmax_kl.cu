// Temperature softmax-KL on CUDA: forward and gradients in one launch (or three, for huge rows).
//
// Math (csrc/common/softmax_kl.h), in base-2 units: with c = log2(e) / T, a = (s - max s) * c and
// b = (t - max t) * c, e_s = 2^a, e_t = 2^b, Z = sum of e and A = sum of e_t * (b - a):
//   KL = ln2 * A / Z_t - log Z_t + log Z_s,  dKL/ds = (p_s - p_t) / T,
//   dKL/dt = ln2 / T * p_t * ((b - a) - A / Z_t).
// a, b and A are held in units of h = 2^-k (kl::scale_exponent), so that neither overflows on
// finite logits; e = 2^(a / h), and the KL and the teacher gradient take 1 / h back.
//
// Paths (chosen per call on the host, see plan()):
//  * cluster (sm_80+; clusters of up to 16 CTAs on sm_90): each row is split across the CTAs of a
//    thread-block cluster; every CTA copies its slice of student and teacher into shared memory once
//    (16-byte cp.async), the row maxima and sums are combined across the cluster through distributed
//    shared memory, and the gradient is written from the on-chip copy. HBM sees one read of each
//    input and one write of each gradient: the floor.
//  * rows (fallback, any arch): one block per row, three passes over the row in global memory
//    (max, sums, gradient), the re-reads served by L1/L2.
//  * chunks (fallback for very long rows): (row, chunk) blocks write partial maxima and sums, a
//    second kernel combines them per row in chunk order, a third writes the gradients.
// The other divergences (JSD, skew KL, TVD; see "the other divergences" below) take the same three
// paths with kernels of their own, templated on the divergence.
// Every path is deterministic (fixed reduction orders), uses 64-bit offsets, 16-byte vector accesses
// where the row slices of all operands share their offset within 16 bytes, and scalar ones where not.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "common/divergence.h"
#include "common/softmax_kl.h"
#include "common/tuning.h"
#include "cuda/compat.cuh"
#include "cuda/elem.cuh"
#include "cuda/kernels.h"

namespace kdfast {
namespace cuda {
namespace {

namespace cg = cooperative_groups;
using kernel::Divergence;
using kernel::DType;
using kernel::SoftmaxKLArgs;

constexpr int kThreads = 256;
constexpr int kMaxCluster = 16;
constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;

__device__ __forceinline__ float ex2(float x) { return exp2f(x); }
__device__ __forceinline__ double ex2(double x) { return exp2(x); }
// NaN-ignoring maximum: a NaN logit still makes its row NaN through the sums.
__device__ __forceinline__ float amax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double amax(double a, double b) { return fmax(a, b); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

template <int P, typename T, typename A>
__device__ __forceinline__ void pass_max(const T* sb, const T* tb, int64_t o, int64_t n, A& ms, A& mt) {
  const Span sp(o, n, P);
  for (int64_t g = threadIdx.x; g < sp.groups; g += blockDim.x) {
    const int64_t j0 = g * P;
    const Vec<T, P> vs = *reinterpret_cast<const Vec<T, P>*>(sb + j0);
    const Vec<T, P> vt = *reinterpret_cast<const Vec<T, P>*>(tb + j0);
    if (sp.full(j0, P)) {
      A xs[P], xt[P];
#pragma unroll
      for (int q = 0; q < P; ++q) xs[q] = Elem<T>::to(vs.v[q]), xt[q] = Elem<T>::to(vt.v[q]);
#pragma unroll
      for (int w = 1; w < P; w *= 2) {
#pragma unroll
        for (int q = 0; q + w < P; q += 2 * w) xs[q] = amax(xs[q], xs[q + w]), xt[q] = amax(xt[q], xt[q + w]);
      }
      ms = amax(ms, xs[0]);
      mt = amax(mt, xt[0]);
    } else {
#pragma unroll
      for (int q = 0; q < P; ++q) {
        if (sp.valid(j0 + q)) {
          ms = amax(ms, A(Elem<T>::to(vs.v[q])));
          mt = amax(mt, A(Elem<T>::to(vt.v[q])));
        }
      }
    }
  }
}

// A row's references and units: a = kl::arg(s, h, nrs, c) with nrs = -rs h (rs the row's maximum, 0
// where a side is all -inf: its exponentials are 0 whatever the reference), e = 2^(a / h).
template <typename A>
struct Frame {
  A nrs, nrt, h, c, inv_h;
  __device__ __forceinline__ Frame(A rs, A rt, A inv_t, A h_) : h(h_), c(inv_t * A(kLog2e)), inv_h(A(1) / h_) {
    nrs = rs == neg_inf<A>() ? A(0) : -rs * h;
    nrt = rt == neg_inf<A>() ? A(0) : -rt * h;
  }
  __device__ __forceinline__ A a(A x) const { return kl::arg(x, h, nrs, c); }
  __device__ __forceinline__ A b(A x) const { return kl::arg(x, h, nrt, c); }
  __device__ __forceinline__ A ex(A x) const { return ex2(x * inv_h); }
};

// Sums of e_s, e_t and e_t * (b - a) (units of h) relative to the frame's references; with kStore,
// also the exponentials at their positions in cs/ct (0 outside the slice).
template <int P, bool kStore, typename T, typename A>
__device__ __forceinline__ void pass_sum(const T* sb, const T* tb, A* cs, A* ct, int64_t o, int64_t n,
                                         const Frame<A>& f, A& zs, A& zt, A& acc) {
  const Span sp(o, n, P);
  for (int64_t g = threadIdx.x; g < sp.groups; g += blockDim.x) {
    const int64_t j0 = g * P;
    const Vec<T, P> vs = *reinterpret_cast<const Vec<T, P>*>(sb + j0);
    const Vec<T, P> vt = *reinterpret_cast<const Vec<T, P>*>(tb + j0);
    const bool full = sp.full(j0, P);
    Vec<A, P> es, et;
#pragma unroll
    for (int q = 0; q < P; ++q) {
      const A a = f.a(Elem<T>::to(vs.v[q]));
      const A b = f.b(Elem<T>::to(vt.v[q]));
      A e1 = f.ex(a), e2 = f.ex(b), tm = kl::term(e2, a, b);
      if (!full && !sp.valid(j0 + q)) e1 = e2 = tm = A(0);
      zs += e1;
      zt += e2;
      acc += tm;
      es.v[q] = e1;
      et.v[q] = e2;
    }
    if (kStore) {
      *reinterpret_cast<Vec<A, P>*>(cs + j0) = es;
      *reinterpret_cast<Vec<A, P>*>(ct + j0) = et;
    }
  }
}

template <typename A>
struct RowK {
  Frame<A> f;   // references and units
  A coef;       // w / T
  A coef_t;     // w / T * ln2 / h (a and b are in base-2 units of h)
  A izs, izt;   // 1 / Z
  A shift;      // A / Z_t (base-2 units of h)
};

// Gradients of a slice. kCached: e_s, e_t come from cs/ct (written by pass_sum), else they are
// recomputed from the inputs. gsb/gtb are the gradient bases (same layout as sb/tb), or null.
template <int P, bool kCached, typename T, typename A>
__device__ __forceinline__ void pass_grad(const T* sb, const T* tb, const A* cs, const A* ct, int64_t o,
                                          int64_t n, const RowK<A>& k, T* gsb, T* gtb) {
  const Span sp(o, n, P);
  const bool need_ab = !kCached || gtb != nullptr;
  for (int64_t g = threadIdx.x; g < sp.groups; g += blockDim.x) {
    const int64_t j0 = g * P;
    A a[P], b[P], es[P], et[P];
    if (need_ab) {
      const Vec<T, P> vs = *reinterpret_cast<const Vec<T, P>*>(sb + j0);
      const Vec<T, P> vt = *reinterpret_cast<const Vec<T, P>*>(tb + j0);
#pragma unroll
      for (int q = 0; q < P; ++q) {
        a[q] = k.f.a(Elem<T>::to(vs.v[q]));
        b[q] = k.f.b(Elem<T>::to(vt.v[q]));
      }
    }
    if (kCached) {
      const Vec<A, P> vs = *reinterpret_cast<const Vec<A, P>*>(cs + j0);
      const Vec<A, P> vt = *reinterpret_cast<const Vec<A, P>*>(ct + j0);
#pragma unroll
      for (int q = 0; q < P; ++q) es[q] = vs.v[q], et[q] = vt.v[q];
    } else {
#pragma unroll
      for (int q = 0; q < P; ++q) es[q] = k.f.ex(a[q]), et[q] = k.f.ex(b[q]);
    }
    const bool full = sp.full(j0, P);
    if (gsb) {
      Vec<T, P> out;
#pragma unroll
      for (int q = 0; q < P; ++q) out.v[q] = Elem<T>::from(kl::grad_student(k.coef, es[q], k.izs, et[q], k.izt));
      if (full) {
        *reinterpret_cast<Vec<T, P>*>(gsb + j0) = out;
      } else {
#pragma unroll
        for (int q = 0; q < P; ++q)
          if (sp.valid(j0 + q)) gsb[j0 + q] = out.v[q];
      }
    }
    if (gtb) {
      Vec<T, P> out;
#pragma unroll
      for (int q = 0; q < P; ++q)
        out.v[q] = Elem<T>::from(kl::grad_teacher(k.coef_t, et[q], k.izt, a[q], b[q], k.shift));
      if (full) {
        *reinterpret_cast<Vec<T, P>*>(gtb + j0) = out;
      } else {
#pragma unroll
        for (int q = 0; q < P; ++q)
          if (sp.valid(j0 + q)) gtb[j0 + q] = out.v[q];
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void zero_fill(T* g, int64_t n) {
  constexpr int P = vec_elems<T>();
  if (g == nullptr || n <= 0) return;
  const int o = align_off(g);
  T* gb = g - o;
  const Span sp(o, n, P);
  Vec<T, P> z;
#pragma unroll
  for (int q = 0; q < P; ++q) z.v[q] = Elem<T>::from(0.f);
  for (int64_t gi = threadIdx.x; gi < sp.groups; gi += blockDim.x) {
    const int64_t j0 = gi * P;
    if (sp.full(j0, P)) {
      *reinterpret_cast<Vec<T, P>*>(gb + j0) = z;
    } else {
#pragma unroll
      for (int q = 0; q < P; ++q)
        if (sp.valid(j0 + q)) gb[j0 + q] = z.v[q];
    }
  }
}

// ------------------------------------------------------------------ reductions

struct MaxOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const { return amax(a, b); }
};
struct AddOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};

// Block-wide reduction of N values; every thread gets the same result (fixed order: deterministic).
template <int N, typename A, typename Op>
__device__ __forceinline__ void block_reduce(A (&v)[N], A* red, Op op) {
#pragma unroll
  for (int k = 0; k < N; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] = op(v[k], __shfl_xor_sync(0xffffffffu, v[k], off));
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) red[warp * N + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    A r = red[k];
    for (int w = 1; w < nw; ++w) r = op(r, red[w * N + k]);
    v[k] = r;
  }
  __syncthreads();
}

// Combines the block results of the C CTAs of a cluster: each CTA pushes its values into a slot of
// every CTA's shared memory, then all reduce the slots in rank order (so all agree bit for bit).
template <int N, typename A, typename Op>
__device__ __forceinline__ void cluster_reduce(A (&v)[N], A* slots, int C, int rank, Op op, bool first) {
#if KD_CLUSTERS
  if (C > 1) {
    cg::cluster_group cluster = cg::this_cluster();
    if (first) kd_cluster_wait();  // pairs the kernel's early arrive: every CTA of the cluster has started
    if (static_cast<int>(threadIdx.x) < C) {
      A* dst = cluster.map_shared_rank(slots, static_cast<int>(threadIdx.x));
#pragma unroll
      for (int k = 0; k < N; ++k) dst[rank * N + k] = v[k];
    }
    cluster.sync();  // release/acquire: the pushed slots are visible after it
#pragma unroll
    for (int k = 0; k < N; ++k) {
      A r = slots[k];
      for (int q = 1; q < C; ++q) r = op(r, slots[q * N + k]);
      v[k] = r;
    }
  }
#else
  (void)v, (void)slots, (void)C, (void)rank, (void)op, (void)first;
#endif
}

// ------------------------------------------------------------------ kernels

struct KLParams {
  const void* s;
  const void* t;
  int64_t s_stride, t_stride;  // row strides in elements (0 broadcasts a row)
  int64_t rows, V;
  double inv_t;
  double h;       // units of a, b and A: 2^-kl::scale_exponent(V, inv_t)
  const void* w;  // rows, acc type
  void* kl;       // rows, double (a KL of float logits may exceed FLT_MAX)
  void* gs;       // rows x V contiguous, or null
  void* gt;
  int64_t row0;  // first row of this launch
  div::Params<double> dk;  // the other divergences' constants (div::params), cast to acc on the device
};

// The gradient constants of a row of weight w from its frame, softmax sums and shift = A / Z_t.
template <typename A>
__device__ __forceinline__ RowK<A> grad_constants(A w, const Frame<A>& f, A inv_t, A zs, A zt, A shift) {
  RowK<A> k{f};
  k.coef = w * inv_t;
  k.coef_t = k.coef * A(kLn2) * f.inv_h;
  k.izs = A(1) / zs;
  k.izt = A(1) / zt;
  k.shift = shift;
  return k;
}

template <typename A>
__device__ __forceinline__ RowK<A> row_constants(A w, const Frame<A>& f, A inv_t, A zs, A zt, A acc) {
  RowK<A> k = grad_constants(w, f, inv_t, zs, zt, acc / zt);
  // A row whose KL is NaN gets NaN gradients throughout (kl::grad_teacher passes a NaN coef even
  // where p_t = 0), whatever its maxima skipped.
  if (kl::nan_row(zs, zt, acc)) k.coef = k.coef_t = std::numeric_limits<A>::quiet_NaN();
  return k;
}

// acc in base-2 units of h; in double, where acc / h may exceed FLT_MAX.
__device__ __forceinline__ double kl_value(double zs, double zt, double acc, double h) {
  return kl::row_value(zs, zt, acc * kLn2 / h);
}

// Copies positions [0, npos) from the aligned base src to dst in shared memory, 16 bytes at a time.
// Asynchronous where cp.async exists: cp_async_commit() closes a group, cp_async_wait<N>() waits
// until at most N of this thread's groups are in flight (a __syncthreads then publishes them).
template <typename T>
__device__ __forceinline__ void load_async(T* dst, const T* src, int64_t npos) {
  const int64_t chunks = (npos * static_cast<int64_t>(sizeof(T)) + 15) / 16;
  const char* g = reinterpret_cast<const char*>(src);
  char* d = reinterpret_cast<char*>(dst);
  for (int64_t k = threadIdx.x; k < chunks; k += blockDim.x) {
#if KD_CP_ASYNC
    const unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(d + 16 * k));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(g + 16 * k) : "memory");
#else
    *reinterpret_cast<uint4*>(d + 16 * k) = *reinterpret_cast<const uint4*>(g + 16 * k);
#endif
  }
}

__device__ __forceinline__ void cp_async_commit() {
#if KD_CP_ASYNC
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if KD_CP_ASYNC
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

enum CacheMode : int { kCacheNone = 0, kCacheInPlace = 1, kCacheSeparate = 2 };

// One row's slice [v0, v0 + len) in global memory (clipped to the row; empty past its end), and
// whether the 16-byte walk applies: every operand shares its offset within 16 bytes.
template <typename T>
struct GlobalSlice {
  const T* s;
  const T* t;
  T* gs;
  T* gt;
  int64_t n;
  int o, ot;
  bool vec;
  __device__ __forceinline__ GlobalSlice(const KLParams& p, int64_t row, int64_t v0, int64_t len) {
    n = v0 >= p.V ? 0 : (p.V - v0 < len ? p.V - v0 : len);
    s = static_cast<const T*>(p.s) + row * p.s_stride + v0;
    t = static_cast<const T*>(p.t) + row * p.t_stride + v0;
    gs = p.gs && n > 0 ? static_cast<T*>(p.gs) + row * p.V + v0 : nullptr;
    gt = p.gt && n > 0 ? static_cast<T*>(p.gt) + row * p.V + v0 : nullptr;
    o = align_off(s);
    ot = align_off(t);
    vec = o == ot && (gs == nullptr || align_off(gs) == o) && (gt == nullptr || align_off(gt) == o);
  }
  // Starts the copy of the slice into shared memory: student at bs[o + i], teacher at bt[ot + i].
  __device__ __forceinline__ void load(T* bs, T* bt) const {
    if (n == 0) return;
    load_async(bs, s - o, o + n);
    load_async(bt, t - ot, ot + n);
  }
  // Writes the slice's gradients, the exponentials recomputed from the inputs in global memory.
  template <typename A>
  __device__ __forceinline__ void grads_from_global(const RowK<A>& k) const {
    constexpr int P = vec_elems<T>();
    if (vec) {
      pass_grad<P, false>(s - o, t - o, (const A*)nullptr, (const A*)nullptr, o, n, k, gs ? gs - o : nullptr,
                          gt ? gt - o : nullptr);
    } else {
      pass_grad<1, false>(s, t, (const A*)nullptr, (const A*)nullptr, 0, n, k, gs, gt);
    }
  }
};

// Shared memory of the cluster kernels: block and cluster reduction slots.
template <typename A>
struct ClusterSlots {
  A* red;
  A* max;
  A* sum;
};

// A row whose weight is 0: zero gradients and KL, no cluster barrier (every CTA of the cluster
// sees the same weight).
template <typename T, typename A>
__device__ __forceinline__ void zero_row(const KLParams& p, const GlobalSlice<T>& sl, int64_t row, int rank) {
  zero_fill(sl.gs, sl.n);
  zero_fill(sl.gt, sl.n);
  if (rank == 0 && threadIdx.x == 0) static_cast<double*>(p.kl)[row] = 0;
}

// The work of one CTA on its slice of a row once the slice is in shared memory (bs, bt as loaded
// by GlobalSlice::load; extra: room for the kCacheSeparate exponentials): cluster-wide maxima and
// sums, the row's KL (rank 0) and the slice's gradients. `waited` pairs the kernel's early cluster
// arrive with one wait before the first remote write.
template <typename T, typename A>
__device__ __forceinline__ void cluster_row(const KLParams& p, const GlobalSlice<T>& sl, int64_t row, A w, int C,
                                            int rank, T* bs, T* bt, unsigned char* extra, int64_t raw_bytes,
                                            int cache, const ClusterSlots<A>& sh, bool& waited) {
  constexpr int P = vec_elems<T>();
  // Student element i is at bs[o + i], teacher element i at bt[ot + i]. The P == 1 walks use
  // bases moved to element 0.
  const bool vec = sl.vec;
  const int os = sl.o;
  const T* s1 = bs + sl.o;
  const T* t1 = bt + sl.ot;
  const int64_t nn = sl.n;

  A m[2] = {neg_inf<A>(), neg_inf<A>()};
  if (vec) pass_max<P>(bs, bt, os, nn, m[0], m[1]);
  else pass_max<1>(s1, t1, 0, nn, m[0], m[1]);
  block_reduce(m, sh.red, MaxOp());
  cluster_reduce(m, sh.max, C, rank, MaxOp(), !waited);
  waited = true;
  const A inv_t = static_cast<A>(p.inv_t);
  const Frame<A> f(m[0], m[1], inv_t, static_cast<A>(p.h));

  const bool want_grad = p.gs != nullptr || p.gt != nullptr;
  // Exponential caches, addressed like the walk that uses them.
  A *cs = nullptr, *ct = nullptr;
  if (want_grad && cache == kCacheSeparate) {
    cs = reinterpret_cast<A*>(extra);
    ct = cs + raw_bytes / static_cast<int64_t>(sizeof(T));
  }
  if constexpr (sizeof(T) == sizeof(A)) {
    if (want_grad && cache == kCacheInPlace) {  // e_s, e_t overwrite the inputs they came from
      cs = reinterpret_cast<A*>(vec ? bs : const_cast<T*>(s1));
      ct = reinterpret_cast<A*>(vec ? bt : const_cast<T*>(t1));
    }
  }
  A sums[3] = {A(0), A(0), A(0)};
  if (cs != nullptr) {
    if (vec) pass_sum<P, true>(bs, bt, cs, ct, os, nn, f, sums[0], sums[1], sums[2]);
    else pass_sum<1, true>(s1, t1, cs, ct, 0, nn, f, sums[0], sums[1], sums[2]);
  } else {
    if (vec) pass_sum<P, false>(bs, bt, cs, ct, os, nn, f, sums[0], sums[1], sums[2]);
    else pass_sum<1, false>(s1, t1, cs, ct, 0, nn, f, sums[0], sums[1], sums[2]);
  }
  block_reduce(sums, sh.red, AddOp());
  cluster_reduce(sums, sh.sum, C, rank, AddOp(), false);
  if (rank == 0 && threadIdx.x == 0) static_cast<double*>(p.kl)[row] = kl_value(sums[0], sums[1], sums[2], p.h);
  if (!want_grad || nn == 0) return;

  const RowK<A> k = row_constants(w, f, inv_t, sums[0], sums[1], sums[2]);
  T* gs = sl.gs;
  T* gt = sl.gt;
  if (cs != nullptr) {  // pass_sum's writes are read by the same threads: no barrier needed
    if (vec) pass_grad<P, true>(bs, bt, cs, ct, os, nn, k, gs ? gs - os : nullptr, gt ? gt - os : nullptr);
    else pass_grad<1, true>(s1, t1, cs, ct, 0, nn, k, gs, gt);
  } else {
    if (vec) pass_grad<P, false>(bs, bt, cs, ct, os, nn, k, gs ? gs - os : nullptr, gt ? gt - os : nullptr);
    else pass_grad<1, false>(s1, t1, cs, ct, 0, nn, k, gs, gt);
  }
}

__device__ __forceinline__ int cluster_rank_of(int C) {
#if KD_CLUSTERS
  if (C > 1) return static_cast<int>(cg::this_cluster().block_rank());
#endif
  (void)C;
  return 0;
}

// A cluster kernel's CTA: its row (blockIdx.x / C from p.row0), the row's weight, its slice (the
// cluster rank picks it) and where the slice goes in shared memory: [student | teacher], raw_bytes
// each, laid out by GlobalSlice::load.
template <typename T>
struct ClusterCta {
  using A = typename Elem<T>::acc;
  int rank;
  int64_t row;
  A w;
  GlobalSlice<T> sl;
  T* bs;
  T* bt;
  __device__ __forceinline__ ClusterCta(const KLParams& p, int C, int64_t slice, int64_t raw_bytes, unsigned char* smem)
      : rank(cluster_rank_of(C)),
        row(p.row0 + blockIdx.x / C),
        w(static_cast<const A*>(p.w)[row]),
        sl(p, row, rank * slice, slice),
        bs(reinterpret_cast<T*>(smem)),
        bt(reinterpret_cast<T*>(smem + raw_bytes)) {}
  // A row of weight 0 gets zero gradients and loss, and the whole cluster leaves (no cluster
  // barrier is pending: false); else the slice is copied into shared memory and the CTA has arrived
  // at the cluster barrier that the first cluster_reduce waits on (true).
  __device__ __forceinline__ bool start(const KLParams& p, int C) const {
    if (w == A(0)) {
      zero_row<T, A>(p, sl, row, rank);
      return false;
    }
    // Distributed shared memory may be touched only once every CTA of the cluster runs: arrive now,
    // wait just before the first remote write (the load below hides the wait).
    if (C > 1) kd_cluster_arrive();
    sl.load(bs, bt);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    return true;
  }
};

#define KD_CLUSTER_SHARED(A, sh)               \
  KD_SHARED(A, red_, [32 * 3]);                \
  KD_SHARED(A, slots_max_, [kMaxCluster * 2]); \
  KD_SHARED(A, slots_sum_, [kMaxCluster * 3]); \
  const ClusterSlots<A> sh { red_, slots_max_, slots_sum_ }

// The cluster path: blockIdx.x / C is the row (from p.row0), the cluster rank picks the slice.
// Shared memory: [student slice | teacher slice] of raw_bytes each, then (kCacheSeparate) the
// exponentials, raw_bytes / sizeof(T) accumulators per input.
template <typename T>
__global__ void __launch_bounds__(kThreads) kl_cluster_kernel(KLParams p, int C, int64_t slice,
                                                              int64_t raw_bytes, int cache) {
  using A = typename Elem<T>::acc;
  KD_DYNAMIC_SHARED(smem);
  KD_CLUSTER_SHARED(A, sh);
  const ClusterCta<T> x(p, C, slice, raw_bytes, smem);
  if (!x.start(p, C)) return;
  bool waited = false;
  cluster_row(p, x.sl, x.row, x.w, C, x.rank, x.bs, x.bt, smem + 2 * raw_bytes, raw_bytes, cache, sh, waited);
}

// The block-wide maxima m = {m_s, m_t} of a slice and its sums {Z_s, Z_t, A} relative to them, in
// the units of the frame it returns; every thread gets them.
template <typename T, typename A>
__device__ __forceinline__ Frame<A> slice_max_sums(const KLParams& p, const GlobalSlice<T>& sl, A* red, A (&m)[2],
                                                   A (&sums)[3]) {
  constexpr int P = vec_elems<T>();
  m[0] = m[1] = neg_inf<A>();
  if (sl.vec) pass_max<P>(sl.s - sl.o, sl.t - sl.o, sl.o, sl.n, m[0], m[1]);
  else pass_max<1>(sl.s, sl.t, 0, sl.n, m[0], m[1]);
  block_reduce(m, red, MaxOp());
  const Frame<A> f(m[0], m[1], static_cast<A>(p.inv_t), static_cast<A>(p.h));
  sums[0] = sums[1] = sums[2] = A(0);
  if (sl.vec) pass_sum<P, false>(sl.s - sl.o, sl.t - sl.o, (A*)nullptr, (A*)nullptr, sl.o, sl.n, f, sums[0], sums[1], sums[2]);
  else pass_sum<1, false>(sl.s, sl.t, (A*)nullptr, (A*)nullptr, 0, sl.n, f, sums[0], sums[1], sums[2]);
  block_reduce(sums, red, AddOp());
  return f;
}

// Fallback, one block per (row, chunk). full: the chunk is the whole row; the block writes the KL
// and the gradients. Otherwise it writes its chunk's maxima and sums to part[(row, chunk)].
template <typename T>
__global__ void __launch_bounds__(kThreads) kl_rows_kernel(KLParams p, int64_t chunk, bool full,
                                                           typename Elem<T>::acc* part) {
  using A = typename Elem<T>::acc;
  KD_SHARED(A, red, [32 * 3]);
  const int64_t row = p.row0 + blockIdx.x;
  const int64_t v0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const A w = static_cast<const A*>(p.w)[row];
  const GlobalSlice<T> sl(p, row, v0, chunk);
  if (w == A(0)) {
    if (full) {
      zero_fill(sl.gs, sl.n);
      zero_fill(sl.gt, sl.n);
      if (threadIdx.x == 0) static_cast<double*>(p.kl)[row] = 0;
    }
    return;
  }
  A m[2], sums[3];
  const Frame<A> f = slice_max_sums(p, sl, red, m, sums);
  const A inv_t = static_cast<A>(p.inv_t);
  if (!full) {
    if (threadIdx.x == 0) {
      A* q = part + ((row - p.row0) * gridDim.y + blockIdx.y) * 5;
      q[0] = m[0], q[1] = m[1], q[2] = sums[0], q[3] = sums[1], q[4] = sums[2];
    }
    return;
  }
  if (threadIdx.x == 0) static_cast<double*>(p.kl)[row] = kl_value(sums[0], sums[1], sums[2], p.h);
  if (sl.gs == nullptr && sl.gt == nullptr) return;
  const RowK<A> k = row_constants(w, f, inv_t, sums[0], sums[1], sums[2]);
  sl.grads_from_global(k);
}

// Combines the chunk partials of each row, in chunk order, into the row's KL and gradient constants
// stats[row] = (rs, rt, Z_s, Z_t, A). Done in double: it is one thread per row.
template <typename A>
__global__ void kl_combine_kernel(KLParams p, int64_t nrows, int nchunk, const A* part, A* stats) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= nrows) return;
  const int64_t row = p.row0 + i;
  double* KL = static_cast<double*>(p.kl);
  if (static_cast<const A*>(p.w)[row] == A(0)) {
    KL[row] = 0;
    return;
  }
  const double ninf = -std::numeric_limits<double>::infinity();
  const double c = static_cast<double>(static_cast<A>(p.inv_t) * A(kLog2e));
  const A* q = part + i * nchunk * 5;
  double ms = ninf, mt = ninf;
  for (int k = 0; k < nchunk; ++k) ms = fmax(ms, double(q[5 * k])), mt = fmax(mt, double(q[5 * k + 1]));
  const double rs = ms == ninf ? 0.0 : ms, rt = mt == ninf ? 0.0 : mt;
  double zs = 0, zt = 0, acc = 0;
  for (int k = 0; k < nchunk; ++k) {
    const double mk_s = q[5 * k], mk_t = q[5 * k + 1];
    const double zk_s = q[5 * k + 2], zk_t = q[5 * k + 3], ak = q[5 * k + 4];
    // The chunk's sums are relative to its own references (0 where its side was all -inf).
    const double ds = ((mk_s == ninf ? 0.0 : mk_s) - rs) * c;
    const double dt = ((mk_t == ninf ? 0.0 : mk_t) - rt) * c;
    zs += mk_s == ninf ? zk_s : zk_s * exp2(ds);  // zk_s is 0 (or NaN) when the side is all -inf
    if (mk_t == ninf) {
      zt += zk_t;
      acc += ak;
    } else {
      // e_t (b - a) with b, a moved to the row references (ak in units of h; f (dt - ds) is 0 where
      // f is: the chunk's maximum far below the row's)
      const double f = exp2(dt);
      zt += zk_t * f;
      acc += f * ak + zk_t * (f * (dt - ds) * p.h);
    }
  }
  KL[row] = kl_value(zs, zt, acc, p.h);
  A* st = stats + i * 5;
  st[0] = static_cast<A>(rs), st[1] = static_cast<A>(rt);
  st[2] = static_cast<A>(zs), st[3] = static_cast<A>(zt), st[4] = static_cast<A>(acc);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) kl_grad_kernel(KLParams p, int64_t chunk,
                                                           const typename Elem<T>::acc* stats) {
  using A = typename Elem<T>::acc;
  constexpr int P = vec_elems<T>();
  const int64_t row = p.row0 + blockIdx.x;
  const int64_t v0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const A w = static_cast<const A*>(p.w)[row];
  const GlobalSlice<T> sl(p, row, v0, chunk);
  if (w == A(0)) {
    zero_fill(sl.gs, sl.n);
    zero_fill(sl.gt, sl.n);
    return;
  }
  const A* st = stats + (row - p.row0) * 5;
  const A inv_t = static_cast<A>(p.inv_t);
  const RowK<A> k = row_constants(w, Frame<A>(st[0], st[1], inv_t, static_cast<A>(p.h)), inv_t, st[2], st[3], st[4]);
  sl.grads_from_global(k);
}

// ------------------------------------------------------------------ the other divergences
//
// JSD, skew KL and TVD (per-element math: common/divergence.h; the glue hands over only these three
// beside KL, see kernel::Divergence). Each needs P and Q themselves before its terms, so a row takes
// three passes: (1) online maxima and softmax sums of both sides, (2) F = sum f, SU = sum Q u and
// SW = sum P w, (3) the gradients. Exponentials in base 2: e = 2^((x - r) c), c = log2(e) / T, r the
// row maximum (0 where a side is all -inf: its exponentials are 0 whatever r is). Paths, chosen by
// the KL's plan (the cluster kernel caching no exponentials): clusters with the row's slices in
// shared memory (the passes read HBM once), one block per row, or (row, chunk) blocks whose
// partials per-row kernels combine in chunk order. Deterministic like the KL paths.

// A row's constants for passes (2) and (3).
template <typename A>
struct DivRow {
  A rs, rt;      // references
  A c;           // log2(e) / T
  A izs, izt;    // 1 / Z
  div::Consts<A> k;
  A inv_t, lz;   // 1 / T and log Z_s - log Z_t (natural units), for log(P/Q)
  A su, sw;      // pass (2)'s sums
  A gcs, gct;    // row_weight / T * cq, * cp
  bool nan;      // the row's value is NaN: NaN gradients throughout
  // Rounded on their own (kl::mul_rn): equal logits and sums give P = Q exactly, so TVD's sign is 0.
  __device__ __forceinline__ A q(A x) const { return kl::mul_rn(ex2((x - rs) * c), izs); }
  __device__ __forceinline__ A p(A x) const { return kl::mul_rn(ex2((x - rt) * c), izt); }
  // log(P/Q) of an element from its logits (div::terms; JSD reads it)
  __device__ __forceinline__ A lpq(A xs, A xt) const { return ((xt - rt) - (xs - rs)) * inv_t + lz; }
};

// The row's maxima and softmax sums: mz = {m_s, m_t, Z_s, Z_t} -> its DivRow (sums still unset).
template <typename A>
__device__ __forceinline__ DivRow<A> div_row(const div::Params<A>& k, A c, A inv_t, const A (&mz)[4]) {
  DivRow<A> r;
  r.rs = mz[0] == neg_inf<A>() ? A(0) : mz[0];
  r.rt = mz[1] == neg_inf<A>() ? A(0) : mz[1];
  r.c = c;
  r.izs = A(1) / mz[2];
  r.izt = A(1) / mz[3];
  r.k = k;
  r.inv_t = inv_t;
  r.lz = log(mz[2]) - log(mz[3]);
  r.su = r.sw = A(0);
  r.gcs = r.gct = A(0);
  r.nan = false;
  return r;
}

// Sets the gradient constants from pass (2)'s sums {F, SU, SW}; returns the row's value.
template <typename A>
__device__ __forceinline__ A div_finish(DivRow<A>& r, const div::Params<A>& k, A w, A inv_t, const A (&st)[3]) {
  const A v = div::row_value(st[0]);
  r.su = st[1], r.sw = st[2];
  r.gcs = w * inv_t * k.cq;
  r.gct = w * inv_t * k.cp;
  r.nan = v != v;
  return v;
}

// z 2^((m - M) c): a sum relative to m moved to M >= m (z itself where m is -inf: z is 0 or NaN).
template <typename A>
__device__ __forceinline__ A rescale(A z, A m, A M, A c) {
  return m == neg_inf<A>() ? z : z * ex2((m - M) * c);
}

// Adds P values (-inf where absent) with maximum gm to the online pair (m, z).
template <int P, typename A>
__device__ __forceinline__ void online_add(A& m, A& z, const A (&x)[P], A gm, A c) {
  if (gm > m) {
    z = rescale(z, m, gm, c);
    m = gm;
  }
  const A r = m == neg_inf<A>() ? A(0) : m;
#pragma unroll
  for (int q = 0; q < P; ++q) z += ex2((x[q] - r) * c);
}

// Calls f(j0, vs, vt, full) for each group of P positions of the slice this thread walks: the
// student and teacher vectors at positions [j0, j0 + P), and whether all of them are in the slice.
template <int P, typename T, typename F>
__device__ __forceinline__ void for_groups(const T* sb, const T* tb, const Span& sp, F&& f) {
  for (int64_t g = threadIdx.x; g < sp.groups; g += blockDim.x) {
    const int64_t j0 = g * P;
    f(j0, *reinterpret_cast<const Vec<T, P>*>(sb + j0), *reinterpret_cast<const Vec<T, P>*>(tb + j0),
      sp.full(j0, P));
  }
}

// Pass (1) over a slice, per thread: mz = {m_s, m_t, Z_s, Z_t}, Z relative to m (NaN logits are
// skipped by the maxima and reach Z).
template <int P, typename T, typename A>
__device__ __forceinline__ void pass_mz(const T* sb, const T* tb, int64_t o, int64_t n, A c, A (&mz)[4]) {
  const Span sp(o, n, P);
  for_groups<P>(sb, tb, sp, [&](int64_t j0, const Vec<T, P>& vs, const Vec<T, P>& vt, bool full) {
    A xs[P], xt[P];
    A gs = neg_inf<A>(), gt = neg_inf<A>();
#pragma unroll
    for (int q = 0; q < P; ++q) {
      const bool ok = full || sp.valid(j0 + q);
      xs[q] = ok ? A(Elem<T>::to(vs.v[q])) : neg_inf<A>();
      xt[q] = ok ? A(Elem<T>::to(vt.v[q])) : neg_inf<A>();
      gs = amax(gs, xs[q]);
      gt = amax(gt, xt[q]);
    }
    online_add(mz[0], mz[2], xs, gs, c);
    online_add(mz[1], mz[3], xt, gt, c);
  });
}

// Block-wide combination of the threads' (m, z) pairs (fixed order); every thread gets the row's.
template <typename A>
__device__ __forceinline__ void reduce_mz(A (&mz)[4], A* red, A c) {
  A m[2] = {mz[0], mz[1]};
  block_reduce(m, red, MaxOp());
  A z[2] = {rescale(mz[2], mz[0], m[0], c), rescale(mz[3], mz[1], m[1], c)};
  block_reduce(z, red, AddOp());
  mz[0] = m[0], mz[1] = m[1], mz[2] = z[0], mz[3] = z[1];
}

// Pass (2) over a slice, per thread: st += {sum f, sum Q u, sum P w}.
template <Divergence D, int P, typename T, typename A>
__device__ __forceinline__ void pass_stats(const T* sb, const T* tb, int64_t o, int64_t n, const DivRow<A>& r,
                                           A (&st)[3]) {
  using Ops = div::ScalarOps<A>;
  const Span sp(o, n, P);
  for_groups<P>(sb, tb, sp, [&](int64_t j0, const Vec<T, P>& vs, const Vec<T, P>& vt, bool full) {
#pragma unroll
    for (int q = 0; q < P; ++q) {
      if (!full && !sp.valid(j0 + q)) continue;
      const A xs = Elem<T>::to(vs.v[q]), xt = Elem<T>::to(vt.v[q]);
      const A pq = r.q(xs), pp = r.p(xt);
      A f, u, w;
      div::terms<D, Ops>(pp, pq, r.lpq(xs, xt), r.k, f, u, w);
      st[0] += f;
      st[1] += pq * u;
      st[2] += pp * w;
    }
  });
}

// Stores a group's values at their positions of the slice (the whole vector where the group is full).
template <typename T, int P>
__device__ __forceinline__ void store_group(T* gb, const Vec<T, P>& out, const Span& sp, int64_t j0, bool full) {
  if (full) {
    *reinterpret_cast<Vec<T, P>*>(gb + j0) = out;
  } else {
#pragma unroll
    for (int q = 0; q < P; ++q)
      if (sp.valid(j0 + q)) gb[j0 + q] = out.v[q];
  }
}

// Pass (3) over a slice: the gradients (gsb, gtb: bases laid out like sb, tb, or null).
template <Divergence D, int P, typename T, typename A>
__device__ __forceinline__ void pass_div_grad(const T* sb, const T* tb, int64_t o, int64_t n, const DivRow<A>& r,
                                              T* gsb, T* gtb) {
  using Ops = div::ScalarOps<A>;
  const A nan = std::numeric_limits<A>::quiet_NaN();
  const Span sp(o, n, P);
  for_groups<P>(sb, tb, sp, [&](int64_t j0, const Vec<T, P>& vs, const Vec<T, P>& vt, bool full) {
    Vec<T, P> os, ot;
#pragma unroll
    for (int q = 0; q < P; ++q) {
      const A xs = Elem<T>::to(vs.v[q]), xt = Elem<T>::to(vt.v[q]);
      const A pq = r.q(xs), pp = r.p(xt);
      A f, u, w;
      div::terms<D, Ops>(pp, pq, r.lpq(xs, xt), r.k, f, u, w);
      os.v[q] = Elem<T>::from(r.nan ? nan : div::grad<Ops>(r.gcs, pq, u, r.su));
      ot.v[q] = Elem<T>::from(r.nan ? nan : div::grad<Ops>(r.gct, pp, w, r.sw));
    }
    if (gsb) store_group(gsb, os, sp, j0, full);
    if (gtb) store_group(gtb, ot, sp, j0, full);
  });
}

// The per-call constants of a divergence kernel.
template <typename A>
struct DivConsts {
  div::Params<A> k;
  A c;      // log2(e) / T
  A inv_t;  // 1 / T
};

// From the launch's parameters: div::params<A> would round the same doubles to the same values.
template <typename A>
__device__ __forceinline__ DivConsts<A> div_consts(const KLParams& p) {
  DivConsts<A> dc;
  const div::Params<double>& d = p.dk;
  dc.k = {{A(d.m), A(d.one_m), A(d.max_p), A(d.log_max_q)}, A(d.cq), A(d.cp)};
  dc.inv_t = static_cast<A>(p.inv_t);
  dc.c = dc.inv_t * A(kLog2e);
  return dc;
}

// The three passes over a GlobalSlice, each through the 16-byte walk where the slice allows it.
template <typename T, typename A>
__device__ __forceinline__ void slice_mz(const GlobalSlice<T>& sl, A c, A (&mz)[4]) {
  constexpr int P = vec_elems<T>();
  if (sl.vec) pass_mz<P>(sl.s - sl.o, sl.t - sl.o, sl.o, sl.n, c, mz);
  else pass_mz<1>(sl.s, sl.t, 0, sl.n, c, mz);
}
template <Divergence D, typename T, typename A>
__device__ __forceinline__ void slice_stats(const GlobalSlice<T>& sl, const DivRow<A>& r, A (&st)[3]) {
  constexpr int P = vec_elems<T>();
  if (sl.vec) pass_stats<D, P>(sl.s - sl.o, sl.t - sl.o, sl.o, sl.n, r, st);
  else pass_stats<D, 1>(sl.s, sl.t, 0, sl.n, r, st);
}
template <Divergence D, typename T, typename A>
__device__ __forceinline__ void slice_div_grad(const GlobalSlice<T>& sl, const DivRow<A>& r) {
  constexpr int P = vec_elems<T>();
  if (sl.n == 0 || (sl.gs == nullptr && sl.gt == nullptr)) return;
  if (sl.vec) {
    pass_div_grad<D, P>(sl.s - sl.o, sl.t - sl.o, sl.o, sl.n, r, sl.gs ? sl.gs - sl.o : nullptr,
                        sl.gt ? sl.gt - sl.o : nullptr);
  } else {
    pass_div_grad<D, 1>(sl.s, sl.t, 0, sl.n, r, sl.gs, sl.gt);
  }
}

// One block per row: the three passes over the row in global memory (re-reads served by L1/L2).
template <Divergence D, typename T>
__global__ void __launch_bounds__(kThreads) div_rows_kernel(KLParams p) {
  using A = typename Elem<T>::acc;
  const DivConsts<A> dc = div_consts<A>(p);
  KD_SHARED(A, red, [32 * 3]);
  const int64_t row = p.row0 + blockIdx.x;
  const A w = static_cast<const A*>(p.w)[row];
  const GlobalSlice<T> sl(p, row, 0, p.V);
  double* loss = static_cast<double*>(p.kl);
  if (w == A(0)) {
    zero_fill(sl.gs, sl.n);
    zero_fill(sl.gt, sl.n);
    if (threadIdx.x == 0) loss[row] = 0;
    return;
  }
  A mz[4] = {neg_inf<A>(), neg_inf<A>(), A(0), A(0)};
  slice_mz(sl, dc.c, mz);
  reduce_mz(mz, red, dc.c);
  DivRow<A> r = div_row(dc.k, dc.c, dc.inv_t, mz);
  A st[3] = {A(0), A(0), A(0)};
  slice_stats<D>(sl, r, st);
  block_reduce(st, red, AddOp());
  const A v = div_finish(r, dc.k, w, dc.inv_t, st);
  if (threadIdx.x == 0) loss[row] = v;
  slice_div_grad<D>(sl, r);
}

// Chunks path, steps 1 and 3: each (row, chunk) block's partials to part[(row, chunk)]: its (m, z)
// pairs (4 values), or with kStats its {F, SU, SW} (3 values; mz holds the rows' combined pairs).
template <Divergence D, typename T, bool kStats>
__global__ void __launch_bounds__(kThreads) div_chunk_part_kernel(KLParams p, int64_t chunk,
                                                                  const typename Elem<T>::acc* mz,
                                                                  typename Elem<T>::acc* part) {
  using A = typename Elem<T>::acc;
  const DivConsts<A> dc = div_consts<A>(p);
  KD_SHARED(A, red, [32 * 3]);
  const int64_t row = p.row0 + blockIdx.x;
  if (static_cast<const A*>(p.w)[row] == A(0)) return;
  const GlobalSlice<T> sl(p, row, static_cast<int64_t>(blockIdx.y) * chunk, chunk);
  const int64_t at = (row - p.row0) * gridDim.y + blockIdx.y;
  if constexpr (kStats) {
    const A* m = mz + (row - p.row0) * 4;
    const DivRow<A> r = div_row(dc.k, dc.c, dc.inv_t, {m[0], m[1], m[2], m[3]});
    A st[3] = {A(0), A(0), A(0)};
    slice_stats<D>(sl, r, st);
    block_reduce(st, red, AddOp());
    if (threadIdx.x == 0) part[at * 3] = st[0], part[at * 3 + 1] = st[1], part[at * 3 + 2] = st[2];
  } else {
    A m[4] = {neg_inf<A>(), neg_inf<A>(), A(0), A(0)};
    slice_mz(sl, dc.c, m);
    reduce_mz(m, red, dc.c);
    if (threadIdx.x == 0) part[at * 4] = m[0], part[at * 4 + 1] = m[1], part[at * 4 + 2] = m[2], part[at * 4 + 3] = m[3];
  }
}

// Step 2, one thread per row: the chunks' pairs combined in chunk order into mz[row].
template <typename A>
__global__ void div_combine_mz_kernel(KLParams p, int64_t nrows, int nchunk, A c, const A* part, A* mz) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= nrows || static_cast<const A*>(p.w)[p.row0 + i] == A(0)) return;
  const A* q = part + i * nchunk * 4;
  A* out = mz + i * 4;
  for (int side = 0; side < 2; ++side) {
    A m = neg_inf<A>(), z = A(0);
    for (int k = 0; k < nchunk; ++k) m = amax(m, q[4 * k + side]);
    for (int k = 0; k < nchunk; ++k) z += rescale(q[4 * k + 2 + side], q[4 * k + side], m, c);
    out[side] = m, out[2 + side] = z;
  }
}

// Step 4, one thread per row: the chunks' sums added in chunk order into stats[row] and the row's
// value (0 on rows of weight 0).
template <typename A>
__global__ void div_combine_stats_kernel(KLParams p, int64_t nrows, int nchunk, const A* part, A* stats) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= nrows) return;
  double* loss = static_cast<double*>(p.kl);
  if (static_cast<const A*>(p.w)[p.row0 + i] == A(0)) {
    loss[p.row0 + i] = 0;
    return;
  }
  const A* q = part + i * nchunk * 3;
  A st[3] = {A(0), A(0), A(0)};
  for (int k = 0; k < nchunk; ++k) st[0] += q[3 * k], st[1] += q[3 * k + 1], st[2] += q[3 * k + 2];
  A* out = stats + i * 3;
  out[0] = st[0], out[1] = st[1], out[2] = st[2];
  loss[p.row0 + i] = div::row_value(st[0]);
}

// Step 5: each (row, chunk) block's gradients.
template <Divergence D, typename T>
__global__ void __launch_bounds__(kThreads) div_chunk_grad_kernel(KLParams p, int64_t chunk,
                                                                  const typename Elem<T>::acc* mz,
                                                                  const typename Elem<T>::acc* stats) {
  using A = typename Elem<T>::acc;
  const int64_t row = p.row0 + blockIdx.x;
  const A w = static_cast<const A*>(p.w)[row];
  const GlobalSlice<T> sl(p, row, static_cast<int64_t>(blockIdx.y) * chunk, chunk);
  if (w == A(0)) {
    zero_fill(sl.gs, sl.n);
    zero_fill(sl.gt, sl.n);
    return;
  }
  const A* m = mz + (row - p.row0) * 4;
  const A* s = stats + (row - p.row0) * 3;
  const DivConsts<A> dc = div_consts<A>(p);
  DivRow<A> r = div_row(dc.k, dc.c, dc.inv_t, {m[0], m[1], m[2], m[3]});
  div_finish(r, dc.k, w, dc.inv_t, {s[0], s[1], s[2]});
  slice_div_grad<D>(sl, r);
}

// The cluster path: as the KL's (blockIdx.x / C is the row, the cluster rank picks the slice, each
// CTA copies its slice of both inputs into shared memory once), the three passes then run over the
// on-chip copy, so HBM sees one read of each input and one write of each gradient. Same signature
// as kl_cluster_kernel (the cache argument is unused: the exponentials are recomputed).
template <Divergence D, typename T>
__global__ void __launch_bounds__(kThreads) div_cluster_kernel(KLParams p, int C, int64_t slice,
                                                               int64_t raw_bytes, int /*cache*/) {
  using A = typename Elem<T>::acc;
  constexpr int P = vec_elems<T>();
  KD_DYNAMIC_SHARED(smem);
  KD_CLUSTER_SHARED(A, sh);
  // one slot array per cluster reduction (max: maxima, sum: softmax sums, this: the stats): a CTA
  // may push the next reduction's values before another has read the last one's
  KD_SHARED(A, slots_st, [kMaxCluster * 3]);
  const ClusterCta<T> x(p, C, slice, raw_bytes, smem);
  if (!x.start(p, C)) return;
  const GlobalSlice<T>& sl = x.sl;
  T* bs = x.bs;
  T* bt = x.bt;
  const int rank = x.rank;
  // The walks over the copy: student element i at bs[o + i], teacher's at bt[ot + i] (o == ot on
  // the 16-byte walk; the P == 1 walk starts from element 0).
  const T* s1 = bs + sl.o;
  const T* t1 = bt + sl.ot;
  const DivConsts<A> dc = div_consts<A>(p);
  A mz[4] = {neg_inf<A>(), neg_inf<A>(), A(0), A(0)};
  if (sl.vec) pass_mz<P>(bs, bt, sl.o, sl.n, dc.c, mz);
  else pass_mz<1>(s1, t1, 0, sl.n, dc.c, mz);
  reduce_mz(mz, sh.red, dc.c);
  A m[2] = {mz[0], mz[1]};
  cluster_reduce(m, sh.max, C, rank, MaxOp(), true);
  A z[2] = {rescale(mz[2], mz[0], m[0], dc.c), rescale(mz[3], mz[1], m[1], dc.c)};
  cluster_reduce(z, sh.sum, C, rank, AddOp(), false);
  DivRow<A> r = div_row(dc.k, dc.c, dc.inv_t, {m[0], m[1], z[0], z[1]});
  A st[3] = {A(0), A(0), A(0)};
  if (sl.vec) pass_stats<D, P>(bs, bt, sl.o, sl.n, r, st);
  else pass_stats<D, 1>(s1, t1, 0, sl.n, r, st);
  block_reduce(st, sh.red, AddOp());
  cluster_reduce(st, slots_st, C, rank, AddOp(), false);
  const A v = div_finish(r, dc.k, x.w, dc.inv_t, st);
  if (rank == 0 && threadIdx.x == 0) static_cast<double*>(p.kl)[x.row] = v;
  if (sl.n == 0 || (sl.gs == nullptr && sl.gt == nullptr)) return;
  if (sl.vec) {
    pass_div_grad<D, P>(bs, bt, sl.o, sl.n, r, sl.gs ? sl.gs - sl.o : nullptr, sl.gt ? sl.gt - sl.o : nullptr);
  } else {
    pass_div_grad<D, 1>(s1, t1, 0, sl.n, r, sl.gs, sl.gt);
  }
}

// ------------------------------------------------------------------ per-shard passes
//
// The vocab-parallel losses (kdfast/distributed.py) run a row's passes on each rank's slice of its
// vocabulary, merging per-row numbers over the ranks between them (ops softmax_kl_shard_*, glue:
// csrc/cuda/softmax_kl_shard_ops.cpp; CPU twins at the end of csrc/cpu/softmax_kl.cpp). The state
// and sums arrays are (k, rows) in the acc type: value k of row r at [k * rows + r]. p.w holds the
// gradient pass's coef, p.kl the output of the other two. The reductions (statistics, term sums)
// take one block per row; the gradients, which need none, (row, chunk) blocks where the plan cuts
// long rows. Every row is computed (a coef of 0 gives 0 times the terms, as on the CPU).

// Statistics: the slice's maxima of the raw logits (-inf where a side has no mass; a NaN logit is
// skipped by them and reaches the sums), Z_s, Z_t relative to them and, with_a, A in natural units.
template <typename T>
__global__ void __launch_bounds__(kThreads) shard_stats_kernel(KLParams p, bool with_a) {
  using A = typename Elem<T>::acc;
  KD_SHARED(A, red, [32 * 3]);
  const int64_t row = p.row0 + blockIdx.x, R = p.rows;
  const GlobalSlice<T> sl(p, row, 0, p.V);
  A m[2], sums[3];
  slice_max_sums(p, sl, red, m, sums);
  if (threadIdx.x != 0) return;
  A* out = static_cast<A*>(p.kl);
  out[row] = m[0], out[R + row] = m[1], out[2 * R + row] = sums[0], out[3 * R + row] = sums[1];
  if (with_a) out[4 * R + row] = static_cast<A>(static_cast<double>(sums[2]) * kLn2 / p.h);
}

// A row's DivRow from the global state: maxima and softmax sums of the whole row.
template <typename A>
__device__ __forceinline__ DivRow<A> shard_div_row(const DivConsts<A>& dc, const A* state, int64_t R, int64_t row) {
  return div_row(dc.k, dc.c, dc.inv_t, {state[row], state[R + row], state[2 * R + row], state[3 * R + row]});
}

// Term sums (JSD, skew KL, TVD): F, SU, SW over the slice.
template <Divergence D, typename T>
__global__ void __launch_bounds__(kThreads) shard_sums_kernel(KLParams p, const typename Elem<T>::acc* state) {
  using A = typename Elem<T>::acc;
  KD_SHARED(A, red, [32 * 3]);
  const DivConsts<A> dc = div_consts<A>(p);
  const int64_t row = p.row0 + blockIdx.x, R = p.rows;
  const GlobalSlice<T> sl(p, row, 0, p.V);
  A st[3] = {A(0), A(0), A(0)};
  slice_stats<D>(sl, shard_div_row(dc, state, R, row), st);
  block_reduce(st, red, AddOp());
  if (threadIdx.x != 0) return;
  A* out = static_cast<A*>(p.kl);
  out[row] = st[0], out[R + row] = st[1], out[2 * R + row] = st[2];
}

// Gradients of chunk blockIdx.y of the slice: KL from the state (its fifth row A / Z_t in natural
// units), the others from the state and the global F, SU, SW in `sums`.
template <Divergence D, typename T>
__global__ void __launch_bounds__(kThreads) shard_grad_kernel(KLParams p, int64_t chunk,
                                                              const typename Elem<T>::acc* state,
                                                              const typename Elem<T>::acc* sums) {
  using A = typename Elem<T>::acc;
  const int64_t row = p.row0 + blockIdx.x, R = p.rows;
  const GlobalSlice<T> sl(p, row, static_cast<int64_t>(blockIdx.y) * chunk, chunk);
  if (sl.n == 0) return;
  const A w = static_cast<const A*>(p.w)[row];
  if constexpr (D == Divergence::KL) {
    const A inv_t = static_cast<A>(p.inv_t);
    const Frame<A> f(state[row], state[R + row], inv_t, static_cast<A>(p.h));
    // A / Z_t in the kernel's units (base 2, units of h); in double, as the statistics' A
    const A shift = static_cast<A>(static_cast<double>(state[4 * R + row]) * kLog2e * p.h);
    sl.grads_from_global(grad_constants(w, f, inv_t, state[2 * R + row], state[3 * R + row], shift));
  } else {
    const DivConsts<A> dc = div_consts<A>(p);
    DivRow<A> r = shard_div_row(dc, state, R, row);
    div_finish(r, dc.k, w, dc.inv_t, {sums[row], sums[R + row], sums[2 * R + row]});
    slice_div_grad<D>(sl, r);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) scale_rows_kernel(T* grad, int64_t V, int64_t row0, int64_t chunk,
                                                              const typename Elem<T>::acc* ratio,
                                                              int64_t ratio_stride) {
  using A = typename Elem<T>::acc;
  constexpr int P = vec_elems<T>();
  const int64_t row = row0 + blockIdx.x;
  const A r = ratio[row * ratio_stride];
  if (r == A(1)) return;
  for (int64_t v0 = static_cast<int64_t>(blockIdx.y) * chunk; v0 < V; v0 += static_cast<int64_t>(gridDim.y) * chunk) {
    const int64_t n = V - v0 < chunk ? V - v0 : chunk;
    T* g = grad + row * V + v0;
    const int o = align_off(g);
    T* gb = g - o;
    const Span sp(o, n, P);
    for (int64_t gi = threadIdx.x; gi < sp.groups; gi += blockDim.x) {
      const int64_t j0 = gi * P;
      if (sp.full(j0, P)) {
        Vec<T, P> x = *reinterpret_cast<Vec<T, P>*>(gb + j0);
#pragma unroll
        for (int q = 0; q < P; ++q) x.v[q] = Elem<T>::from(Elem<T>::to(x.v[q]) * r);
        *reinterpret_cast<Vec<T, P>*>(gb + j0) = x;
      } else {
#pragma unroll
        for (int q = 0; q < P; ++q)
          if (sp.valid(j0 + q)) gb[j0 + q] = Elem<T>::from(Elem<T>::to(gb[j0 + q]) * r);
      }
    }
  }
}

// ------------------------------------------------------------------ host side

struct DeviceInfo {
  int major = 0, minor = 0, sms = 1, smem_per_sm = 0, smem_optin = 0;
};

cudaError_t device_info(int dev, DeviceInfo& out) {
  static std::mutex mu;
  static std::map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it != cache.end()) {
    out = it->second;
    return cudaSuccess;
  }
  DeviceInfo d;
  cudaError_t e;
  if ((e = cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev)) != cudaSuccess) return e;
  if ((e = cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, dev)) != cudaSuccess) return e;
  if ((e = cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return e;
  if ((e = cudaDeviceGetAttribute(&d.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev)) != cudaSuccess) return e;
  if ((e = cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) != cudaSuccess) return e;
  cache[dev] = d;
  out = d;
  return cudaSuccess;
}

// Environment knobs, for tests and tuning runs (the defaults need none of them), read once
// (softmax_kl_reload_knobs reads them again: tests that switch paths call it):
//   KDFAST_CUDA_KL=auto|cluster|rows|chunks   force a path ("cluster" falls back if it cannot run)
//   KDFAST_CUDA_KL_CLUSTER=1|2|4|8|16         force the cluster size
//   KDFAST_CUDA_KL_CACHE=none|inplace|separate force how the gradient pass gets its exponentials
//   KDFAST_CUDA_KL_CHUNK=<elements>            chunk length of the chunks path
//   KDFAST_CUDA_KL_LOG=1                       print each call's plan to stderr
enum class Force { Auto, Cluster, Rows, Chunks };

struct Knobs {
  Force force = Force::Auto;
  int cluster = 0;        // 0: chosen by the plan
  int cache = -1;         // -1: chosen by the plan, else a CacheMode
  int64_t chunk = 0;      // 0: chosen by the plan
  bool log = false;
};

Knobs read_knobs() {
  auto env = [](const char* name) -> const char* {
    const char* v = std::getenv(name);
    return v != nullptr && *v != '\0' ? v : nullptr;
  };
  Knobs k;
  if (const char* f = env("KDFAST_CUDA_KL")) {
    if (!std::strcmp(f, "cluster")) k.force = Force::Cluster;
    else if (!std::strcmp(f, "rows")) k.force = Force::Rows;
    else if (!std::strcmp(f, "chunks")) k.force = Force::Chunks;
  }
  if (const char* c = env("KDFAST_CUDA_KL_CLUSTER")) k.cluster = std::atoi(c);
  if (const char* c = env("KDFAST_CUDA_KL_CACHE")) {
    if (!std::strcmp(c, "none")) k.cache = kCacheNone;
    else if (!std::strcmp(c, "inplace")) k.cache = kCacheInPlace;
    else if (!std::strcmp(c, "separate")) k.cache = kCacheSeparate;
  }
  if (const char* c = env("KDFAST_CUDA_KL_CHUNK")) k.chunk = std::atoll(c);
  k.log = env("KDFAST_CUDA_KL_LOG") != nullptr;
  return k;
}

std::mutex& knobs_mutex() {
  static std::mutex mu;
  return mu;
}

Knobs& knobs_slot() {
  static Knobs k = read_knobs();
  return k;
}

Knobs knobs() {
  std::lock_guard<std::mutex> lock(knobs_mutex());
  return knobs_slot();
}

// The plan's sizes and thresholds are in common/tuning.h.
using namespace tuning;
// grid.y holds at most this many chunks per row.
constexpr int64_t kMaxGridY = 65535;

enum class Path { Cluster, Rows, Chunks };

struct Plan {
  Path path = Path::Rows;
  int C = 1;
  int64_t slice = 0, raw_bytes = 0;
  int cache = kCacheNone;
  size_t smem = 0;
  int64_t chunk = 0;
  int nchunk = 1;
};

constexpr int64_t kMaxRowsPerLaunch = int64_t(1) << 26;  // keeps C * rows within grid.x

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// [student slice | teacher slice], then the kCacheSeparate exponentials.
template <typename T>
void cluster_layout(int64_t V, int C, int cache, Plan& pl) {
  using A = typename Elem<T>::acc;
  constexpr int P = vec_elems<T>();
  pl.C = C;
  pl.slice = std::max<int64_t>(round_up((V + C - 1) / C, P), P);
  // room for the offset within 16 bytes and the rounding to whole 16-byte chunks
  pl.raw_bytes = round_up(pl.slice * static_cast<int64_t>(sizeof(T)) + 32, 256);
  pl.cache = cache;
  int64_t bytes = 2 * pl.raw_bytes;
  if (cache == kCacheSeparate) bytes += 2 * (pl.raw_bytes / static_cast<int64_t>(sizeof(T))) * static_cast<int64_t>(sizeof(A));
  pl.smem = static_cast<size_t>(bytes);
}

using ClusterKernel = void (*)(KLParams, int, int64_t, int64_t, int);

// The launch configuration of C-CTA clusters (C > 1), ctas CTAs in all.
struct ClusterLaunch {
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t cfg = {};
  ClusterLaunch(int C, int64_t ctas, size_t smem, cudaStream_t stream) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = C;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.gridDim = dim3(static_cast<unsigned>(ctas), 1, 1);
    cfg.blockDim = dim3(kThreads, 1, 1);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
};

// Sets a cluster kernel's dynamic shared memory ceiling (and permission for clusters of 16) once
// per device.
cudaError_t prepare_cluster_kernel(ClusterKernel kernel, int dev, const DeviceInfo& d) {
  static std::mutex mu;
  static std::map<std::pair<int, ClusterKernel>, cudaError_t> done;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(dev, kernel);
  auto it = done.find(key);
  if (it != done.end()) return it->second;
  cudaFuncAttributes fa;
  cudaError_t e = cudaFuncGetAttributes(&fa, kernel);
  if (e == cudaSuccess) {
    const int dyn = d.smem_optin - static_cast<int>(fa.sharedSizeBytes);
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dyn);
  }
  if (e == cudaSuccess && d.major >= 9) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  }
  if (e != cudaSuccess) cudaGetLastError();  // not sticky; the caller falls back
  done[key] = e;
  return e;
}

// How many clusters of this shape can be resident on the whole device; 0 if none.
int cluster_capacity(ClusterKernel kernel, int dev, const DeviceInfo& d, const Plan& pl) {
  static std::mutex mu;
  static std::map<std::tuple<int, ClusterKernel, int, size_t>, int> cache;
  const auto key = std::make_tuple(dev, kernel, pl.C, pl.smem);
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int n = 0;
  cudaError_t e;
  if (pl.C == 1) {
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, pl.smem);
    n *= d.sms;
  } else {
    const ClusterLaunch l(pl.C, pl.C, pl.smem, nullptr);
    e = cudaOccupancyMaxActiveClusters(&n, kernel, &l.cfg);
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    n = 0;
  }
  std::lock_guard<std::mutex> lock(mu);
  cache[key] = n;
  return n;
}

// The global-memory fallbacks (and the only paths of the other divergences): one block per row, or
// (row, chunk) blocks for long rows and for rows longer than a few thousand when there are few.
Plan global_plan(int64_t R, int64_t V, const DeviceInfo& d, const Knobs& kn) {
  Plan pl;
  int64_t chunk = kn.chunk;
  const bool chunks = kn.force == Force::Chunks || chunk > 0 ||
                      (kn.force != Force::Rows && (V > kChunkRowsAbove || (R < d.sms && V > kChunkFewRowsAbove)));
  if (!chunks) {
    pl.path = Path::Rows;
    pl.chunk = V;
    pl.nchunk = 1;
    return pl;
  }
  if (chunk <= 0) chunk = V > kChunkRowsAbove ? kLongRowChunk : kShortRowChunk;
  chunk = std::max<int64_t>(chunk, (V + kMaxGridY - 1) / kMaxGridY);
  chunk = round_up(chunk, 16);
  pl.path = Path::Chunks;
  pl.chunk = chunk;
  pl.nchunk = static_cast<int>((V + chunk - 1) / chunk);
  if (pl.nchunk == 1) pl.path = Path::Rows;
  return pl;
}

// kernel: kl_cluster_kernel<T> or div_cluster_kernel<D, T> (which caches no exponentials).
template <typename T>
Plan make_plan(const SoftmaxKLArgs& a, int dev, const DeviceInfo& d, const Knobs& kn, ClusterKernel kernel) {
  using A = typename Elem<T>::acc;
  const int64_t R = a.rows, V = a.cols;
  // (only KL's gradient pass reads cached exponentials: the other divergences recompute them)
  const bool want_grad = (a.grad_student != nullptr || a.grad_teacher != nullptr) && a.divergence == Divergence::KL;

  if ((kn.force == Force::Auto || kn.force == Force::Cluster) && d.major >= 8 &&
      prepare_cluster_kernel(kernel, dev, d) == cudaSuccess) {
    const bool inplace_ok = sizeof(T) == sizeof(A) && a.grad_teacher == nullptr;
    int cache = want_grad && inplace_ok ? kCacheInPlace : kCacheNone;
    if (want_grad && kn.cache >= 0) cache = kn.cache;
    if (!want_grad) cache = kCacheNone;
    if (cache == kCacheInPlace && !inplace_ok) cache = kCacheNone;
    const int max_c = d.major >= 9 ? kMaxCluster : 1;
    const int64_t two_per_sm = d.smem_per_sm / 2 - kSmemReserve;
    const int64_t one_per_sm = std::min<int64_t>(d.smem_optin, d.smem_per_sm) - kSmemReserve;
    const int want_c = kn.cluster;
    // Candidates, best first: a forced size; else the smallest cluster whose slices leave room for
    // two CTAs per SM (widened for few rows so that every SM gets work), the larger ones, then those
    // that need a whole SM per CTA. The first one the device can hold wins.
    std::vector<Plan> cands;
    auto add = [&](int C, int64_t budget) {
      Plan c;
      cluster_layout<T>(V, C, cache, c);
      if (static_cast<int64_t>(c.smem) <= budget) cands.push_back(c);
    };
    if (want_c >= 1 && want_c <= max_c && (want_c & (want_c - 1)) == 0) {
      add(want_c, one_per_sm);
    } else {
      for (int64_t budget : {two_per_sm, one_per_sm}) {
        for (int C = 1; C <= max_c; C *= 2) {
          const size_t before = cands.size();
          add(C, budget);
          if (cands.size() > before && budget == one_per_sm &&
              static_cast<int64_t>(cands.back().smem) <= two_per_sm) {
            cands.pop_back();  // already listed in the first round
          }
        }
      }
      if (!cands.empty()) {  // few rows: spread the first choice over more CTAs
        Plan& c = cands.front();
        while (c.C * 2 <= std::min(kMaxSpreadCluster, max_c) && R * c.C < kSpreadCtasPerSm * d.sms &&
               c.slice >= kMinSpreadSlice) {
          cluster_layout<T>(V, c.C * 2, cache, c);
        }
      }
    }
    for (Plan& c : cands) {
      if (cluster_capacity(kernel, dev, d, c) > 0) {
        c.path = Path::Cluster;
        return c;
      }
    }
  }
  return global_plan(R, V, d, kn);
}

// The chunks path's scratch: per row of a launch, `values` accumulators for each chunk and as many
// for the row (KL: 5 partials and 5 stats; the other divergences: 4 + 3 partials, 4 + 3 combined).
template <typename T>
size_t workspace_for(const Plan& pl, int64_t rows, int64_t values) {
  using A = typename Elem<T>::acc;
  if (pl.path != Path::Chunks) return 0;
  const int64_t nr = std::min(rows, kMaxRowsPerLaunch);
  return static_cast<size_t>(nr * (pl.nchunk + 1) * values) * sizeof(A);
}

// The launch parameters of a call on a student / teacher pair (SoftmaxKLArgs or ShardArgs), with its
// per-row weights w and per-row output kl.
template <typename Args>
KLParams to_params(const Args& a, const void* w, void* kl) {
  KLParams p{};
  p.s = a.student, p.t = a.teacher;
  p.s_stride = a.student_row_stride, p.t_stride = a.teacher_row_stride;
  p.rows = a.rows, p.V = a.cols;
  p.inv_t = a.inv_temperature;
  p.h = std::ldexp(1.0, -kl::scale_exponent(a.cols, a.inv_temperature));
  p.w = w, p.kl = kl;
  p.gs = a.grad_student, p.gt = a.grad_teacher;
  p.row0 = 0;
  return p;
}

cudaError_t launch_clusters(ClusterKernel kernel, int64_t ctas, const Plan& pl, const KLParams& p,
                            cudaStream_t stream) {
  if (pl.C == 1) {
    KD_LAUNCH(dim3(static_cast<unsigned>(ctas)), kThreads, pl.smem, stream, kernel)(p, 1, pl.slice, pl.raw_bytes, pl.cache);
    return cudaGetLastError();
  }
  const ClusterLaunch l(pl.C, ctas, pl.smem, stream);
  return cudaLaunchKernelEx(&l.cfg, kernel, p, pl.C, pl.slice, pl.raw_bytes, pl.cache);
}

void log_plan(const SoftmaxKLArgs& a, const Plan& pl, const Knobs& kn) {
  if (!kn.log) return;
  if (pl.path == Path::Cluster) {
    std::fprintf(stderr, "kdfast softmax_kl cuda: rows=%lld V=%lld divergence=%d path=cluster C=%d cache=%d smem=%zu\n",
                 (long long)a.rows, (long long)a.cols, static_cast<int>(a.divergence), pl.C, pl.cache, pl.smem);
  } else {
    std::fprintf(stderr, "kdfast softmax_kl cuda: rows=%lld V=%lld divergence=%d path=%s chunk=%lld nchunk=%d\n",
                 (long long)a.rows, (long long)a.cols, static_cast<int>(a.divergence),
                 pl.path == Path::Rows ? "rows" : "chunks", (long long)pl.chunk, pl.nchunk);
  }
}

// JSD, skew KL and TVD: the cluster path where it runs, else the global-memory ones.
template <Divergence D, typename T>
cudaError_t run_div(const SoftmaxKLArgs& a, void* workspace, cudaStream_t stream, size_t* ws_only, int dev,
                    const DeviceInfo& d, const Knobs& kn) {
  using A = typename Elem<T>::acc;
  const Plan pl = make_plan<T>(a, dev, d, kn, div_cluster_kernel<D, T>);
  if (ws_only != nullptr) {
    *ws_only = workspace_for<T>(pl, a.rows, 7);
    return cudaSuccess;
  }
  log_plan(a, pl, kn);
  KLParams p = to_params(a, a.row_weight, a.loss_rows);
  p.dk = div::params<double>(a.divergence, a.mix);
  const bool want_grad = a.grad_student != nullptr || a.grad_teacher != nullptr;
  for (int64_t r0 = 0; r0 < a.rows; r0 += kMaxRowsPerLaunch) {
    const int64_t nr = std::min(a.rows - r0, kMaxRowsPerLaunch);
    p.row0 = r0;
    cudaError_t e;
    if (pl.path == Path::Cluster) {
      if ((e = launch_clusters(div_cluster_kernel<D, T>, nr * pl.C, pl, p, stream)) != cudaSuccess) return e;
      continue;
    }
    if (pl.path == Path::Rows) {
      KD_LAUNCH(dim3(static_cast<unsigned>(nr), 1), kThreads, 0, stream, div_rows_kernel<D, T>)(p);
      if ((e = cudaGetLastError()) != cudaSuccess) return e;
      continue;
    }
    A* part_mz = static_cast<A*>(workspace);
    A* mz = part_mz + nr * pl.nchunk * 4;
    A* part_st = mz + nr * 4;
    A* stats = part_st + nr * pl.nchunk * 3;
    const dim3 grid(static_cast<unsigned>(nr), static_cast<unsigned>(pl.nchunk));
    const unsigned per_row = static_cast<unsigned>((nr + 255) / 256);
    const A c = static_cast<A>(p.inv_t) * A(kLog2e);
    KD_LAUNCH(grid, kThreads, 0, stream, div_chunk_part_kernel<D, T, false>)(p, pl.chunk, nullptr, part_mz);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    KD_LAUNCH(per_row, 256, 0, stream, div_combine_mz_kernel<A>)(p, nr, pl.nchunk, c, part_mz, mz);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    KD_LAUNCH(grid, kThreads, 0, stream, div_chunk_part_kernel<D, T, true>)(p, pl.chunk, mz, part_st);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    KD_LAUNCH(per_row, 256, 0, stream, div_combine_stats_kernel<A>)(p, nr, pl.nchunk, part_st, stats);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    if (want_grad) {
      KD_LAUNCH(grid, kThreads, 0, stream, div_chunk_grad_kernel<D, T>)(p, pl.chunk, mz, stats);
      if ((e = cudaGetLastError()) != cudaSuccess) return e;
    }
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t run(const SoftmaxKLArgs& a, void* workspace, cudaStream_t stream, size_t* ws_only) {
  using A = typename Elem<T>::acc;
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  DeviceInfo d;
  if ((e = device_info(dev, d)) != cudaSuccess) return e;
  const Knobs kn = knobs();
  switch (a.divergence) {
    case Divergence::KL: break;
    case Divergence::JSD: return run_div<Divergence::JSD, T>(a, workspace, stream, ws_only, dev, d, kn);
    case Divergence::SkewKL: return run_div<Divergence::SkewKL, T>(a, workspace, stream, ws_only, dev, d, kn);
    case Divergence::TVD: return run_div<Divergence::TVD, T>(a, workspace, stream, ws_only, dev, d, kn);
    default: return cudaErrorInvalidValue;  // the glue reduces the rest to these (common/args.h)
  }
  const Plan pl = make_plan<T>(a, dev, d, kn, kl_cluster_kernel<T>);
  if (ws_only != nullptr) {
    *ws_only = workspace_for<T>(pl, a.rows, 5);
    return cudaSuccess;
  }
  log_plan(a, pl, kn);
  KLParams p = to_params(a, a.row_weight, a.loss_rows);
  for (int64_t r0 = 0; r0 < a.rows; r0 += kMaxRowsPerLaunch) {
    const int64_t nr = std::min(a.rows - r0, kMaxRowsPerLaunch);
    p.row0 = r0;
    if (pl.path == Path::Cluster) {
      e = launch_clusters(kl_cluster_kernel<T>, nr * pl.C, pl, p, stream);
    } else if (pl.path == Path::Rows) {
      KD_LAUNCH(dim3(static_cast<unsigned>(nr), 1), kThreads, 0, stream, kl_rows_kernel<T>)(p, a.cols, true, nullptr);
      e = cudaGetLastError();
    } else {
      A* part = static_cast<A*>(workspace);
      A* stats = part + nr * pl.nchunk * 5;
      const dim3 grid(static_cast<unsigned>(nr), static_cast<unsigned>(pl.nchunk));
      KD_LAUNCH(grid, kThreads, 0, stream, kl_rows_kernel<T>)(p, pl.chunk, false, part);
      if ((e = cudaGetLastError()) != cudaSuccess) return e;
      KD_LAUNCH(static_cast<unsigned>((nr + 255) / 256), 256, 0, stream, kl_combine_kernel<A>)(p, nr, pl.nchunk, part, stats);
      if ((e = cudaGetLastError()) != cudaSuccess) return e;
      if (a.grad_student != nullptr || a.grad_teacher != nullptr) {
        KD_LAUNCH(grid, kThreads, 0, stream, kl_grad_kernel<T>)(p, pl.chunk, stats);
        e = cudaGetLastError();
      }
    }
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

// p.w: the gradient pass's coef; p.kl: the statistics' or term sums' output.
KLParams shard_params(const kernel::ShardArgs& a) {
  KLParams p = to_params(a, a.coef, a.out);
  if (a.divergence != Divergence::KL) p.dk = div::params<double>(a.divergence, a.mix);
  return p;
}

// The term sums (no gradient pointer; not KL) or the gradients of a slice.
template <Divergence D, typename T>
cudaError_t run_shard_pass(const kernel::ShardArgs& a, cudaStream_t stream) {
  using A = typename Elem<T>::acc;
  const bool grads = a.grad_student != nullptr || a.grad_teacher != nullptr;
  if (!grads && D == Divergence::KL) return cudaErrorInvalidValue;
  Plan pl;
  if (grads) {  // the global-memory plan's chunks: the gradients need no reduction across them
    int dev = 0;
    DeviceInfo d;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = device_info(dev, d);
    if (e != cudaSuccess) return e;
    pl = global_plan(a.rows, a.cols, d, knobs());
  }
  KLParams p = shard_params(a);
  const A* state = static_cast<const A*>(a.state);
  for (int64_t r0 = 0; r0 < a.rows; r0 += kMaxRowsPerLaunch) {
    const int64_t nr = std::min(a.rows - r0, kMaxRowsPerLaunch);
    p.row0 = r0;
    if (grads) {
      KD_LAUNCH(dim3(static_cast<unsigned>(nr), static_cast<unsigned>(pl.nchunk)), kThreads, 0, stream,
                shard_grad_kernel<D, T>)(p, pl.chunk, state, static_cast<const A*>(a.row_sums));
    } else if constexpr (D != Divergence::KL) {
      KD_LAUNCH(dim3(static_cast<unsigned>(nr)), kThreads, 0, stream, shard_sums_kernel<D, T>)(p, state);
    }
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t softmax_kl_shard_stats(const kernel::ShardArgs& a, cudaStream_t stream) {
  return by_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    KLParams p = shard_params(a);
    for (int64_t r0 = 0; r0 < a.rows; r0 += kMaxRowsPerLaunch) {
      const int64_t nr = std::min(a.rows - r0, kMaxRowsPerLaunch);
      p.row0 = r0;
      KD_LAUNCH(dim3(static_cast<unsigned>(nr)), kThreads, 0, stream, shard_stats_kernel<T>)(p, a.with_a);
      const cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
  });
}

cudaError_t softmax_kl_shard_pass(const kernel::ShardArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;
  return by_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    switch (a.divergence) {
      case Divergence::KL: return run_shard_pass<Divergence::KL, T>(a, stream);
      case Divergence::JSD: return run_shard_pass<Divergence::JSD, T>(a, stream);
      case Divergence::SkewKL: return run_shard_pass<Divergence::SkewKL, T>(a, stream);
      case Divergence::TVD: return run_shard_pass<Divergence::TVD, T>(a, stream);
      default: return cudaErrorInvalidValue;  // the caller swaps the inputs for the reverse forms
    }
  });
}

void softmax_kl_reload_knobs() {
  const Knobs k = read_knobs();
  std::lock_guard<std::mutex> lock(knobs_mutex());
  knobs_slot() = k;
}

size_t softmax_kl_workspace(const SoftmaxKLArgs& a) {
  size_t ws = 0;
  by_dtype(a.dtype, [&](auto tag) { return run<decltype(tag)>(a, nullptr, nullptr, &ws); });
  return ws;
}

cudaError_t softmax_kl(const SoftmaxKLArgs& a, void* workspace, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  return by_dtype(a.dtype, [&](auto tag) { return run<decltype(tag)>(a, workspace, stream, nullptr); });
}

cudaError_t scale_rows(DType dtype, void* grad, int64_t rows, int64_t vocab, const void* ratio, int64_t ratio_stride,
                       cudaStream_t stream) {
  if (rows == 0 || vocab == 0) return cudaSuccess;
  int dev = 0;
  DeviceInfo d;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = device_info(dev, d);
  if (err != cudaSuccess) return err;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Elem<T>::acc;
    // Rows are cut into chunks only as far as few rows need it to fill the device: in the usual
    // backward every row's ratio is 1 and its blocks exit at once, so fewer blocks cost less.
    const int64_t chunk = kScaleChunk;
    const int64_t fill = std::max<int64_t>(1, (kScaleBlocksPerSm * d.sms + rows - 1) / rows);
    const int64_t nchunk = std::min<int64_t>({(vocab + chunk - 1) / chunk, fill, kMaxGridY});
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRowsPerLaunch) {
      const int64_t nr = std::min(rows - r0, kMaxRowsPerLaunch);
      KD_LAUNCH(dim3(static_cast<unsigned>(nr), static_cast<unsigned>(nchunk)), kThreads, 0, stream, scale_rows_kernel<T>)(
          static_cast<T*>(grad), vocab, r0, chunk, static_cast<const A*>(ratio), ratio_stride);
      cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
  });
}

}  // namespace cuda
}  // namespace kdfast
