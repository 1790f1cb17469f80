// The top-k KL on the CPU (math: csrc/common/sparse_kl.h): forward and gradients in one call.
//
// Each thread takes whole rows. Per row: the K ids are checked and marked in a per-thread bitmap
// of V bits; one streaming pass over the student row takes its maximum and sums block by block
// (online softmax: each block read from memory once, its maximum and exponentials taken while it
// sits in L1), the bucket tail's sum over the unlisted ids beside them; the K listed entries are
// gathered; and the gradient pass writes Q_v times a constant over the row (recomputing the
// exponentials from the row, which is still in L2) and then overwrites the K listed entries. No
// buffer of the row's size besides the gradient, and half-precision students are read as they are.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/sparse_kl.h"
#include "common/tuning.h"
#include "cpu/fast_exp.h"
#include "cpu/kernels.h"
#include "cpu/vec_io.h"

namespace kdfast {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using FVec = Vectorized<float>;
using kernel::SparseTail;

constexpr int64_t kStep = 2 * FVec::size();  // elements per vector step (16 or 32: within one bitmap word)
constexpr int64_t kBlock = tuning::kKLBlock;  // elements per online-softmax block (a multiple of kStep)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline void report(int64_t* status, int64_t code) {
  int64_t cur = __atomic_load_n(status, __ATOMIC_RELAXED);
  while (code < cur && !__atomic_compare_exchange_n(status, &cur, code, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

// The ids of one row marked in a bitmap of V bits (cleared again by unmark), checked on the way:
// false (and status lowered) for an id out of range or repeated.
template <typename I>
bool mark(const I* idx, int64_t K, int64_t V, int64_t row, uint64_t* bits, int64_t* status) {
  for (int64_t k = 0; k < K; ++k) {
    const int64_t v = static_cast<int64_t>(idx[k]);
    const bool bad = v < 0 || v >= V;
    if (bad || (bits[v >> 6] >> (v & 63) & 1)) {
      report(status, 2 * (row * K + k) + (bad ? 0 : 1));
      for (int64_t j = 0; j < k; ++j) bits[static_cast<int64_t>(idx[j]) >> 6] = 0;
      return false;
    }
    bits[v >> 6] |= uint64_t(1) << (v & 63);
  }
  return true;
}
template <typename I>
void unmark(const I* idx, int64_t K, uint64_t* bits) {
  for (int64_t k = 0; k < K; ++k) bits[static_cast<int64_t>(idx[k]) >> 6] = 0;
}

// The kStep bits of the bitmap for the step starting at v (a multiple of kStep).
inline uint64_t step_bits(const uint64_t* bits, int64_t v) {
  const uint64_t w = bits[v >> 6] >> (v & 63);
  return kStep == 64 ? w : w & ((uint64_t(1) << kStep) - 1);
}

// n < kStep elements as floats, padded to a full step with -inf (exponential 0).
struct Tail {
  float x[kStep];
  template <typename T>
  Tail(const T* p, int64_t n) {
    for (int64_t i = 0; i < kStep; ++i) x[i] = i < n ? static_cast<float>(p[i]) : kNegInf;
  }
};

template <typename T>
inline void prefetch_step(const T* p) {
  for (int64_t off = 0; off < int64_t(kStep * sizeof(T)); off += 64) __builtin_prefetch(reinterpret_cast<const char*>(p) + off);
}

inline float reduce_sum(FVec x) {
  return at::vec::vec_reduce_all<float>([](FVec& a, FVec& b) { return a + b; }, x);
}

// The student's streaming pass (float accumulation): max m and, relative to it, Z = sum exp(a_v)
// and (want_out) Z_out = the same sum over the ids not marked in bits. Block sums go to double.
template <typename T>
void student_stats(const T* s, int64_t V, float invt, const uint64_t* bits, bool want_out, float& m, double& z,
                   double& z_out) {
  const FVec ex = exp_scale(1.f), vit(invt);
  m = kNegInf, z = 0, z_out = 0;
  bool nan = false;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t bn = std::min(kBlock, V - b0);
    const T* sb = s + b0;
    FVec vm(kNegInf);
    int64_t i = 0;
    for (; i + kStep <= bn; i += kStep) {
      FVec x0, x1;
      load2(sb + i, x0, x1);
      vm = at::vec::maximum(vm, at::vec::maximum(x0, x1));  // NaN-propagating
    }
    if (i < bn) {
      const Tail t(sb + i, bn - i);
      vm = at::vec::maximum(vm, at::vec::maximum(FVec::loadu(t.x), FVec::loadu(t.x + FVec::size())));
    }
    const float bm = at::vec::vec_reduce_all<float>([](FVec& a, FVec& b) { return at::vec::maximum(a, b); }, vm);
    if (std::isnan(bm)) nan = true;
    if (bm > m) {  // rescale the sums to the new maximum (in double: the maxima may be far apart)
      if (m != kNegInf) {
        const double f = std::exp((static_cast<double>(m) - bm) * invt);
        z *= f, z_out *= f;
      }
      m = bm;
    }
    if (m == kNegInf) continue;  // nothing but -inf so far: no mass
    const FVec nm(-m);
    FVec zs(0.f), zo(0.f);
    auto step = [&](FVec x0, FVec x1, int64_t v) {
      const FVec e0 = exp_nonpos((x0 + nm) * vit, ex), e1 = exp_nonpos((x1 + nm) * vit, ex);
      zs = zs + (e0 + e1);
      if (!want_out) return;
      const uint64_t marked = step_bits(bits, v);
      if (marked == 0) {
        zo = zo + (e0 + e1);
      } else {  // few steps hold a listed id: drop their lanes one by one
        float e[kStep];
        e0.store(e), e1.store(e + FVec::size());
        for (int64_t j = 0; j < kStep; ++j) e[j] = (marked >> j & 1) ? 0.f : e[j];
        zo = zo + (FVec::loadu(e) + FVec::loadu(e + FVec::size()));
      }
    };
    i = 0;
    for (; i + kStep <= bn; i += kStep) {
      prefetch_step(sb + i + kBlock);
      FVec x0, x1;
      load2(sb + i, x0, x1);
      step(x0, x1, b0 + i);
    }
    if (i < bn) {
      const Tail t(sb + i, bn - i);
      step(FVec::loadu(t.x), FVec::loadu(t.x + FVec::size()), b0 + i);
    }
    z += reduce_sum(zs);
    if (want_out) z_out += reduce_sum(zo);
  }
  if (nan) m = std::numeric_limits<float>::quiet_NaN();
}

// g_v = scale * exp((s_v - m) / T) over the row (streamed when large).
template <typename T>
void dense_grad(const T* s, int64_t V, float m, float invt, float scale, T* g, bool stream) {
  const FVec ex = exp_scale(1.f), vit(invt), nm(-m), vs(scale);
  stream = can_stream(stream, g, nullptr);
  int64_t i = 0;
  for (; i + kStep <= V; i += kStep) {
    FVec x0, x1;
    load2(s + i, x0, x1);
    const FVec g0 = exp_nonpos((x0 + nm) * vit, ex) * vs, g1 = exp_nonpos((x1 + nm) * vit, ex) * vs;
    stream ? stream2(g + i, g0, g1) : store2(g + i, g0, g1);
  }
  for (; i < V; ++i) g[i] = static_cast<T>(std::exp((static_cast<float>(s[i]) - m) * invt) * scale);
  if (stream) stream_fence();
}

// The double path: plain loops (it exists for checking, not for speed).
void student_stats(const double* s, int64_t V, double invt, const uint64_t* bits, bool want_out, double& m, double& z,
                   double& z_out) {
  m = -std::numeric_limits<double>::infinity(), z = 0, z_out = 0;
  for (int64_t v = 0; v < V; ++v) m = (s[v] > m || std::isnan(s[v])) ? s[v] : m;
  if (m == -std::numeric_limits<double>::infinity()) return;
  for (int64_t v = 0; v < V; ++v) {
    const double e = std::exp((s[v] - m) * invt);
    z += e;
    if (want_out && !(bits[v >> 6] >> (v & 63) & 1)) z_out += e;
  }
}
void dense_grad(const double* s, int64_t V, double m, double invt, double scale, double* g, bool) {
  for (int64_t v = 0; v < V; ++v) g[v] = std::exp((s[v] - m) * invt) * scale;
}

template <typename T, typename I>
void sparse_kl_typed(const kernel::SparseKLArgs& p) {
  using acc_t = acc_of<T>;
  const T* S = static_cast<const T*>(p.student);
  const acc_t* L = static_cast<const acc_t*>(p.teacher);
  const I* IDX = static_cast<const I*>(p.indices);
  const acc_t* W = static_cast<const acc_t*>(p.row_weight);
  double* LOSS = static_cast<double*>(p.loss_rows);
  T* GS = static_cast<T*>(p.grad_student);
  acc_t* GT = static_cast<acc_t*>(p.grad_teacher);
  const int64_t R = p.rows, V = p.vocab, K = p.k;
  const double invt = p.inv_temperature, post = p.grad_scale;
  const SparseTail tail = p.tail;
  const bool bucket = tail == SparseTail::Bucket;
  const bool stream = streams_output(R * V, sizeof(T));
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  at::parallel_for(0, R, rows_per_task(V + K, tuning::kKLRowGrain), [&](int64_t r0, int64_t r1) {
    const FlushDenormals ftz;
    std::vector<uint64_t> bits((V + 63) / 64 + 1, 0);
    std::vector<double> lp(K), lq(K), pk(K);
    for (int64_t r = r0; r < r1; ++r) {
      const T* s = S + r * p.student_row_stride;
      const acc_t* l = L + r * p.teacher_row_stride;
      const I* idx = IDX + r * p.index_row_stride;
      T* gs = GS ? GS + r * V : nullptr;
      acc_t* gt = GT ? GT + r * K : nullptr;
      const double w = W[r];
      if (w == 0) {
        LOSS[r] = 0;
        zero_grad_row(gs, V, static_cast<acc_t>(post)), zero_grad_row(gt, K, static_cast<acc_t>(post));
        continue;
      }
      if (!mark(idx, K, V, r, bits.data(), p.status)) continue;
      acc_t m;
      double z, z_out;
      student_stats(s, V, static_cast<acc_t>(invt), bits.data(), bucket, m, z, z_out);
      unmark(idx, K, bits.data());
      const double log_z = std::log(z), dm = m;
      // The teacher's log-probabilities and the student's at the listed ids.
      double lmax = -std::numeric_limits<double>::infinity();
      for (int64_t k = 0; k < K; ++k) {
        lp[k] = bucket ? static_cast<double>(l[k]) : static_cast<double>(l[k]) * invt;
        lmax = (lp[k] > lmax || std::isnan(lp[k])) ? lp[k] : lmax;
        lq[k] = (static_cast<double>(static_cast<acc_t>(s[idx[k]])) - dm) * invt - log_z;
      }
      double log_zp = 0;
      if (!bucket) {
        double zp = 0;
        for (int64_t k = 0; k < K; ++k) zp += std::exp(lp[k] - lmax);
        log_zp = lmax + std::log(zp);
      }
      double sum_p = 0, value = 0;
      for (int64_t k = 0; k < K; ++k) {
        lp[k] -= log_zp;
        pk[k] = std::exp(lp[k]);
        sum_p += pk[k];
        value += sparse::term(pk[k], lp[k], lq[k]);
      }
      const auto f = sparse::finish_row<double>(tail, sum_p, bucket ? z_out / z : 0.0, K < V);
      value += f.tail_term;
      LOSS[r] = value;
      if (!gs && !gt) continue;
      if (std::isnan(value)) {  // NaN gradients throughout, as the reference gives them
        if (gs) std::fill(gs, gs + V, static_cast<T>(kNaN));
        if (gt) std::fill(gt, gt + K, static_cast<acc_t>(kNaN));
        continue;
      }
      const double coef = w * invt;
      if (gs) {
        dense_grad(s, V, m, static_cast<acc_t>(invt), static_cast<acc_t>(coef * f.c_out / z * post), gs, stream);
        for (int64_t k = 0; k < K; ++k) {
          gs[idx[k]] = static_cast<T>(coef * (std::exp(lq[k]) * f.c_in - pk[k]) * post);
        }
      }
      if (gt) {
        const double ct = bucket ? w : coef;
        for (int64_t k = 0; k < K; ++k) {
          gt[k] = static_cast<acc_t>(ct * sparse::grad_teacher<double>(tail, pk[k], lp[k], lq[k], value, f) * post);
        }
      }
    }
  });
}

template <typename T>
void dispatch_index(const kernel::SparseKLArgs& p) {
  p.indices_int32 ? sparse_kl_typed<T, int32_t>(p) : sparse_kl_typed<T, int64_t>(p);
}

}  // namespace

void sparse_kl(const kernel::SparseKLArgs& p) {
  switch (p.dtype) {
    case DType::Float: return dispatch_index<float>(p);
    case DType::Double: return dispatch_index<double>(p);
    case DType::Half: return dispatch_index<c10::Half>(p);
    case DType::BFloat16: return dispatch_index<c10::BFloat16>(p);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast
