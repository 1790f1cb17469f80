#pragma once
// The few spellings that differ between a real CUDA build (nvcc) and the CPU emulation of the CUDA
// execution model in csrc/cuda/emu/ (g++ with KDFAST_CUDA_EMULATE), which lets the test suite run
// the very same kernel sources on a machine without a GPU:
//   KD_SHARED(type, name, [dims])   a __shared__ array
//   KD_DYNAMIC_SHARED(name)         the dynamic shared memory, 128-byte aligned
//   KD_LAUNCH(grid, block, smem, stream, kernel)(args...)   kernel<<<grid, block, smem, stream>>>(args...)
//   KD_CLUSTERS                     1 where thread-block clusters exist (sm_90 device code, emulation)
//   KD_CP_ASYNC                     1 where cp.async exists (sm_80 device code)
//   kd_cluster_arrive() / kd_cluster_wait()   the split cluster barrier (relaxed arrive; wait)
#if defined(KDFAST_CUDA_EMULATE)

#include "cuda/emu/cuda_emu.h"
#define KD_SHARED(type, name, dims) auto& name = ::kdfast_emu::shared_array<type dims>(__COUNTER__)
#define KD_DYNAMIC_SHARED(name) unsigned char* name = ::kdfast_emu::dynamic_shared()
#define KD_LAUNCH(grid, block, smem, stream, ...) ::kdfast_emu::launcher(__VA_ARGS__, grid, block, smem)
#define KD_CLUSTERS 1
#define KD_CP_ASYNC 0
inline void kd_cluster_arrive() { ::kdfast_emu::cluster_arrive(); }
inline void kd_cluster_wait() { ::kdfast_emu::cluster_wait(); }

#else

#include <cooperative_groups.h>
#include <cuda_runtime.h>
#define KD_SHARED(type, name, dims) __shared__ type name dims
#define KD_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#define KD_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define KD_CLUSTERS 1
#else
#define KD_CLUSTERS 0
#endif
__device__ __forceinline__ void kd_cluster_arrive() {
#if KD_CLUSTERS
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void kd_cluster_wait() {
#if KD_CLUSTERS
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
#endif
}
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define KD_CP_ASYNC 1
#else
#define KD_CP_ASYNC 0
#endif

#endif
