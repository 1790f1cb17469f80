#pragma once
// What the CUDA kernels share about element types and 16-byte vector access: the accumulation type
// and conversions of each element type, the vector of P elements that fills 16 bytes, the walk of a
// slice in vector groups from an aligned base, and the dispatch of a kernel.h DType to a type.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/args.h"
#include "cuda/compat.cuh"

namespace kdfast {
namespace cuda {

// ------------------------------------------------------------------ element types

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using acc = float;
  static __device__ __forceinline__ float to(float x) { return x; }
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <>
struct Elem<double> {
  using acc = double;
  static __device__ __forceinline__ double to(double x) { return x; }
  static __device__ __forceinline__ double from(double x) { return x; }
};
template <>
struct Elem<__half> {
  using acc = float;
  static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Elem<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

// P elements that fill 16 bytes, loaded and stored as one vector.
template <typename T, int P>
struct alignas(sizeof(T) * P) Vec {
  T v[P];
};

template <typename T>
constexpr int vec_elems() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T>
__device__ __forceinline__ int align_off(const T* p) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) & 15) / sizeof(T));
}

// ------------------------------------------------------------------ slices
//
// A slice of n elements is walked in groups of P positions from an aligned base pointer: element i
// of the slice sits at position o + i, and group g covers positions [g*P, g*P + P). With P > 1 every
// operand's base is 16-byte aligned and shares the offset o; with P == 1, o is 0 and the bases are
// the slices themselves. A group wholly inside [o, o + n) is "full"; the first and last may not be.
// Positions outside the slice in a partial group lie in the same 16-byte granules as slice elements,
// so reading them is safe; their values are never used and nothing is stored there. An empty slice
// has no groups (its granule may not be memory at all: an empty tensor's null data pointer).

struct Span {
  int64_t o, end, groups;
  __device__ __forceinline__ Span(int64_t o_, int64_t n, int P)
      : o(o_), end(o_ + n), groups(n > 0 ? (o_ + n + P - 1) / P : 0) {}
  __device__ __forceinline__ bool full(int64_t j0, int P) const { return j0 >= o && j0 + P <= end; }
  __device__ __forceinline__ bool valid(int64_t j) const { return j >= o && j < end; }
};

// f(T{}) for the element type of dt.
template <typename F>
auto by_dtype(kernel::DType dt, F&& f) {
  switch (dt) {
    case kernel::DType::Float: return f(float{});
    case kernel::DType::Double: return f(double{});
    case kernel::DType::Half: return f(__half{});
    case kernel::DType::BFloat16: break;
  }
  return f(__nv_bfloat16{});
}


}  // namespace cuda
}  // namespace kdfast
