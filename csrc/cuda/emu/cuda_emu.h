#pragma once
// A CPU emulation of the part of the CUDA execution model that kdfast's kernels use, so that the
// kernel sources in csrc/cuda/*.cu can be compiled with g++ (-DKDFAST_CUDA_EMULATE) and tested on a
// machine without a GPU (tests/test_cuda.py builds and runs it). Not fast, and not a model of
// timing or of the memory model's weak corners; it checks indexing, reductions, barriers, warp
// shuffles, per-block shared memory and thread-block clusters with distributed shared memory.
//
// Each CUDA thread is an OS thread. A block's threads share a barrier (__syncthreads), one barrier
// per warp (shuffles) and a shared-memory arena; the blocks of a cluster run together and share a
// cluster barrier; map_shared_rank translates an address into the same place of another block's
// arena. "Device memory" is host memory.
#include <cuda_runtime_api.h>  // types only (cudaError_t, dim3, cudaLaunchConfig_t, ...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>

#define __launch_bounds__(...)

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace kdfast_emu {

// Runs body(block_linear_index) for the grid (clusters of cluster_x blocks along x run together),
// with blockDim threads each; implemented in emu.cpp.
void run_grid(dim3 grid, dim3 block, size_t dyn_smem, unsigned cluster_x, const std::function<void()>& body);

void* shared_storage(int id, size_t bytes, size_t align);
unsigned char* dynamic_shared();
void syncthreads();
void warp_exchange(uint64_t mine, uint64_t* all32);  // every lane's value, after a warp barrier
void cluster_sync();
void cluster_arrive();
void cluster_wait();
unsigned cluster_rank();
unsigned cluster_size();
void* map_shared(void* p, unsigned rank);

template <typename Arr>
Arr& shared_array(int id) {
  return *static_cast<Arr*>(shared_storage(id, sizeof(Arr), 128));
}

template <typename... Exp>
struct Launcher {
  void (*kernel)(Exp...);
  dim3 grid, block;
  size_t smem;
  unsigned cluster_x;
  template <typename... Act>
  void operator()(Act&&... args) const {
    auto k = kernel;
    std::function<void()> body = [k, args...]() { k(args...); };
    run_grid(grid, block, smem, cluster_x, body);
  }
};

template <typename... Exp>
Launcher<Exp...> launcher(void (*kernel)(Exp...), dim3 grid, dim3 block, size_t smem, unsigned cluster_x = 1) {
  return Launcher<Exp...>{kernel, grid, block, smem, cluster_x};
}

}  // namespace kdfast_emu

inline void __syncthreads() { kdfast_emu::syncthreads(); }

// The atomics the kernels use (the emulated threads are threads).
inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  unsigned long long cur = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v < cur && !__atomic_compare_exchange_n(p, &cur, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return cur;
}

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  uint64_t mine = 0, all[32];
  std::memcpy(&mine, &v, sizeof(T));
  kdfast_emu::warp_exchange(mine, all);
  T r;
  std::memcpy(&r, &all[(threadIdx.x & 31) ^ static_cast<unsigned>(lane_mask)], sizeof(T));
  return r;
}

namespace cooperative_groups {
class cluster_group {
 public:
  unsigned block_rank() const { return kdfast_emu::cluster_rank(); }
  unsigned num_blocks() const { return kdfast_emu::cluster_size(); }
  template <typename T>
  T* map_shared_rank(T* p, int rank) const {
    return static_cast<T*>(kdfast_emu::map_shared(const_cast<void*>(static_cast<const void*>(p)), rank));
  }
  void sync() const { kdfast_emu::cluster_sync(); }
};
inline cluster_group this_cluster() { return cluster_group(); }
}  // namespace cooperative_groups

// ---- the runtime calls the kernels' host code makes (an emulated H100: sm_90, 132 SMs, 228 KB)

template <typename T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T*) {
  std::memset(attr, 0, sizeof(*attr));
  attr->sharedSizeBytes = 2048;
  attr->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}
template <typename T>
cudaError_t cudaFuncSetAttribute(T*, cudaFuncAttribute, int) {
  return cudaSuccess;
}
namespace kdfast_emu {
int blocks_per_sm(int threads, size_t smem);
int sm_count();
}  // namespace kdfast_emu
template <typename T>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, T, int threads, size_t smem) {
  *n = kdfast_emu::blocks_per_sm(threads, smem);
  return cudaSuccess;
}
template <typename T>
cudaError_t cudaOccupancyMaxActiveClusters(int* n, T*, const cudaLaunchConfig_t* cfg) {
  unsigned c = 1;
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) c = cfg->attrs[i].val.clusterDim.x;
  const int per_sm = kdfast_emu::blocks_per_sm(static_cast<int>(cfg->blockDim.x), cfg->dynamicSmemBytes);
  *n = per_sm * kdfast_emu::sm_count() / static_cast<int>(c);
  return cudaSuccess;
}
template <typename... Exp, typename... Act>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(Exp...), Act&&... args) {
  unsigned c = 1;
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) c = cfg->attrs[i].val.clusterDim.x;
  if (cfg->gridDim.x % c != 0) return cudaErrorInvalidValue;
  kdfast_emu::launcher(kernel, cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, c)(std::forward<Act>(args)...);
  return cudaSuccess;
}
