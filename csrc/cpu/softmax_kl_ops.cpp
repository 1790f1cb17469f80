// CPU implementation of the softmax_kl and scale_rows_ ops (schemas: csrc/ops/softmax_kl.cpp):
// checks, output allocation, kernel call.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/tuning.h"
#include "cpu/alloc.h"
#include "cpu/kernels.h"
#include "ops/kernel_dtype.h"
#include "ops/softmax_kl.h"

namespace kdfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_cpu(const at::Tensor& s, const at::Tensor& t,
                                                              double inv_temperature, int64_t divergence,
                                                              double mix, const at::Tensor& row_weight,
                                                              bool grad_student, bool grad_teacher,
                                                              double grad_scale) {
  check_softmax_kl(s, t, inv_temperature, divergence, mix, row_weight, grad_scale);
  const int64_t R = s.size(0), V = s.size(1);
  at::Tensor kl = at::empty({R}, row_weight.options().dtype(at::kDouble));  // a KL of float logits may exceed FLT_MAX
  at::Tensor gs = grad_student ? empty_cpu_fast({R, V}, s.scalar_type()) : at::empty({0}, s.options());
  at::Tensor gt = grad_teacher ? empty_cpu_fast({R, V}, t.scalar_type()) : at::empty({0}, t.options());
  if (R == 0) return {kl, gs, gt};
  kernel::SoftmaxKLArgs a = softmax_kl_args(s, t, inv_temperature, divergence, mix, row_weight, kl, gs, gt, grad_student, grad_teacher, grad_scale);
  cpu::selected_kernels().softmax_kl(a);
  return {kl, gs, gt};
}

void scale_rows_cpu(at::Tensor& grad, const at::Tensor& ratio) {
  check_scale_rows(grad, ratio);
  // In the accumulation type, strided as handed over: usually already so (an expanded scalar: no copy).
  const at::Tensor r = ratio.to(acc_type(grad.scalar_type()));
  const int64_t V = grad.size(1), rs = r.stride(0);
  // The product is taken in float (double for double): a ratio such as a loss scale of 65536 must
  // not be rounded to the gradient's half-precision type first.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_rows_", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scalar_t* g = grad.data_ptr<scalar_t>();
    const acc_t* rp = r.const_data_ptr<acc_t>();
    at::parallel_for(0, grad.size(0), cpu::rows_per_task(V, tuning::kScaleRowsGrain),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const acc_t f = rp[row * rs];
        if (f == acc_t(1)) continue;
        scalar_t* x = g + row * V;
        for (int64_t j = 0; j < V; ++j) x[j] = static_cast<scalar_t>(static_cast<acc_t>(x[j]) * f);
      }
    });
  });
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("softmax_kl", &kdfast::softmax_kl_cpu);
  m.impl("scale_rows_", &kdfast::scale_rows_cpu);
}
