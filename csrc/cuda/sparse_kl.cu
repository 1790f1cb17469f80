// The top-k KL on CUDA (math: csrc/common/sparse_kl.h; contract: kernel::SparseKLArgs), forward and
// gradients in one launch: one CTA per row.
//
// Per row: the K ids are checked and marked in a shared-memory bitmap of V bits (atomicOr: a bit
// already set is a repeated id); one pass over the student row takes each thread's running
// (max, sum, unlisted sum) online, combined across the CTA; the K entries are gathered and the
// teacher's side reduced; then the dense gradient Q_v times a constant is written once, coalesced,
// and the K listed entries are overwritten after a barrier. Nothing of the row's size but the
// gradient; half-precision students are read as they are.
#include <cstdint>
#include <limits>

#include "common/sparse_kl.h"
#include "cuda/elem.cuh"
#include "cuda/kernels.h"

namespace kdfast {
namespace cuda {
namespace {

using kernel::SparseTail;
constexpr int kThreads = 256;

// The running (max, sum, unlisted sum) of a softmax, merged as online softmax does. A NaN max
// stays NaN (it makes the row NaN).
template <typename A>
struct Online {
  A m, z, zo;
  __device__ __forceinline__ void add(A x, bool listed, A invt) {
    if (x > m) {
      const A f = m == -std::numeric_limits<A>::infinity() ? A(0) : exp((m - x) * invt);
      z *= f, zo *= f, m = x;
    } else if (x != x) {
      m = x;
    }
    const A e = m == -std::numeric_limits<A>::infinity() ? A(0) : exp((x - m) * invt);
    z += e;
    if (!listed) zo += e;
  }
  __device__ __forceinline__ void merge(const Online& o, A invt) {
    if (o.m != o.m || m != m) {
      m = m != m ? m : o.m;
      return;
    }
    const A mm = o.m > m ? o.m : m;
    if (mm == -std::numeric_limits<A>::infinity()) return;
    const A a = exp((m - mm) * invt), b = exp((o.m - mm) * invt);
    z = z * a + o.z * b, zo = zo * a + o.zo * b, m = mm;
  }
};

// Sums over the CTA (every thread gets the result).
template <typename A>
__device__ A block_sum(A v, A* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const A r = red[0];
  __syncthreads();
  return r;
}

template <typename A>
__device__ A block_max(A v, A* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) {
      const A o = red[threadIdx.x + s];
      if (o > red[threadIdx.x] || o != o) red[threadIdx.x] = o;
    }
    __syncthreads();
  }
  const A r = red[0];
  __syncthreads();
  return r;
}

__device__ __forceinline__ void report(int64_t* status, int64_t code) {
  atomicMin(reinterpret_cast<unsigned long long*>(status), static_cast<unsigned long long>(code));
}

template <typename I>
__device__ __forceinline__ int64_t id_at(const void* p, int64_t i) {
  return static_cast<int64_t>(static_cast<const I*>(p)[i]);
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads) sparse_kl_kernel(kernel::SparseKLArgs p) {
  using A = typename Elem<T>::acc;
  KD_SHARED(A, red, [kThreads]);
  KD_SHARED(double, red_value, [kThreads]);  // the row value sums in double (see below)
  KD_SHARED(Online<A>, part, [kThreads]);
  KD_SHARED(int, flags, [2]);
  KD_DYNAMIC_SHARED(smem);
  uint32_t* bits = reinterpret_cast<uint32_t*>(smem);
  const int64_t r = blockIdx.x, V = p.vocab, K = p.k, tid = threadIdx.x;
  const T* s = static_cast<const T*>(p.student) + r * p.student_row_stride;
  const A* l = static_cast<const A*>(p.teacher) + r * p.teacher_row_stride;
  const int64_t ib = r * p.index_row_stride;
  T* gs = p.grad_student ? static_cast<T*>(p.grad_student) + r * V : nullptr;
  A* gt = p.grad_teacher ? static_cast<A*>(p.grad_teacher) + r * K : nullptr;
  const A w = static_cast<const A*>(p.row_weight)[r];
  const A invt = static_cast<A>(p.inv_temperature), post = static_cast<A>(p.grad_scale);
  const bool bucket = p.tail == SparseTail::Bucket;
  const A ninf = -std::numeric_limits<A>::infinity(), nan = std::numeric_limits<A>::quiet_NaN();
  auto id = [&](int64_t k) { return p.indices_int32 ? id_at<int32_t>(p.indices, ib + k) : id_at<int64_t>(p.indices, ib + k); };
  if (w == A(0)) {
    if (tid == 0) static_cast<double*>(p.loss_rows)[r] = 0;
    for (int64_t v = tid; gs && v < V; v += kThreads) gs[v] = Elem<T>::from(A(0) * post);
    for (int64_t k = tid; gt && k < K; k += kThreads) gt[k] = A(0) * post;
    return;
  }
  // ---- the ids: checked and marked
  const int64_t words = (V + 31) / 32;
  for (int64_t i = tid; i < words; i += kThreads) bits[i] = 0;
  if (tid < 2) flags[tid] = 0;
  __syncthreads();
  for (int64_t k = tid; k < K; k += kThreads) {
    const int64_t v = id(k);
    if (v < 0 || v >= V) {
      report(p.status, 2 * (r * K + k));
      flags[0] = 1;
    } else if (atomicOr(&bits[v >> 5], 1u << (v & 31)) & (1u << (v & 31))) {
      flags[1] = 1;
    }
  }
  __syncthreads();
  if (flags[1]) {  // a repeat: report the later of each pair (the one with an equal id before it)
    for (int64_t k = tid; k < K; k += kThreads) {
      const int64_t v = id(k);
      for (int64_t j = 0; j < k; ++j) {
        if (id(j) == v) {
          report(p.status, 2 * (r * K + k) + 1);
          break;
        }
      }
    }
  }
  if (flags[0] || flags[1]) return;
  // ---- the student's pass
  Online<A> o{ninf, A(0), A(0)};
  for (int64_t v = tid; v < V; v += kThreads) o.add(Elem<T>::to(s[v]), bits[v >> 5] >> (v & 31) & 1u, invt);
  part[tid] = o;
  __syncthreads();
  for (int st = kThreads / 2; st > 0; st >>= 1) {
    if (tid < st) {
      Online<A> a = part[tid];
      a.merge(part[tid + st], invt);
      part[tid] = a;
    }
    __syncthreads();
  }
  const Online<A> row = part[0];
  const A m = row.m, log_z = log(row.z);
  // ---- the teacher's side
  A log_zp = A(0);
  if (!bucket) {
    A mx = ninf;
    for (int64_t k = tid; k < K; k += kThreads) {
      const A b = l[k] * invt;
      mx = (b > mx || b != b) ? b : mx;
    }
    mx = block_max(mx, red);
    A zp = A(0);
    for (int64_t k = tid; k < K; k += kThreads) zp += exp(l[k] * invt - mx);
    log_zp = mx + log(block_sum(zp, red));
  }
  auto logs = [&](int64_t k, A& lp, A& lq) {
    lp = bucket ? l[k] : l[k] * invt - log_zp;
    lq = (Elem<T>::to(s[id(k)]) - m) * invt - log_z;
  };
  // The stored row is also summed in double (value_d), with the student's log-probabilities in
  // double: the KL of float logits reaches 2 FLT_MAX / T (the rows are float64, as softmax_kl's),
  // where the weighted row still fits a float. The gradients read the float sum, whose terms they
  // share.
  A sp = A(0), val = A(0);
  double val_d = 0;
  for (int64_t k = tid; k < K; k += kThreads) {
    A lp, lq;
    logs(k, lp, lq);
    const A pk = exp(lp);
    sp += pk;
    val += sparse::term(pk, lp, lq);
    const double lqd = (double(Elem<T>::to(s[id(k)])) - double(m)) * double(invt) - double(log_z);
    val_d += sparse::term(double(pk), double(lp), lqd);
  }
  const A sum_p = block_sum(sp, red);
  const auto f = sparse::finish_row<A>(p.tail, sum_p, bucket ? row.zo / row.z : A(0), K < V);
  const A value = block_sum(val, red) + f.tail_term;
  const double value_d = block_sum(val_d, red_value) + double(f.tail_term);
  if (tid == 0) static_cast<double*>(p.loss_rows)[r] = value_d;
  if (value != value) {  // NaN gradients throughout, as the reference gives them
    for (int64_t v = tid; gs && v < V; v += kThreads) gs[v] = Elem<T>::from(nan);
    for (int64_t k = tid; gt && k < K; k += kThreads) gt[k] = nan;
    return;
  }
  const A coef = w * invt;
  if (gs) {
    const A scale = coef * f.c_out / row.z * post;
    for (int64_t v = tid; v < V; v += kThreads) {
      const A x = Elem<T>::to(s[v]);
      gs[v] = Elem<T>::from(exp((x - m) * invt) * scale);
    }
    __syncthreads();  // the dense writes land before the listed entries are overwritten
    for (int64_t k = tid; k < K; k += kThreads) {
      A lp, lq;
      logs(k, lp, lq);
      gs[id(k)] = Elem<T>::from(coef * (exp(lq) * f.c_in - exp(lp)) * post);
    }
  }
  if (gt) {
    const A ct = bucket ? w : coef;
    for (int64_t k = tid; k < K; k += kThreads) {
      A lp, lq;
      logs(k, lp, lq);
      gt[k] = ct * sparse::grad_teacher<A>(p.tail, exp(lp), lp, lq, value, f) * post;
    }
  }
}

}  // namespace

size_t sparse_kl_smem(int64_t vocab) { return static_cast<size_t>((vocab + 31) / 32) * sizeof(uint32_t); }

cudaError_t sparse_kl(const kernel::SparseKLArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  const size_t smem = sparse_kl_smem(a.vocab);
  return by_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    auto launch = [&](auto fn) {
      if (smem > 48 * 1024) {
        const cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
        if (e != cudaSuccess) return e;
      }
      KD_LAUNCH(static_cast<unsigned>(a.rows), kThreads, smem, stream, fn)(a);
      return cudaGetLastError();
    };
    return a.indices_int32 ? launch(sparse_kl_kernel<T, int32_t>) : launch(sparse_kl_kernel<T, int64_t>);
  });
}

}  // namespace cuda
}  // namespace kdfast
