// The kernel table of one instruction-set build (see cpu/kernels.h).
#include "cpu/kernels.h"

#define KDFAST_STR2(x) #x
#define KDFAST_STR(x) KDFAST_STR2(x)

namespace kdfast {
namespace cpu {
inline namespace CPU_CAPABILITY {
void softmax_kl(const SoftmaxKLArgs&);
void sq_dists(const SqDistArgs&);
void pdist(PdistArgs&);
void pdist_backward(const PdistBackwardArgs&);
void distance_huber(DistanceHuberArgs&);
void angle(AngleArgs&);
void feature_match(const FeatureArgs&);
void sparse_kl(const SparseKLArgs&);

const Kernels* table() {
  static const Kernels k{KDFAST_STR(CPU_CAPABILITY), &softmax_kl, &sq_dists, &pdist, &pdist_backward, &distance_huber,
                         &angle, &feature_match, &sparse_kl};
  return &k;
}
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast

#ifdef KDFAST_ISA_LIBRARY
extern "C" __attribute__((visibility("default"))) const kdfast::cpu::Kernels* kdfast_cpu_kernels() {
  return kdfast::cpu::table();
}
#else
extern "C" const kdfast::cpu::Kernels* kdfast_cpu_kernels_default() { return kdfast::cpu::table(); }
#endif
