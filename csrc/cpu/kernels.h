#pragma once
// The table of CPU kernels. The same kernel sources are compiled once per instruction set
// (baseline into the main library, AVX2 and AVX-512 into libraries of their own); the main library
// loads the best one the CPU supports at run time. The kernels see raw pointers only, so the
// ISA-specific libraries need none of the heavy tensor headers.
#include <cstdint>

namespace kdfast {
namespace cpu {

enum class DType : int32_t { Float = 0, Double = 1, Half = 2, BFloat16 = 3 };

struct SoftmaxKLArgs {
  DType dtype;
  const void* student;  // rows x V, unit stride along V
  const void* teacher;
  int64_t rows, vocab;
  int64_t student_row_stride, teacher_row_stride;  // in elements; 0 broadcasts one row
  double inv_temperature;
  const void* row_weight;  // rows, acc type (double for double input, else float); 0 skips a row
  void* kl_rows;           // rows, acc type: unweighted KL, 0 on skipped rows
  void* grad_student;      // rows x V contiguous, or null: row_weight * dKL/ds
  void* grad_teacher;      // rows x V contiguous, or null
};

struct Kernels {
  const char* isa;
  void (*softmax_kl)(const SoftmaxKLArgs&);
};

}  // namespace cpu
}  // namespace kdfast

extern "C" {
// Exported by each ISA library (and, as kdfast_cpu_kernels_default, by the main one).
typedef const kdfast::cpu::Kernels* (*kdfast_cpu_kernels_fn)();
}
