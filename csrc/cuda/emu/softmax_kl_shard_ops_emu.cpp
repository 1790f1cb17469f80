// The per-shard ops' CUDA glue (csrc/cuda/softmax_kl_shard_ops.cpp) built for the CPU emulation of
// the kernels, as rkd_ops_emu.cpp does for the relation ops: tests/test_cuda.py compiles this file
// as a torch extension with g++ (-DKDFAST_CUDA_EMULATE) linked to the emulated kernels, so that the
// tests run the real glue on CPU tensors (bound through pybind11: the tests' process has the kdfast
// ops registered already).
#if !defined(KDFAST_CUDA_EMULATE)
#error "the emulation build of the glue needs -DKDFAST_CUDA_EMULATE"
#endif
#include <torch/extension.h>

#include "ops/softmax_kl.cpp"  // the checks and output allocation (the schemas compile out here)
#include "cuda/softmax_kl_shard_ops.cpp"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("softmax_kl_shard_stats", &kdfast::shard_stats_cuda);
  m.def("softmax_kl_shard_sums", &kdfast::shard_sums_cuda);
  m.def("softmax_kl_shard_grads", &kdfast::shard_grads_cuda);
}
