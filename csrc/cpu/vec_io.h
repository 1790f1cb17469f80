#pragma once
// Load and store 2 * Vectorized<acc>::size() elements of any supported type as accumulation-type
// vectors (float for float, half and bfloat16; double for double).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace kdfast {
namespace cpu {
inline namespace CPU_CAPABILITY {

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

using DVec2 = at::vec::Vectorized<double>;

inline void load2(const double* p, DVec2& a, DVec2& b) {
  a = DVec2::loadu(p);
  b = DVec2::loadu(p + DVec2::size());
}
inline void store2(double* p, const DVec2& a, const DVec2& b) {
  a.store(p);
  b.store(p + DVec2::size());
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast
