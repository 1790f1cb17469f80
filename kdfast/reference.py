"""Pure-PyTorch implementations of every kdfast loss: the test oracle and the fallback backend.

They follow the formulations people run today (F.kl_div with log_softmax, torchdistill /
RepDistiller RKDLoss) with the conventions of docs/design.md, and compute in at least float32.
"""
import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from kdfast import _validation as v

__all__ = ["softmax_kl_div", "kd_loss", "generalized_jsd", "reverse_kl_div", "skew_kl_div", "tv_distance", "sparse_kl_div", "logit_mse", "feature_l2", "cosine_loss",
           "pairwise_distances", "rkd_distance_loss", "rkd_angle_loss", "rkd_loss", "fused_linear_distill_loss"]


# ---------------------------------------------------------------- response-based

def reduce_rows(rows, mask, reduction, batch):
    """Reduce per-row KL values. rows has the logits' leading shape; masked rows count as absent."""
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / batch if batch > 0 else total
    count = rows.numel() if mask is None else mask.sum()
    if mask is None:
        return total / count if count > 0 else total
    return total / count.clamp(min=1).to(total.dtype)


def kl_rows(student_logits, teacher_logits, temperature, mask=None):
    return kl_terms(student_logits, teacher_logits, temperature, mask).sum(-1)


def kl_terms(student_logits, teacher_logits, temperature, mask=None):
    """kl_rows before its sum over the vocabulary: p_t (log p_t - log p_s) per entry, the logits' shape."""
    acc = v.compute_dtype(student_logits, teacher_logits)
    if mask is not None:
        # Masked-out rows enter as zeros (KL 0): the where() on the inputs gives them zero gradient
        # whatever they hold, where zeroing their KL afterwards would still pass a NaN or -inf row's
        # NaN through log_softmax's backward.
        keep = mask.unsqueeze(-1)
        zero = torch.zeros((), dtype=student_logits.dtype, device=student_logits.device)
        student_logits = torch.where(keep, student_logits, zero)
        teacher_logits = torch.where(keep, teacher_logits, zero.to(teacher_logits.dtype))
    log_ps = F.log_softmax(student_logits.to(acc) / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.to(acc) / temperature, dim=-1)
    pt = log_pt.exp()
    # A term with p_t = 0 is 0, also where a logit is -inf (masked vocabulary); the where() sits
    # before the product so that no NaN of a -inf logit leaks into the gradient either. (p_t != 0,
    # not p_t > 0: a NaN logit gives its row NaN loss and NaN gradients on both sides.)
    diff = torch.where(pt != 0, log_pt - log_ps, torch.zeros((), dtype=acc, device=pt.device))
    return pt * diff


def softmax_kl_div(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", mask=None):
    """KL(softmax(teacher / T) || softmax(student / T)) over the last dim, per row, reduced."""
    v.check_logits(student_logits, teacher_logits)
    temperature = v.check_positive(temperature, "temperature")
    v.check_reduction(reduction, v.KL_REDUCTIONS)
    mask = v.check_mask(mask, student_logits)
    rows = kl_rows(student_logits, teacher_logits, temperature, mask)
    batch = student_logits.shape[0]
    return reduce_rows(rows, mask, reduction, batch).to(v.result_dtype(student_logits, teacher_logits))


# The divergences of the softmax-KL family by the op's numbering (csrc/ops/softmax_kl.cpp).
DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


def _masked_inputs(student_logits, teacher_logits, mask):
    """Masked-out rows as zeros (a divergence of 0 and zero gradients whatever they held; see kl_rows)."""
    if mask is None:
        return student_logits, teacher_logits
    keep = mask.unsqueeze(-1)
    zero = torch.zeros((), dtype=student_logits.dtype, device=student_logits.device)
    return torch.where(keep, student_logits, zero), torch.where(keep, teacher_logits, zero.to(teacher_logits.dtype))


def _xlogy_ratio(p, log_p, log_m):
    """p * (log p - log m), 0 where p = 0, NaN kept. The whole log-ratio is replaced where p = 0,
    before the product: a discarded 0 * (0 - log m) would still be NaN in the gradient where log m
    is -inf too (skew KL at alpha = 1, M = P)."""
    return p * torch.where(p != 0, log_p - log_m, torch.zeros((), dtype=p.dtype, device=p.device))


def divergence_rows(student_logits, teacher_logits, temperature, divergence="kl", mix=0.0, mask=None):
    """Per-row divergence between P = softmax(teacher / T) and Q = softmax(student / T), computed
    from log-probabilities in at least float32; a mixture is formed from probabilities (logsumexp
    of the log-probabilities plus log weights). divergence: one of DIVERGENCES; mix: beta for jsd,
    alpha for the skew forms. The endpoints jsd(0) = KL(P||Q), jsd(1) = KL(Q||P) and skew(0) = KL
    are TRL's definitions. Never below 0: near P = Q the terms cancel to rounding, which may land
    below 0 (ms-swift #10156); the kernels clamp their rows too. Such a row keeps its gradient, as
    the kernels' do: the exact divergence is >= 0, so the clamp is rounding's, not a kink of the
    function (a clamp's zero gradient there lost a gradient of 1e-9 per element: fuzz seed 71 case
    1258). NaN stays."""
    rows = divergence_terms(student_logits, teacher_logits, temperature, divergence, mix, mask).sum(-1)
    return torch.where(rows < 0, rows - rows.detach(), rows)  # (a negative row is finite: 0 exactly)


def divergence_terms(student_logits, teacher_logits, temperature, divergence="kl", mix=0.0, mask=None):
    """divergence_rows before its sum over the vocabulary: one term per entry, the logits' shape
    (what TRL's generalized_jsd_loss returns for reduction="none")."""
    if divergence in ("reverse_kl", "skew_reverse_kl"):
        forward = "kl" if divergence == "reverse_kl" else "skew_kl"
        return divergence_terms(teacher_logits, student_logits, temperature, forward, mix, mask)
    if divergence == "kl" or (divergence in ("jsd", "skew_kl") and mix == 0):
        return kl_terms(student_logits, teacher_logits, temperature, mask)
    if divergence == "jsd" and mix == 1:
        return kl_terms(teacher_logits, student_logits, temperature, mask)
    acc = v.compute_dtype(student_logits, teacher_logits)
    s, t = _masked_inputs(student_logits, teacher_logits, mask)
    log_q = F.log_softmax(s.to(acc) / temperature, dim=-1)
    log_p = F.log_softmax(t.to(acc) / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "tvd":
        # |d| as d * sign(d), with sign(NaN) = NaN: abs's backward (and torch.sign) take the sign of
        # NaN as 0, which would give the other side of a NaN row finite gradients. At d = 0 the
        # gradient is 0, as abs's (and the kernels') is.
        d = p - q
        sign = torch.where(d.isnan(), d, d.sign()).detach()
        return 0.5 * d * sign

    # log M, M = mix P + (1 - mix) Q, from probabilities (logaddexp of the log-probabilities plus
    # log weights). Where P = Q = 0 (-inf logits in both) M is 0 and no term reads it: the inputs
    # are set to 0 there, so that logaddexp's backward sees no -inf - (-inf).
    zero = torch.zeros((), dtype=acc, device=p.device)
    both_zero = (p == 0) & (q == 0)
    lp, lq = torch.where(both_zero, zero, log_p), torch.where(both_zero, zero, log_q)
    if mix == 1:
        # M = P (skew KL at alpha = 1: KL(P||P) = 0). The student still enters, as in the kernels'
        # M = 1 P + 0 Q: its NaN propagates (never hidden), it gets a (zero) gradient, not None, and
        # in a NaN row (a teacher without mass) a NaN one, as at every alpha < 1 (0 x its finite
        # log-probabilities carries the row's NaN back to it).
        log_m = torch.where(lq.isnan(), lq, lp) + 0 * torch.where(lq.isfinite(), lq, zero)
    else:
        log_m = torch.logaddexp(lp + math.log(mix), lq + math.log1p(-mix))
    if divergence == "jsd":
        return mix * _xlogy_ratio(p, log_p, log_m) + (1 - mix) * _xlogy_ratio(q, log_q, log_m)
    if divergence == "skew_kl":
        return _xlogy_ratio(p, log_p, log_m)
    raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")


def _divergence_loss(student_logits, teacher_logits, temperature, reduction, mask, divergence, mix):
    v.check_logits(student_logits, teacher_logits)
    temperature = v.check_positive(temperature, "temperature")
    v.check_reduction(reduction, v.KL_REDUCTIONS)
    mask = v.check_mask(mask, student_logits)
    rows = divergence_rows(student_logits, teacher_logits, temperature, divergence, mix, mask)
    out = reduce_rows(rows, mask, reduction, student_logits.shape[0])
    return out.to(v.result_dtype(student_logits, teacher_logits))


def generalized_jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, reduction="batchmean", mask=None):
    """beta KL(P||M) + (1 - beta) KL(Q||M), M = beta P + (1 - beta) Q; beta = 0 is KL(P||Q) and beta = 1
    KL(Q||P) (TRL's GKD convention), P = softmax(teacher / T), Q = softmax(student / T)."""
    beta = v.check_unit_interval(beta, "beta")
    return _divergence_loss(student_logits, teacher_logits, temperature, reduction, mask, "jsd", beta)


def reverse_kl_div(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", mask=None):
    """KL(Q||P): the student's softmax against the teacher's."""
    return _divergence_loss(student_logits, teacher_logits, temperature, reduction, mask, "reverse_kl", 0.0)


def skew_kl_div(student_logits, teacher_logits, *, alpha=0.1, reverse=False, temperature=1.0, reduction="batchmean",
                mask=None):
    """DistiLLM's skew KL: KL(P || alpha P + (1 - alpha) Q); reverse: KL(Q || alpha Q + (1 - alpha) P)."""
    alpha = v.check_unit_interval(alpha, "alpha")
    return _divergence_loss(student_logits, teacher_logits, temperature, reduction, mask,
                            "skew_reverse_kl" if reverse else "skew_kl", alpha)


def tv_distance(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", mask=None):
    """Total variation distance, sum over the vocabulary of |P - Q| / 2."""
    return _divergence_loss(student_logits, teacher_logits, temperature, reduction, mask, "tvd", 0.0)


# The floor of the student's tail mass in the bucket tail (csrc/common/sparse_kl.h, kTailFloor).
SPARSE_TAIL_FLOOR = 1e-30


def sparse_kl_rows(student_logits, teacher_topk_logprobs, teacher_topk_indices, temperature, tail, mask=None):
    """Per-row KL from a top-k teacher to the student's temperature softmax over all of V
    (csrc/common/sparse_kl.h): tail "renormalize" (the teacher re-tempered over its K ids) or
    "bucket" (P_k = exp(l_k) plus the tail 1 - sum P_k against the student's unlisted mass, empty
    when K = V)."""
    acc = v.compute_dtype(student_logits, teacher_topk_logprobs)
    s, l, idx = student_logits.to(acc), teacher_topk_logprobs.to(acc), teacher_topk_indices.long()
    zero = torch.zeros((), dtype=acc, device=s.device)
    if mask is not None:  # masked-out rows as zeros and ids 0..K-1: loss 0, zero gradients
        keep = mask.unsqueeze(-1)
        s, l = torch.where(keep, s, zero), torch.where(keep, l, zero)
        idx = torch.where(keep, idx, torch.arange(idx.shape[-1], device=idx.device))
    log_q = F.log_softmax(s / temperature, dim=-1)
    lq = log_q.gather(-1, idx)
    log_p = F.log_softmax(l / temperature, dim=-1) if tail == "renormalize" else l
    p = log_p.exp()
    rows = (p * torch.where(p != 0, log_p - lq, zero)).sum(-1)
    if tail == "bucket":
        # With K = V no id is left for the bucket: empty on both sides (see csrc/common/sparse_kl.h).
        p_tail = (1 - p.sum(-1)).clamp(min=0) if idx.shape[-1] < s.shape[-1] else torch.zeros_like(rows)
        q_tail = log_q.exp().scatter(-1, idx, 0.0).sum(-1).clamp(min=SPARSE_TAIL_FLOOR)  # no 1 - sum: it cancels
        live = p_tail > 0
        safe = torch.where(live, p_tail, torch.ones((), dtype=acc, device=s.device))
        rows = rows + torch.where(live, p_tail * (safe.log() - q_tail.log()), zero)
    return rows


def sparse_kl_div(student_logits, teacher_topk_logprobs, teacher_topk_indices, *, temperature=1.0,
                  tail="renormalize", reduction="batchmean", mask=None):
    """KL from a teacher known by its top-k log-probabilities (..., K) at the ids (..., K) to
    softmax(student / T) over all of V, per row, reduced (see sparse_kl_rows)."""
    mask = v.check_sparse(student_logits, teacher_topk_logprobs, teacher_topk_indices, tail, mask)
    temperature = v.check_positive(temperature, "temperature")
    v.check_reduction(reduction, v.KL_REDUCTIONS)
    v.check_sparse_ids(teacher_topk_indices, student_logits.shape[-1], mask)
    rows = sparse_kl_rows(student_logits, teacher_topk_logprobs, teacher_topk_indices, temperature, tail, mask)
    out = reduce_rows(rows, mask, reduction, student_logits.shape[0])
    return out.to(v.result_dtype(student_logits, teacher_topk_logprobs))


def kd_loss(student_logits, teacher_logits, *, temperature=4.0, reduction="batchmean", mask=None):
    """Hinton's distillation loss: T^2 * softmax_kl_div (the T^2 keeps gradient sizes independent of T)."""
    temperature = v.check_positive(temperature, "temperature")
    return softmax_kl_div(student_logits, teacher_logits, temperature=temperature,
                          reduction=reduction, mask=mask) * (temperature * temperature)


def logit_mse(student_logits, teacher_logits, *, reduction="mean"):
    """Mean (or sum, or elementwise) squared difference of the logits."""
    v.check_pair(student_logits, teacher_logits)
    v.check_reduction(reduction, v.REDUCTIONS)
    acc = v.compute_dtype(student_logits, teacher_logits)
    out = F.mse_loss(student_logits.to(acc), teacher_logits.to(acc), reduction=reduction)
    return out.to(v.result_dtype(student_logits, teacher_logits))


# ---------------------------------------------------------------- feature-based

def feature_pairs(student_feats, teacher_feats):
    """[(student, teacher)] for a pair of tensors or of equally long sequences of tensors."""
    if isinstance(student_feats, torch.Tensor) or isinstance(teacher_feats, torch.Tensor):
        if not (isinstance(student_feats, torch.Tensor) and isinstance(teacher_feats, torch.Tensor)):
            raise TypeError("student_feats and teacher_feats must both be tensors or both be sequences "
                            "of tensors")
        return [(student_feats, teacher_feats)]
    if not isinstance(student_feats, Sequence) or not isinstance(teacher_feats, Sequence):
        raise TypeError("student_feats and teacher_feats must be tensors or sequences of tensors, got "
                        f"{type(student_feats).__name__} and {type(teacher_feats).__name__}")
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"student_feats has {len(student_feats)} layers but teacher_feats has "
                         f"{len(teacher_feats)}")
    if len(student_feats) == 0:
        raise ValueError("student_feats and teacher_feats are empty")
    return list(zip(student_feats, teacher_feats))


def feature_l2(student_feats, teacher_feats, *, reduction="mean"):
    """Sum over layer pairs of the squared L2 distance: each pair's mean (reduction="mean") or sum
    (reduction="sum") over its elements."""
    v.check_reduction(reduction, ("mean", "sum"))
    pairs = feature_pairs(student_feats, teacher_feats)
    total = None
    for i, (fs, ft) in enumerate(pairs):
        v.check_pair(fs, ft, f"student_feats[{i}]", f"teacher_feats[{i}]")
        acc = v.compute_dtype(fs, ft)
        term = F.mse_loss(fs.to(acc), ft.to(acc), reduction=reduction)
        # (promoting: a float64 term after a float32 one must not be rounded to float32)
        total = term if total is None else total + term
    return total.to(v.result_dtype(*[t for p in pairs for t in p]))


def _unoverflowed(x, dim):
    """x with every finite row whose squared norm overflows divided by its largest magnitude, as
    the native op does: F.cosine_similarity would take that norm as inf and the cosine as 0. The
    cosine is scale-invariant, the factor is detached, and such a norm stays far above any eps, so
    value and gradients are unchanged otherwise."""
    if x.shape[dim] == 0:
        return x
    with torch.no_grad():
        m = x.abs().amax(dim, keepdim=True)
        over = torch.isinf((x * x).sum(dim, keepdim=True)) & torch.isfinite(m)
    return torch.where(over, x / torch.where(over, m, torch.ones((), dtype=m.dtype, device=m.device)), x)


def cosine_loss(student_feats, teacher_feats, *, dim=-1, reduction="mean", eps=1e-8):
    """1 - cos(student, teacher) along `dim`, as F.cosine_similarity computes it."""
    v.check_pair(student_feats, teacher_feats, "student_feats", "teacher_feats")
    v.check_reduction(reduction, v.REDUCTIONS)
    dim = v.check_dim(dim, student_feats, "student_feats")
    eps = v.check_positive(eps, "eps")
    acc = v.compute_dtype(student_feats, teacher_feats)
    fs, ft = _unoverflowed(student_feats.to(acc), dim), _unoverflowed(teacher_feats.to(acc), dim)
    out = 1 - F.cosine_similarity(fs, ft, dim=dim, eps=eps)
    if reduction == "mean":
        out = out.mean()
    elif reduction == "sum":
        out = out.sum()
    return out.to(v.result_dtype(student_feats, teacher_feats))


# ---------------------------------------------------------------- relation-based (RKD)

def _fp32_under_autocast(fn):
    """Relation math runs in its compute dtype even inside torch.autocast, as PyTorch's own losses
    do: autocast would lower the Gram / unit-vector matmuls to bf16/fp16 and cost ~1e-3 relative."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()), None)
        device = first.device.type if isinstance(first, torch.Tensor) else None
        if device is not None and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return wrapper


def _pdist(x, squared, eps):
    """torchdistill's pdist, batched: (..., N, D) -> (..., N, N), clamped at eps (before the square
    root), zero diagonal. The distances come from the coordinate differences, not from
    |x_i|^2 + |x_j|^2 - 2 <x_i, x_j>, whose cancellation loses the small distances of points far
    apart or far from the origin and turns duplicates into noise; this costs O(N^2 D) memory, as
    the angle term's unit vectors do. sqrt(max(d^2, eps)) is max(|x_i - x_j|, sqrt(eps)): no square
    root of 0 is taken, whose infinite gradient would turn the diagonal (and duplicates at eps = 0)
    into NaN gradients."""
    diff = x.unsqueeze(-2) - x.unsqueeze(-3)
    if squared:
        d = (diff * diff).sum(-1).clamp(min=eps)
    else:
        # the norm of a zero difference is taken of a stand-in: its first and second derivatives at
        # 0 are 0/0 (NaN) otherwise
        nonzero = (diff != 0).any(-1, keepdim=True)
        one = torch.ones((), dtype=diff.dtype, device=diff.device)
        d = torch.linalg.vector_norm(torch.where(nonzero, diff, one), dim=-1)
        d = torch.where(nonzero.squeeze(-1), d, 0 * one).clamp(min=math.sqrt(eps))
    eye = torch.eye(x.shape[-2], dtype=torch.bool, device=x.device)
    return d.masked_fill(eye, 0)


def _normalize_by_positive_mean(d, x):
    """d / the mean of d's positive entries per group, for the distances d of the points x. A group
    with no positive distance (all points equal, eps = 0) has no psi: 0 / 0, NaN values, and NaN
    gradients for all its points, as float64 has for a NaN loss elsewhere (the zero-length sides of
    _pdist pass no gradient, so the 0 / 0 alone would leave them 0)."""
    pos = d > 0
    count = pos.sum((-1, -2), keepdim=True)
    mean = (d * pos).sum((-1, -2), keepdim=True) / count.clamp(min=1)
    undefined = torch.where(count == 0, math.nan, 0.0).to(x.dtype)
    # 0 (NaN where undefined) that depends on every point: a gradient of 0 (NaN where undefined)
    mean = mean + (torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) * undefined).sum((-1, -2), keepdim=True)
    return d / mean


@_fp32_under_autocast
def pairwise_distances(x, *, squared=False, normalize=True, eps=1e-12):
    """(N, D) -> (N, N) or (B, N, D) -> (B, N, N) distances; with normalize, each group is divided
    by the mean of its positive entries (RKD's psi)."""
    v.check_points(x, "x")
    eps = v.check_nonnegative(eps, "eps")
    xc = x.to(v.compute_dtype(x))
    d = _pdist(xc, squared, eps)
    if normalize:
        d = _normalize_by_positive_mean(d, xc)
    return d.to(v.result_dtype(x))


@_fp32_under_autocast
def rkd_distance_loss(student, teacher, *, delta=1.0, squared=False, eps=1e-12):
    """Huber_delta between the psi-normalised distance matrices, averaged over N^2 entries and B."""
    v.check_relation_pair(student, teacher)
    delta = v.check_positive(delta, "delta")
    eps = v.check_nonnegative(eps, "eps")
    acc = v.compute_dtype(student, teacher)
    s, t = student.to(acc), teacher.to(acc)
    ds = _normalize_by_positive_mean(_pdist(s, squared, eps), s)
    dt = _normalize_by_positive_mean(_pdist(t, squared, eps), t)
    loss = F.huber_loss(ds, dt, reduction="none", delta=delta).mean((-1, -2))
    return loss.mean().to(v.result_dtype(student, teacher))


def _angles(x, eps):
    """cos of the angle at vertex i of every triplet: (..., N, N, N), as torchdistill's RKDAngle."""
    diff = x.unsqueeze(-3) - x.unsqueeze(-2)  # [..., i, j] = x_j - x_i
    # A zero-length side (i = j, or duplicate points) has cosine 0 as in torchdistill, but no
    # gradient: F.normalize alone would send 1/eps-sized gradients through exact duplicates, and
    # NaN (0/0) ones when eps = 0. So such a side is not normalised at all: a stand-in is, then zeroed.
    nonzero = (diff != 0).any(-1, keepdim=True)
    unit = F.normalize(torch.where(nonzero, diff, torch.ones((), dtype=diff.dtype, device=diff.device)),
                       p=2, dim=-1, eps=eps)
    unit = torch.where(nonzero, unit, torch.zeros((), dtype=unit.dtype, device=unit.device))
    return unit @ unit.transpose(-1, -2)


@_fp32_under_autocast
def rkd_angle_loss(student, teacher, *, delta=1.0, eps=1e-12):
    """Huber_delta between the triplet-angle cosines, averaged over N^3 entries and B."""
    v.check_relation_pair(student, teacher)
    delta = v.check_positive(delta, "delta")
    eps = v.check_nonnegative(eps, "eps")
    acc = v.compute_dtype(student, teacher)
    cs, ct = _angles(student.to(acc), eps), _angles(teacher.to(acc), eps)
    loss = F.huber_loss(cs, ct, reduction="none", delta=delta).mean((-1, -2, -3))
    return loss.mean().to(v.result_dtype(student, teacher))


def rkd_loss(student, teacher, *, distance_weight=25.0, angle_weight=50.0, delta=1.0, squared=False, eps=1e-12):
    """distance_weight * rkd_distance_loss + angle_weight * rkd_angle_loss (RKD-DA, Park et al.).
    A term of weight 0 is left out (not computed, so its NaN cannot reach the loss), as
    torchdistill's RKDLoss leaves out a term whose factor is 0."""
    v.check_relation_pair(student, teacher)
    dw = v.check_nonnegative(distance_weight, "distance_weight")
    aw = v.check_nonnegative(angle_weight, "angle_weight")
    delta = v.check_positive(delta, "delta")
    eps = v.check_nonnegative(eps, "eps")
    terms = []
    if dw != 0:
        terms.append(dw * rkd_distance_loss(student, teacher, delta=delta, squared=squared, eps=eps))
    if aw != 0:
        terms.append(aw * rkd_angle_loss(student, teacher, delta=delta, eps=eps))
    if not terms:  # exactly 0, with zero gradients (sums of empty slices: no NaN can enter)
        return (student.flatten()[:0].sum() + teacher.flatten()[:0].sum()).to(v.result_dtype(student, teacher))
    return sum(terms[1:], terms[0])


# ---------------------------------------------------------------- fused linear head (materialised)

def fused_linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                              teacher_bias=None, divergence="kl", beta=0.5, alpha=0.1, temperature=1.0, labels=None,
                              ignore_index=-100, hard_weight=0.0, soft_weight=1.0, reduction="mean",
                              student_softcap=None, teacher_softcap=None, chunk_size=None):
    """kdfast.fused_linear_distill_loss with the (tokens x V) logits materialised: logits h W^T + b
    in at least float32, softcapped c tanh(z / c) when asked, soft_weight * divergence at the
    temperature plus hard_weight * cross-entropy of the un-tempered student logits; tokens whose
    label is ignore_index count nowhere. chunk_size is accepted and ignored."""
    from kdfast import _fused_linear_args
    o = _fused_linear_args.check(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                                 teacher_bias, divergence, beta, alpha, temperature, labels, ignore_index, hard_weight,
                                 soft_weight, reduction, student_softcap, teacher_softcap, chunk_size)
    acc = v.compute_dtype(student_hidden, teacher_hidden)
    lead = student_hidden.shape[:-1]

    def logits(h, w, b, cap):
        z = h.reshape(-1, h.shape[-1]).to(acc) @ w.to(acc).t()
        if b is not None:
            z = z + b.to(acc)
        return z if cap is None else cap * torch.tanh(z / cap)

    zs = logits(student_hidden, student_weight, student_bias, o.student_softcap)
    zt = logits(teacher_hidden, teacher_weight, teacher_bias, o.teacher_softcap)
    mask = None if labels is None else (labels != ignore_index).reshape(-1)
    rows = o.soft_weight * divergence_rows(zs, zt, o.temperature, DIVERGENCES[o.divergence], o.mix, mask)
    if o.hard_weight != 0:
        ce = F.cross_entropy(zs, labels.reshape(-1).long(), ignore_index=ignore_index, reduction="none")
        rows = rows + o.hard_weight * ce
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    out = reduce_rows(rows, mask, "sum" if reduction == "sum" else "mean", 0) if reduction != "none" else rows.reshape(lead)
    return out.to(v.result_dtype(student_hidden, teacher_hidden))
