#pragma once
// The device specifics of a CUDA op's tensor glue. In the CPU emulation of the kernels
// (csrc/cuda/emu/; tests/test_cuda.py builds the glue with it) "device memory" is host memory: CPU
// tensors stand in for CUDA ones, with no stream and no device guard, so that the tests run the
// very glue.
#include <ATen/core/Tensor.h>

#if defined(KDFAST_CUDA_EMULATE)
#include <cuda_runtime_api.h>
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace kdfast {
namespace cuda_glue {

#if defined(KDFAST_CUDA_EMULATE)
constexpr at::DeviceType kDevice = at::kCPU;
struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}
};
inline cudaStream_t stream_of(const at::Tensor&) { return nullptr; }
#define KDFAST_CUDA_CHECK(EXPR)                                                     \
  do {                                                                              \
    const cudaError_t kdfast_emu_err = (EXPR);                                      \
    TORCH_CHECK(kdfast_emu_err == cudaSuccess, "emulated CUDA error ", kdfast_emu_err); \
  } while (0)
#else
constexpr at::DeviceType kDevice = at::kCUDA;
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }
#define KDFAST_CUDA_CHECK(EXPR) C10_CUDA_CHECK(EXPR)
#endif

}  // namespace cuda_glue
}  // namespace kdfast
