"""Fake (meta) kernels of the torch.ops.kdfast ops, for torch.compile and FakeTensor tracing: each
returns empty tensors of the shapes, dtypes and devices the real kernel returns, and checks what
the output shapes depend on. The schemas are in csrc/kdfast.cpp. Imported by kdfast._ops only when
the extension is loaded (compare torchvision/_meta_registrations.py)."""
import torch

from kdfast._validation import compute_dtype


@torch.library.register_fake("kdfast::softmax_kl")
def _softmax_kl_fake(student, teacher, inv_temperature, divergence, mix, row_weight, grad_student, grad_teacher, grad_scale=1.0):
    return _row_op_fake(student, teacher, row_weight, grad_student, grad_teacher, torch.float64)


@torch.library.register_fake("kdfast::feature_match")
def _feature_match_fake(student, teacher, cosine, eps, row_weight, grad_student, grad_teacher, grad_scale=1.0):
    return _row_op_fake(student, teacher, row_weight, grad_student, grad_teacher)


@torch.library.register_fake("kdfast::sparse_kl")
def _sparse_kl_fake(student, teacher_logprobs, indices, inv_temperature, tail, row_weight, grad_student, grad_teacher):
    torch._check(student.dim() == 2 and teacher_logprobs.dim() == 2 and indices.shape == teacher_logprobs.shape)
    loss = row_weight.new_empty((student.shape[0],), dtype=torch.float64)
    gs = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
    gt = teacher_logprobs.new_empty(teacher_logprobs.shape) if grad_teacher else teacher_logprobs.new_empty((0,))
    return loss, gs, gt


def _row_op_fake(student, teacher, row_weight, grad_student, grad_teacher, loss_dtype=None):
    """(loss per row in loss_dtype or row_weight's, gradient or empty, gradient or empty) of (rows, V)
    inputs."""
    torch._check(student.dim() == 2 and student.shape == teacher.shape)
    kl = row_weight.new_empty((student.shape[0],), dtype=loss_dtype or row_weight.dtype)
    gs = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
    gt = teacher.new_empty(teacher.shape) if grad_teacher else teacher.new_empty((0,))
    return kl, gs, gt


@torch.library.register_fake("kdfast::scale_rows_")
def _scale_rows_fake(grad, ratio):
    return None


@torch.library.register_fake("kdfast::rkd")
def _rkd_fake(student, teacher, distance_weight, angle_weight, delta, squared, eps, group_weight, grad_student,
              grad_teacher):
    torch._check(student.dim() == 3 and teacher.dim() == 3)
    loss = group_weight.new_empty((student.shape[0],))
    gs = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
    gt = teacher.new_empty(teacher.shape) if grad_teacher else teacher.new_empty((0,))
    return loss, gs, gt


@torch.library.register_fake("kdfast::pairwise_distances")
def _pairwise_fake(x, squared, normalize, eps):
    torch._check(x.dim() == 3)
    return x.new_empty((x.shape[0], x.shape[1], x.shape[1]), dtype=compute_dtype(x))


@torch.library.register_fake("kdfast::pairwise_distances_backward")
def _pairwise_backward_fake(grad, x, squared, normalize, eps):
    return torch.empty_like(x)


# the per-shard passes of kdfast.distributed (csrc/ops/softmax_kl.cpp)
@torch.library.register_fake("kdfast::softmax_kl_shard_stats")
def _shard_stats_fake(student, teacher, inv_temperature, with_a):
    torch._check(student.dim() == 2 and student.shape == teacher.shape)
    return student.new_empty((5 if with_a else 4, student.shape[0]), dtype=compute_dtype(student))


@torch.library.register_fake("kdfast::softmax_kl_shard_sums")
def _shard_sums_fake(student, teacher, inv_temperature, divergence, mix, state):
    torch._check(student.dim() == 2 and student.shape == teacher.shape)
    return state.new_empty((3, student.shape[0]))


@torch.library.register_fake("kdfast::softmax_kl_shard_grads")
def _shard_grads_fake(student, teacher, inv_temperature, divergence, mix, state, row_sums, coef, grad_student,
                      grad_teacher):
    torch._check(student.dim() == 2 and student.shape == teacher.shape)
    gs = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
    gt = teacher.new_empty(teacher.shape) if grad_teacher else teacher.new_empty((0,))
    return gs, gt
