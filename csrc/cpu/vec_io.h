#pragma once
// Load and store 2 * Vectorized<acc>::size() elements of any supported type as accumulation-type
// vectors (float for float, half and bfloat16; double for double).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "common/tuning.h"

namespace kdfast {
namespace cpu {
inline namespace CPU_CAPABILITY {

// The accumulation type of an element type: double for double, float for float, half and bfloat16.
template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

using FVec2 = at::vec::Vectorized<float>;

inline void load2(const float* p, FVec2& a, FVec2& b) {
  a = FVec2::loadu(p);
  b = FVec2::loadu(p + FVec2::size());
}
template <typename T>
inline void load2(const T* p, FVec2& a, FVec2& b) {
  at::vec::load_to_float<T>(p, a, b);
}

inline void store2(float* p, const FVec2& a, const FVec2& b) {
  a.store(p);
  b.store(p + FVec2::size());
}
template <typename T>
inline void store2(T* p, const FVec2& a, const FVec2& b) {
  at::vec::convert_from_float<T>(a, b).store(p);
}

// a, b times f, rounded as if a, b had been stored as T and scaled after loading back: a scale
// fused into a kernel's store gives the bits of a separate scale_rows_ pass over its output.
template <typename T, typename A>
inline void scale_as_stored(at::vec::Vectorized<A>& a, at::vec::Vectorized<A>& b, const at::vec::Vectorized<A>& f) {
  if constexpr (!std::is_same_v<T, A>) {  // half and bfloat16 (accumulated in float)
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(a, b));
  }
  a = a * f;
  b = b * f;
}
template <typename T, typename A>
inline T scale_as_stored(A x, A f) {
  return static_cast<T>(static_cast<A>(static_cast<T>(x)) * f);
}

// The gradient of a skipped row (weight 0): zeros, signed as a scale_rows_ pass by f leaves them.
template <typename T, typename A>
inline void zero_grad_row(T* g, int64_t n, A f) {
  if (g) std::fill(g, g + n, static_cast<T>(A(0) * f));
}

using DVec2 = at::vec::Vectorized<double>;

inline void load2(const double* p, DVec2& a, DVec2& b) {
  a = DVec2::loadu(p);
  b = DVec2::loadu(p + DVec2::size());
}
inline void store2(double* p, const DVec2& a, const DVec2& b) {
  a.store(p);
  b.store(p + DVec2::size());
}

// Flushes subnormal floats to zero while in scope (x86: MXCSR FTZ and DAZ; restored on exit).
// Making or reading a subnormal costs a microcode assist of ~100 cycles a vector: a softmax over
// logits that span more than ~87 (large logits at T = 1, masked vocabularies) would otherwise make
// them on most elements (commit 18ef60e measured it). Values below 1.2e-38 change no loss or
// gradient.
struct FlushDenormals {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// Non-temporal stores, for large outputs that nothing reads soon: they skip the read-for-ownership
// of each cache line (a third of the traffic of a kernel that reads two inputs and writes one).
// float, half and bfloat16 vectors at an address aligned to the vector (can_stream); double stores
// normally. Gradients of at least kStreamBytes (common/tuning.h) take them (streams_output; commit
// 846c0fb measured it). Smaller ones stay in cache for whatever reads them next.
using tuning::kStreamBytes;
inline bool streams_output(int64_t elems, size_t elem_size) {
  return elems * static_cast<int64_t>(elem_size) >= kStreamBytes;
}
inline bool can_stream(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (FVec2::size() * sizeof(float)) == 0;
}
// A kernel's `stream` for the gradients it writes at gs / gt (either may be null): both aligned.
inline bool can_stream(bool stream, const void* gs, const void* gt) {
  return stream && (!gs || can_stream(gs)) && (!gt || can_stream(gt));
}
inline void stream2(float* p, const FVec2& a, const FVec2& b) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(p, a);
  _mm512_stream_ps(p + FVec2::size(), b);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_ps(p, a);
  _mm256_stream_ps(p + FVec2::size(), b);
#else
  store2(p, a, b);
#endif
}
// half and bfloat16: converted, then one full vector streamed.
template <typename T, typename = std::enable_if_t<std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>>>
inline void stream2(T* p, const FVec2& a, const FVec2& b) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), at::vec::convert_from_float<T>(a, b));
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::convert_from_float<T>(a, b));
#else
  store2(p, a, b);
#endif
}
inline void stream2(double* p, const DVec2& a, const DVec2& b) {
  store2(p, a, b);
}
// Orders this thread's non-temporal stores before whatever it does next (e.g. joining the others).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// store2 of a, b, first scaled by f (as scale_as_stored) when `scaled`; non-temporal when `stream`.
// T is the gradient's type; q may also be a float buffer that is converted to T later.
template <typename T, typename Q, typename A>
inline void store2_scaled(Q* q, at::vec::Vectorized<A> a, at::vec::Vectorized<A> b, bool scaled,
                          const at::vec::Vectorized<A>& f, bool stream = false) {
  if (scaled) scale_as_stored<T>(a, b, f);
  stream ? stream2(q, a, b) : store2(q, a, b);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast
