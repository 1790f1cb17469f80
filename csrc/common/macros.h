#pragma once
// Shared by the CPU (C++) and CUDA sources: one spelling for host/device inline math.
#if defined(__CUDACC__)
#define KDFAST_HD __host__ __device__ __forceinline__
#else
#define KDFAST_HD inline
#endif
