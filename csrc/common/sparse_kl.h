#pragma once
// Per-row math of the top-k KL (the sparse_kl op), shared by the CPU and CUDA kernels.
//
// Student: a_v = (s_v - max s) / T, Z = sum_v exp(a_v), log Q_v = a_v - log Z, over all of V.
// Teacher: K log-probabilities l_k at T = 1 for the vocabulary ids i_k (distinct).
//   renormalize: log P_k = l_k / T - logsumexp_j(l_j / T) (the teacher truncated to its K ids and
//                re-tempered); the row's value is sum_k P_k (log P_k - log Q_{i_k}), the exact KL
//                from the truncated teacher to the student.
//   bucket:      P_k = exp(l_k) as given (T is the student's alone: the teacher's normaliser over
//                V is unknown), plus the tail P_tail = max(1 - sum_k P_k, 0) against the student's
//                Q_tail = sum over the ids not listed of Q_v (summed directly, never as 1 - sum,
//                which cancels), floored at kTailFloor: K + 1 outcomes.
// A term with P = 0 is 0 (no log of 0), and so is its gradient.
//
// Gradients (w the row weight): with c_in = sum_k P_k + P_tail and rho = P_tail / Q_tail
// (P_tail = rho = 0 for renormalize, and rho = 0 and no P_tail in c_in where Q_tail sits at its
// floor, whose derivative is 0)
//   dL/ds_v = w / T * Q_v (c_in - rho)            for v not listed,
//   dL/ds_v = w / T * (Q_v c_in - P_k)            for v = i_k,
// i.e. one dense write of Q times a constant and K overwrites; and for the teacher
//   renormalize: dL/dl_k = w / T * P_k (log P_k - log Q_{i_k} - L),
//   bucket:      dL/dl_k = w * P_k (log P_k - log Q_{i_k} - [P_tail > 0] (log P_tail - log Q_tail)),
// plus w P_k where P_tail = 0 (the clamp is then active and the tail constant).
#include <cmath>
#include <cstdint>

#include "common/args.h"
#include "common/macros.h"

namespace kdfast {
namespace sparse {

// The floor of the student's tail mass: keeps log Q_tail and P_tail / Q_tail finite when the listed
// ids hold all of the student's mass (K = V, or the rest underflows).
constexpr double kTailFloor = 1e-30;

// P_k (log P_k - log Q), 0 where P_k = 0 (log P_k may be -inf there). A NaN P_k reaches the result.
template <typename acc_t>
KDFAST_HD acc_t term(acc_t p, acc_t log_p, acc_t log_q) {
  return p != acc_t(0) ? p * (log_p - log_q) : acc_t(0);
}

// What a row needs after its sums: the tail's contribution and the gradient constants.
template <typename acc_t>
struct RowFinish {
  acc_t tail_term;   // P_tail (log P_tail - log Q_tail), 0 where P_tail = 0
  acc_t tail_logit;  // log P_tail - log Q_tail where P_tail > 0, else 0 (the teacher gradient's shift)
  acc_t c_in, c_out;  // the student gradient's factors of Q_v: listed ids, the rest
  acc_t teacher_one;  // bucket with P_tail = 0: the + 1 of d(P log P)/dP that the tail no longer cancels
};

// sum_p = sum_k P_k; q_tail = Q_tail before its floor (bucket only); has_tail: K < V. With K = V
// no id is left for the bucket: it is empty on both sides (P_tail = 0; else the rounding of the
// teacher's sum would meet a student tail of 0 and make a large teacher gradient of nothing).
template <typename acc_t>
KDFAST_HD RowFinish<acc_t> finish_row(kernel::SparseTail tail, acc_t sum_p, acc_t q_tail, bool has_tail) {
  using std::log;
  RowFinish<acc_t> f{acc_t(0), acc_t(0), acc_t(1), acc_t(1), acc_t(0)};
  if (tail == kernel::SparseTail::Renormalize) return f;
  acc_t p_tail = has_tail ? acc_t(1) - sum_p : acc_t(0);
  p_tail = p_tail > acc_t(0) ? p_tail : acc_t(0);  // a NaN stays NaN (and makes everything NaN)
  const bool floored = !(q_tail >= acc_t(kTailFloor)) && q_tail == q_tail;
  const acc_t q = floored ? acc_t(kTailFloor) : q_tail;
  if (p_tail != acc_t(0)) {
    f.tail_logit = log(p_tail) - log(q);
    f.tail_term = p_tail * f.tail_logit;
  } else {
    f.teacher_one = acc_t(1);
  }
  f.c_in = floored ? sum_p : sum_p + p_tail;
  f.c_out = floored ? sum_p : f.c_in - p_tail / q;
  return f;
}

// dL/dl_k without the row weight: coef_t = w / T (renormalize) or w (bucket); row_value is the
// row's loss (renormalize's shift).
template <typename acc_t>
KDFAST_HD acc_t grad_teacher(kernel::SparseTail tail, acc_t p, acc_t log_p, acc_t log_q, acc_t row_value,
                             const RowFinish<acc_t>& f) {
  if (p == acc_t(0)) return acc_t(0);
  const acc_t c = log_p - log_q;
  return tail == kernel::SparseTail::Renormalize ? p * (c - row_value) : p * (c - f.tail_logit + f.teacher_one);
}

}  // namespace sparse
}  // namespace kdfast
