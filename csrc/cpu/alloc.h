#pragma once
// CPU output buffers (see alloc.cpp): the gradients of the fused ops come from here.
#include <ATen/core/Tensor.h>

namespace kdfast {
// An uninitialised CPU tensor. Large ones get 2 MB-aligned memory advised for transparent huge
// pages: the first touch of fresh memory otherwise costs more than the kernel that fills it.
at::Tensor empty_cpu_fast(at::IntArrayRef sizes, at::ScalarType dtype);
// Returns the cached blocks of empty_cpu_fast to the OS.
void empty_cpu_cache();
}  // namespace kdfast
