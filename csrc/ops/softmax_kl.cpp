// CPU implementation of the softmax-KL ops: argument checks, output allocation, kernel call.
// User-facing validation (with messages naming the argument) happens in kdfast/functional.py;
// the checks here guard the kernel against direct torch.ops calls.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/cpu_dispatch.h"

namespace kdfast {
namespace {

void check_kl_inputs(const at::Tensor& s, const at::Tensor& t, const at::Tensor& w) {
  TORCH_CHECK(s.dim() == 2 && t.dim() == 2, "softmax_kl: student and teacher must be 2-D (rows, V)");
  TORCH_CHECK(s.sizes() == t.sizes(), "softmax_kl: student ", s.sizes(), " and teacher ", t.sizes(),
              " differ in shape");
  TORCH_CHECK(s.scalar_type() == t.scalar_type(), "softmax_kl: student and teacher dtypes differ");
  TORCH_CHECK(s.stride(1) == 1 || s.size(1) <= 1, "softmax_kl: student must have unit stride along V");
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1, "softmax_kl: teacher must have unit stride along V");
  auto acc = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(w.dim() == 1 && w.size(0) == s.size(0) && w.scalar_type() == acc && w.is_contiguous(),
              "softmax_kl: row_weight must be a contiguous ", acc, " vector of length rows");
  TORCH_CHECK(s.size(1) > 0, "softmax_kl: the vocabulary (last dim) is empty");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_cpu(const at::Tensor& s, const at::Tensor& t,
                                                              double inv_temperature,
                                                              const at::Tensor& row_weight,
                                                              bool grad_student, bool grad_teacher) {
  check_kl_inputs(s, t, row_weight);
  const int64_t R = s.size(0), V = s.size(1);
  at::Tensor kl = at::empty({R}, row_weight.options());
  at::Tensor gs = grad_student ? empty_cpu_fast({R, V}, s.scalar_type()) : at::empty({0}, s.options());
  at::Tensor gt = grad_teacher ? empty_cpu_fast({R, V}, t.scalar_type()) : at::empty({0}, t.options());
  if (R == 0) return {kl, gs, gt};
  cpu::SoftmaxKLArgs a;
  a.dtype = to_kernel_dtype(s.scalar_type());
  a.student = s.data_ptr();
  a.teacher = t.data_ptr();
  a.rows = R;
  a.vocab = V;
  a.student_row_stride = s.stride(0);
  a.teacher_row_stride = t.stride(0);
  a.inv_temperature = inv_temperature;
  a.row_weight = row_weight.data_ptr();
  a.kl_rows = kl.data_ptr();
  a.grad_student = grad_student ? gs.data_ptr() : nullptr;
  a.grad_teacher = grad_teacher ? gt.data_ptr() : nullptr;
  cpu_kernels().softmax_kl(a);
  return {kl, gs, gt};
}

void scale_rows_cpu(at::Tensor& grad, const at::Tensor& ratio) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), "scale_rows_: grad must be contiguous 2-D");
  TORCH_CHECK(ratio.dim() == 1 && ratio.size(0) == grad.size(0), "scale_rows_: ratio must have one entry per row");
  at::Tensor r = ratio.to(at::kDouble).contiguous();
  const double* rp = r.data_ptr<double>();
  const int64_t V = grad.size(1);
  // The product is taken in float (double for double): a ratio such as a loss scale of 65536 must
  // not be rounded to the gradient's half-precision type first.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_rows_", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, grad.size(0), std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        if (rp[row] == 1.0) continue;
        const acc_t f = static_cast<acc_t>(rp[row]);
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
