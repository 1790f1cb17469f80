// The relation ops' CUDA glue (csrc/cuda/rkd_ops.cpp) built for the CPU emulation of the kernels:
// tests/test_cuda.py compiles this file as a torch extension with g++ (-DKDFAST_CUDA_EMULATE) and
// links it to the emulated kernels (its libkdfast_emu.so), so that the tests run the real glue on
// CPU tensors. One translation unit, so that the glue's anonymous-namespace functions are reachable;
// bound through pybind11, not TORCH_LIBRARY, as the tests' process has the kdfast ops registered.
#if !defined(KDFAST_CUDA_EMULATE)
#error "the emulation build of the glue needs -DKDFAST_CUDA_EMULATE"
#endif
#include <torch/extension.h>

#include "ops/pairwise_distances.cpp"  // the scalar checks (their schemas compile out here)
#include "ops/rkd.cpp"
#include "cuda/rkd_ops.cpp"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rkd", &kdfast::rkd_cuda);
  m.def("pairwise_distances", &kdfast::pairwise_distances_cuda);
  m.def("pairwise_distances_backward", &kdfast::pairwise_distances_backward_cuda);
}
