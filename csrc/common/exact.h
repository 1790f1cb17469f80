#pragma once
// Exact-rounding building blocks shared by the CPU and CUDA kernels: a product that is never fused
// into a neighbouring add, and Knuth's TwoSum.
#include "common/macros.h"

namespace kdfast {

// The product x * y rounded on its own, never fused into a neighbouring add: compilers contract
// x * y - u * v into fma(x, y, -u * v) (nvcc always, GCC for C++ wherever FMA is enabled), which
// turns the difference of two equal products into the rounding error of one of them, and s + x * y
// into one rounding where an error-free sum needs the product's own.
template <typename acc_t>
KDFAST_HD acc_t mul_rn(acc_t x, acc_t y) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(acc_t) == sizeof(float)) {
    return __fmul_rn(x, y);
  } else {
    return __dmul_rn(x, y);
  }
#elif defined(__FMA__) && (defined(__x86_64__) || defined(__i386__))
  acc_t r = x * y;
  __asm__("" : "+x"(r));  // an opaque copy: nothing to fuse with
  return r;
#else
  return x * y;
#endif
}

// s + l += v with the rounding of the sum kept in l (Knuth's TwoSum: exact for any order of s, v).
KDFAST_HD void two_sum_add(double& s, double& l, double v) {
  const double t = s + v;
  const double bb = t - s;
  l += (s - (t - bb)) + (v - bb);
  s = t;
}

}  // namespace kdfast
