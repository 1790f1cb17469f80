// The rkd op: schema and the scalar-argument checks both devices share (tensor checks and the
// shared glue: csrc/ops/rkd.h). Kernels: csrc/cpu/rkd.cpp and csrc/cuda/rkd.cu; glue:
// csrc/{cpu,cuda}/rkd_ops.cpp; math: csrc/common/rkd.h.
#include <torch/library.h>

#include <cmath>

#include "ops/rkd.h"

namespace kdfast {

void check_rkd_scalars(double distance_weight, double angle_weight, double delta, double eps) {
  TORCH_CHECK(std::isfinite(distance_weight) && distance_weight >= 0,
              "rkd: distance_weight must be finite and >= 0, got ", distance_weight);
  TORCH_CHECK(std::isfinite(angle_weight) && angle_weight >= 0,
              "rkd: angle_weight must be finite and >= 0, got ", angle_weight);
  TORCH_CHECK(std::isfinite(delta) && delta > 0, "rkd: delta must be finite and > 0, got ", delta);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "rkd: eps must be finite and >= 0, got ", eps);
}

}  // namespace kdfast

// Not in the CUDA emulation's build of the glue (csrc/cuda/emu/rkd_ops_emu.cpp), which runs in a
// process where the kdfast library has defined the ops.
#if !defined(KDFAST_CUDA_EMULATE)
TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // The RKD loss of each group of points (B, N, D); student and teacher may differ in D. loss_b =
  // distance_weight * (mean Huber_delta over the N^2 psi-normalised distances) + angle_weight *
  // (mean Huber_delta over the N^3 triplet-angle cosines), one eps (the distance clamp and the
  // side-length floor of the cosines) for both; a term of weight 0 is not computed. In
  // the forward-and-gradient form of softmax_kl: (loss per group, grad_student, grad_teacher), each
  // gradient group_weight[b] * d loss_b / d input, or an empty tensor. One op for both terms, so
  // that RKD-DA centres the points, forms their Gram matrices and multiplies back to points once.
  m.def("rkd(Tensor student, Tensor teacher, float distance_weight, float angle_weight, float delta, "
        "bool squared, float eps, Tensor group_weight, bool grad_student, bool grad_teacher) "
        "-> (Tensor, Tensor, Tensor)");
}
#endif
