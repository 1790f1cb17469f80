// The pairwise_distances op and its backward: schemas and the scalar-argument check both devices
// share. They are the distance half of the relation kernels: tensor checks and shared glue in
// csrc/ops/rkd.h, kernels in csrc/cpu/rkd.cpp (pdist, pdist_backward) and csrc/cuda/rkd.cu, glue
// in csrc/{cpu,cuda}/rkd_ops.cpp.
#include <torch/library.h>

#include <cmath>

#include "ops/rkd.h"

namespace kdfast {

void check_pairwise_eps(const char* op, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
}

}  // namespace kdfast

// Not in the CUDA emulation's build of the glue (csrc/cuda/emu/rkd_ops_emu.cpp), which runs in a
// process where the kdfast library has defined the ops.
#if !defined(KDFAST_CUDA_EMULATE)
TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // (B, N, D) -> (B, N, N) distances clamped at eps with a zero diagonal, each group divided by the
  // mean of its positive entries when normalize. In the accumulation dtype (float32 or float64).
  m.def("pairwise_distances(Tensor x, bool squared, bool normalize, float eps) -> Tensor");
  m.def("pairwise_distances_backward(Tensor grad, Tensor x, bool squared, bool normalize, float eps) -> Tensor");
}
#endif
