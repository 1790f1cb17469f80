#pragma once
#include <ATen/core/Tensor.h>

#include "cpu/kernels.h"

namespace kdfast {
// The selected CPU kernel build (baseline until Python picks one).
const cpu::Kernels& cpu_kernels();

inline cpu::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cpu::DType::Float;
    case at::kDouble: return cpu::DType::Double;
    case at::kHalf: return cpu::DType::Half;
    case at::kBFloat16: return cpu::DType::BFloat16;
    default: TORCH_CHECK(false, "kdfast: unsupported dtype ", t);
  }
}

// An uninitialised CPU tensor. Large ones get 2 MB-aligned memory advised for transparent huge
// pages: the first touch of fresh memory otherwise costs more than the kernel that fills it.
at::Tensor empty_cpu_fast(at::IntArrayRef sizes, at::ScalarType dtype);
// Returns the cached blocks of empty_cpu_fast to the OS.
void empty_cpu_cache();
}  // namespace kdfast
