"""The kdfast loss functions: validate, choose the backend, call the fused op or the reference."""
import torch

from kdfast import _backend, _ops, _tuning as tuning, _validation as v, reference

from kdfast.fused_linear import fused_linear_distill_loss

if _ops.LOADED:
    from kdfast._fused_autograd import fused_loss

__all__ = ["softmax_kl_div", "kd_loss", "generalized_jsd", "reverse_kl_div", "skew_kl_div", "tv_distance", "sparse_kl_div", "logit_mse", "feature_l2", "cosine_loss",
           "pairwise_distances", "rkd_distance_loss", "rkd_angle_loss", "rkd_loss", "fused_linear_distill_loss"]


def _rows2d(x, V):
    if x.dim() != 2 or x.shape[1] != V:  # (a reshape costs more than these checks on tiny losses)
        x = x.reshape(-1, V)
    return x if x.stride(-1) == 1 or V == 1 else x.contiguous()


def _common_dtype(student, teacher):
    if student.dtype != teacher.dtype:
        common = torch.promote_types(student.dtype, teacher.dtype)
        student, teacher = student.to(common), teacher.to(common)
    return student, teacher


def _row_weight(rows, batch, reduction, mask, scale, acc, device):
    """The gradient the loss will send back to each row's value (the reduction's factor times
    `scale`, 0 on masked rows), so that a fused op can write the final gradient in the same pass as
    the loss. batch: logits.shape[0], batchmean's divisor."""
    factor = scale / batch if reduction == "batchmean" and batch > 0 else scale
    w = torch.full((rows,), factor, dtype=acc, device=device)
    if mask is not None:
        w = w * mask.reshape(-1)
        if reduction == "mean":
            w = w / mask.sum().clamp(min=1).to(acc)
    elif reduction == "mean" and rows > 0:
        w = w / rows
    return w


def _native_softmax_kl(student, teacher, temperature, reduction, mask, scale, divergence=0, mix=0.0):
    student, teacher = _common_dtype(student, teacher)
    lead, V = student.shape[:-1], student.shape[-1]
    s2, t2 = _rows2d(student, V), _rows2d(teacher, V)
    w = _row_weight(s2.shape[0], student.shape[0], reduction, mask, scale, v.compute_dtype(student), student.device)
    kl = fused_loss(torch.ops.kdfast.softmax_kl, s2, t2, w, 1.0 / temperature, divergence, mix)  # w * D per row
    out = kl.reshape(lead) if reduction == "none" else kl.sum()
    out_dtype = v.result_dtype(student, teacher)
    return out if out.dtype == out_dtype else out.to(out_dtype)


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
    temperature = v.check_positive(temperature, "temperature")
    return _divergence(student, teacher, temperature, reduction, mask, "kl", 0.0,
                       temperature * temperature if squared_t else 1.0)


def _divergence(student, teacher, temperature, reduction, mask, divergence, mix, scale=1.0):
    """scale * the divergence (a name of reference.DIVERGENCES) between the temperature softmaxes."""
    if type(student) is not torch.Tensor or type(teacher) is not torch.Tensor:  # DTensor: vocab-parallel
        from kdfast import distributed
        if distributed.is_dtensor(student) or distributed.is_dtensor(teacher):
            return distributed.dtensor_divergence(student, teacher, temperature, reduction, mask, divergence, mix,
                                                  scale)
    v.check_logits(student, teacher)
    temperature = v.check_positive(temperature, "temperature")
    v.check_reduction(reduction, v.KL_REDUCTIONS)
    mask = v.check_mask(mask, student)
    if _backend.use_native(student.device):
        return _native_softmax_kl(student, teacher, temperature, reduction, mask, scale,
                                  reference.DIVERGENCES.index(divergence), mix)
    out = reference.reduce_rows(reference.divergence_rows(student, teacher, temperature, divergence, mix, mask),
                                mask, reduction, student.shape[0]).to(v.result_dtype(student, teacher))
    return out * scale if scale != 1.0 else out


def generalized_jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, reduction="batchmean", mask=None):
    """Generalized Jensen-Shannon divergence with TRL's beta: beta KL(P||M) + (1 - beta) KL(Q||M),
    M = beta P + (1 - beta) Q, P = softmax(teacher / T), Q = softmax(student / T); beta = 0 is
    KL(P||Q) and beta = 1 is KL(Q||P), exactly. Reductions and mask as softmax_kl_div; no T^2."""
    beta = v.check_unit_interval(beta, "beta")
    return _divergence(student_logits, teacher_logits, temperature, reduction, mask, "jsd", beta)


def reverse_kl_div(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", mask=None):
    """Reverse KL, KL(Q||P): mode-seeking (TRL DistillationConfig's default). As softmax_kl_div otherwise."""
    return _divergence(student_logits, teacher_logits, temperature, reduction, mask, "reverse_kl", 0.0)


def skew_kl_div(student_logits, teacher_logits, *, alpha=0.1, reverse=False, temperature=1.0,
                reduction="batchmean", mask=None):
    """DistiLLM's skew KL, KL(P || alpha P + (1 - alpha) Q); with reverse=True the skew reverse KL,
    KL(Q || alpha Q + (1 - alpha) P). alpha = 0 is the plain (reverse) KL."""
    alpha = v.check_unit_interval(alpha, "alpha")
    return _divergence(student_logits, teacher_logits, temperature, reduction, mask,
                       "skew_reverse_kl" if reverse else "skew_kl", alpha)


def tv_distance(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", mask=None):
    """Total variation distance between the temperature softmaxes, sum over the vocabulary of
    |P - Q| / 2 (in [0, 1] per row)."""
    return _divergence(student_logits, teacher_logits, temperature, reduction, mask, "tvd", 0.0)


def sparse_kl_div(student_logits, teacher_topk_logprobs, teacher_topk_indices, *, temperature=1.0,
                  tail="renormalize", reduction="batchmean", mask=None):
    """KL from a teacher known by its top-k log-probabilities to the student's softmax over all of V.

    student_logits (..., V); teacher_topk_logprobs (..., K): the teacher's log-probabilities at
    T = 1 (torch.topk of log_softmax, or an inference server's logprobs) for the vocabulary ids
    teacher_topk_indices (..., K), int64 or int32, distinct within a row.
    tail="renormalize": the teacher renormalised over its K ids at temperature T,
    P_k = softmax_k(l_k / T), and sum_k P_k (log P_k - log Q_{i_k}) with Q = softmax(student / T)
    over all of V: the exact KL from the truncated teacher (DistillKit's convention).
    tail="bucket": P_k = exp(l_k) as given (T applies to the student alone), plus a (K + 1)-th
    outcome, the teacher's missing mass max(1 - sum_k P_k, 0) against the student's mass outside
    the K ids (TRL's loss_add_tail, ModelOpt's ghost token). No T^2 factor.
    reduction and mask as softmax_kl_div (mask's rows are not read, their ids not checked).
    """
    mask = v.check_sparse(student_logits, teacher_topk_logprobs, teacher_topk_indices, tail, mask)
    temperature = v.check_positive(temperature, "temperature")
    v.check_reduction(reduction, v.KL_REDUCTIONS)
    if not _backend.use_native(student_logits.device):
        return reference.sparse_kl_div(student_logits, teacher_topk_logprobs, teacher_topk_indices,
                                       temperature=temperature, tail=tail, reduction=reduction, mask=mask)
    s, lp = student_logits, teacher_topk_logprobs
    acc = v.compute_dtype(s, lp)
    if acc == torch.float64 and s.dtype != torch.float64:  # a float64 teacher: the op runs in float64
        s = s.to(acc)
    lp = lp.to(acc)  # (rows, K): small; a half-precision student is read as it is
    V, K = s.shape[-1], lp.shape[-1]
    s2, l2, i2 = _rows2d(s, V), _rows2d(lp, K), _rows2d(teacher_topk_indices, K)
    w = _row_weight(s2.shape[0], s.shape[0], reduction, mask, 1.0, acc, s.device)
    rows = fused_loss(torch.ops.kdfast.sparse_kl, s2, l2, w, i2, 1.0 / temperature,
                      v.SPARSE_TAILS.index(tail))  # w * L per row
    out = rows.reshape(s.shape[:-1]) if reduction == "none" else rows.sum()
    return out.to(v.result_dtype(student_logits, teacher_topk_logprobs))


# ---------------------------------------------------------------- feature-based

def _feature_rows(x):
    """A (rows, C) view for the squared error, which only needs the total: C is the product of the
    trailing dims up to at least _tuning.SQ_ERROR_MIN_ROW elements."""
    C = 1
    for d in reversed(x.shape):
        if C >= tuning.SQ_ERROR_MIN_ROW:
            break
        C *= d
    return _rows2d(x, C)


def _native_sq_error(student, teacher, reduction):
    """sum or mean of (student - teacher)^2 through the fused op (both non-empty)."""
    s, t = _common_dtype(student, teacher)
    s2, t2 = _feature_rows(s), _feature_rows(t)
    factor = 1.0 / s.numel() if reduction == "mean" else 1.0
    w = torch.full((s2.shape[0],), factor, dtype=v.compute_dtype(s), device=s.device)
    return fused_loss(torch.ops.kdfast.feature_match, s2, t2, w, False, 0.0).sum()


def _native_ok(student):
    return student.numel() > 0 and _backend.use_native(student.device)




def _native_sq_error_ok(student, teacher):
    if not _native_ok(student):
        return False
    if _backend.get_backend() != "auto" or student.device.type != "cpu":
        return True
    size = torch.promote_types(student.dtype, teacher.dtype).itemsize  # the dtype the op would run in
    return student.numel() >= tuning.ATEN_MSE_BELOW.get(size, tuning.ATEN_MSE_BELOW_DEFAULT)


def logit_mse(student_logits, teacher_logits, *, reduction="mean"):
    """Mean (or sum, or elementwise with reduction="none") squared difference of the logits."""
    v.check_pair(student_logits, teacher_logits)
    v.check_reduction(reduction, v.REDUCTIONS)
    if reduction == "none" or not _native_sq_error_ok(student_logits, teacher_logits):
        return reference.logit_mse(student_logits, teacher_logits, reduction=reduction)
    out = _native_sq_error(student_logits, teacher_logits, reduction)
    return out.to(v.result_dtype(student_logits, teacher_logits))


def feature_l2(student_feats, teacher_feats, *, reduction="mean"):
    """Sum over layer pairs of the squared L2 distance: each pair's mean (reduction="mean") or sum
    (reduction="sum") over its elements."""
    v.check_reduction(reduction, ("mean", "sum"))
    pairs = reference.feature_pairs(student_feats, teacher_feats)
    total = None
    for i, (fs, ft) in enumerate(pairs):
        v.check_pair(fs, ft, f"student_feats[{i}]", f"teacher_feats[{i}]")
        if _native_sq_error_ok(fs, ft):
            term = _native_sq_error(fs, ft, reduction)
        else:
            term = reference.feature_l2(fs, ft, reduction=reduction)
        total = term if total is None else total + term  # promotes: a float64 pair is not rounded to float32
    return total.to(v.result_dtype(*[t for p in pairs for t in p]))


def cosine_loss(student_feats, teacher_feats, *, dim=-1, reduction="mean", eps=1e-8):
    """1 - cos(student, teacher) along `dim`, with each norm clamped at eps as F.cosine_similarity
    does; reduction "mean", "sum" or "none" (shape of the inputs without `dim`)."""
    v.check_pair(student_feats, teacher_feats, "student_feats", "teacher_feats")
    v.check_reduction(reduction, v.REDUCTIONS)
    dim = v.check_dim(dim, student_feats, "student_feats")
    eps = v.check_positive(eps, "eps")
    if student_feats.shape[dim] == 0 or not _native_ok(student_feats):
        return reference.cosine_loss(student_feats, teacher_feats, dim=dim, reduction=reduction, eps=eps)
    s, t = _common_dtype(student_feats, teacher_feats)
    s, t = s.movedim(dim, -1), t.movedim(dim, -1)
    D = s.shape[-1]
    s2, t2 = _rows2d(s, D), _rows2d(t, D)
    rows = s2.shape[0]
    factor = 1.0 / rows if reduction == "mean" else 1.0
    w = torch.full((rows,), factor, dtype=v.compute_dtype(s), device=s.device)
    out = fused_loss(torch.ops.kdfast.feature_match, s2, t2, w, True, eps)  # factor * (1 - cos) per row
    out = out.reshape(s.shape[:-1]) if reduction == "none" else out.sum()
    return out.to(v.result_dtype(student_feats, teacher_feats))


# ---------------------------------------------------------------- relation-based (RKD)

def _groups(x):
    return x if x.dim() == 3 else x.unsqueeze(0)


def _native_relation(student, teacher, distance_weight, angle_weight, delta, squared=False, eps=1e-12):
    """The fused RKD op: mean over groups of distance_weight * distance term + angle_weight * angle
    term (a term of weight 0 is not computed)."""
    s3, t3 = _groups(student), _groups(teacher)
    s3, t3 = _common_dtype(s3, t3)
    w = torch.full((s3.shape[0],), 1.0 / s3.shape[0], dtype=v.compute_dtype(s3), device=s3.device)
    out = fused_loss(torch.ops.kdfast.rkd, s3, t3, w, float(distance_weight), float(angle_weight), delta,
                     bool(squared), eps)
    return out.sum().to(v.result_dtype(student, teacher))


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
    return _native_relation(student, teacher, 1.0, 0.0, delta, squared, eps)


def rkd_angle_loss(student, teacher, *, delta=1.0, eps=1e-12):
    """RKD angle term: mean Huber_delta between the cosines of every triplet angle, computed from
    exact squared distances by the law of cosines in O(N^2) memory."""
    v.check_relation_pair(student, teacher)
    delta = v.check_positive(delta, "delta")
    eps = v.check_nonnegative(eps, "eps")
    if not _backend.use_native(student.device):
        return reference.rkd_angle_loss(student, teacher, delta=delta, eps=eps)
    return _native_relation(student, teacher, 0.0, 1.0, delta, eps=eps)


def rkd_loss(student, teacher, *, distance_weight=25.0, angle_weight=50.0, delta=1.0, squared=False, eps=1e-12):
    """RKD-DA: distance_weight * distance term + angle_weight * angle term (25 and 50 as published);
    squared and eps as in rkd_distance_loss (eps also as in rkd_angle_loss)."""
    v.check_relation_pair(student, teacher)
    dw = v.check_nonnegative(distance_weight, "distance_weight")
    aw = v.check_nonnegative(angle_weight, "angle_weight")
    delta = v.check_positive(delta, "delta")
    eps = v.check_nonnegative(eps, "eps")
    if not _backend.use_native(student.device):
        return reference.rkd_loss(student, teacher, distance_weight=dw, angle_weight=aw, delta=delta,
                                  squared=squared, eps=eps)
    return _native_relation(student, teacher, dw, aw, delta, squared, eps)
