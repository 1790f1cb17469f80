"""The kdfast loss functions: validate, choose the backend, call the fused op or the reference."""
import torch

from kdfast import _backend, _ops, _validation as v, reference

if _ops.LOADED:
    from kdfast._autograd import fused_loss

__all__ = ["softmax_kl_div", "kd_loss", "logit_mse", "feature_l2", "cosine_loss",
           "pairwise_distances", "rkd_distance_loss", "rkd_angle_loss", "rkd_loss"]


def _rows2d(x, V):
    x = x.reshape(-1, V)
    return x if x.stride(-1) == 1 or V == 1 else x.contiguous()


def _native_softmax_kl(student, teacher, temperature, reduction, mask, scale):
    if student.dtype != teacher.dtype:
        common = torch.promote_types(student.dtype, teacher.dtype)
        student, teacher = student.to(common), teacher.to(common)
    lead, V = student.shape[:-1], student.shape[-1]
    s2, t2 = _rows2d(student, V), _rows2d(teacher, V)
    rows = s2.shape[0]
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    # row_weight is the gradient the loss will send back to each row's KL (the reduction's factor
    # times `scale`), so the op can write the final gradient in the same pass as the loss.
    if reduction == "batchmean":
        factor = scale / student.shape[0] if student.shape[0] > 0 else scale
    else:
        factor = scale
    w = torch.full((rows,), factor, dtype=acc, device=student.device)
    if mask is not None:
        w = w * mask.reshape(-1)
        if reduction == "mean":
            w = w / mask.sum().clamp(min=1).to(acc)
    elif reduction == "mean" and rows > 0:
        w = w / rows
    kl = fused_loss(torch.ops.kdfast.softmax_kl, s2, t2, w, 1.0 / temperature)  # w * KL per row
    out_dtype = v.result_dtype(student, teacher)
    if reduction == "none":
        return kl.reshape(lead).to(out_dtype)
    return kl.sum().to(out_dtype)


def softmax_kl_div(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", mask=None):
    """KL(softmax(teacher/T) || softmax(student/T)) over the last dim, one value per row, reduced.

    reduction: "batchmean" (sum / logits.shape[0], as F.kl_div), "mean" (sum / counted rows),
    "sum" or "none" (per-row values, shape logits.shape[:-1]). mask: bool, shape logits.shape[:-1];
    rows where it is False add 0 and are not counted.
    """
    return _kl(student_logits, teacher_logits, temperature, reduction, mask, squared_t=False)


def kd_loss(student_logits, teacher_logits, *, temperature=4.0, reduction="batchmean", mask=None):
    """Hinton's KD loss: T^2 * softmax_kl_div(student, teacher, temperature=T)."""
    return _kl(student_logits, teacher_logits, temperature, reduction, mask, squared_t=True)


def _kl(student, teacher, temperature, reduction, mask, squared_t):
    v.check_logits(student, teacher)
    temperature = v.check_positive(temperature, "temperature")
    v.check_reduction(reduction, v.KL_REDUCTIONS)
    mask = v.check_mask(mask, student)
    scale = temperature * temperature if squared_t else 1.0
    if _backend.use_native(student.device):
        return _native_softmax_kl(student, teacher, temperature, reduction, mask, scale)
    out = reference.softmax_kl_div(student, teacher, temperature=temperature, reduction=reduction, mask=mask)
    return out * scale if squared_t else out


# Losses without a fused kernel run their plain-PyTorch code under every backend.
logit_mse = reference.logit_mse
feature_l2 = reference.feature_l2
cosine_loss = reference.cosine_loss


# ---------------------------------------------------------------- relation-based (RKD)

def _groups(x):
    return x if x.dim() == 3 else x.unsqueeze(0)


def _native_relation(op, student, teacher, scale, *params):
    """sum_b w_b loss_b with w_b = scale / B: the relation losses average their groups."""
    if student.dtype != teacher.dtype:
        common = torch.promote_types(student.dtype, teacher.dtype)
        student, teacher = student.to(common), teacher.to(common)
    s3, t3 = _groups(student), _groups(teacher)
    acc = torch.float64 if s3.dtype == torch.float64 else torch.float32
    w = torch.full((s3.shape[0],), scale / s3.shape[0], dtype=acc, device=s3.device)
    return fused_loss(op, s3, t3, w, *params).sum().to(v.result_dtype(student, teacher))


def pairwise_distances(x, *, squared=False, normalize=True, eps=1e-12):
    """(N, D) -> (N, N) or (B, N, D) -> (B, N, N) distances, clamped at eps (before the square
    root) with a zero diagonal; with normalize, each group is divided by the mean of its positive
    entries (RKD's psi)."""
    v.check_points(x, "x")
    eps = v.check_nonnegative(eps, "eps")
    if not _backend.use_native(x.device):
        return reference.pairwise_distances(x, squared=squared, normalize=normalize, eps=eps)
    out = torch.ops.kdfast.pairwise_distances(_groups(x), bool(squared), bool(normalize), eps)
    return (out if x.dim() == 3 else out[0]).to(v.result_dtype(x))


def rkd_distance_loss(student, teacher, *, delta=1.0, squared=False, eps=1e-12):
    """RKD distance term: mean Huber_delta between the psi-normalised distance matrices of student
    and teacher ((N, D) or (B, N, D); widths may differ), averaged over groups."""
    v.check_relation_pair(student, teacher)
    delta = v.check_positive(delta, "delta")
    eps = v.check_nonnegative(eps, "eps")
    if not _backend.use_native(student.device):
        return reference.rkd_distance_loss(student, teacher, delta=delta, squared=squared, eps=eps)
    return _native_relation(torch.ops.kdfast.rkd_distance, student, teacher, 1.0, delta, bool(squared), eps)


def rkd_angle_loss(student, teacher, *, delta=1.0, eps=1e-12):
    """RKD angle term: mean Huber_delta between the cosines of every triplet angle, computed from
    Gram matrices in O(N^2) memory."""
    v.check_relation_pair(student, teacher)
    delta = v.check_positive(delta, "delta")
    eps = v.check_nonnegative(eps, "eps")
    if not _backend.use_native(student.device):
        return reference.rkd_angle_loss(student, teacher, delta=delta, eps=eps)
    return _native_relation(torch.ops.kdfast.rkd_angle, student, teacher, 1.0, delta, eps)


def rkd_loss(student, teacher, *, distance_weight=25.0, angle_weight=50.0, delta=1.0):
    """RKD-DA: distance_weight * distance term + angle_weight * angle term (25 and 50 as published)."""
    v.check_relation_pair(student, teacher)
    dw = v.check_nonnegative(distance_weight, "distance_weight")
    aw = v.check_nonnegative(angle_weight, "angle_weight")
    delta = v.check_positive(delta, "delta")
    if not _backend.use_native(student.device):
        return reference.rkd_loss(student, teacher, distance_weight=dw, angle_weight=aw, delta=delta)
    eps = 1e-12
    return (_native_relation(torch.ops.kdfast.rkd_distance, student, teacher, dw, delta, False, eps)
            + _native_relation(torch.ops.kdfast.rkd_angle, student, teacher, aw, delta, eps))
