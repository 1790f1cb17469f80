"""nn.Module wrappers of the kdfast losses, for use in place of hand-written loss modules."""
import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from kdfast import functional as F

__all__ = ["KDLoss", "SoftmaxKLDivLoss", "GeneralizedJSDLoss", "ReverseKLDivLoss", "SkewKLDivLoss", "TVDistanceLoss", "SparseKLDivLoss", "LogitMSELoss", "FeatureL2Loss", "CosineLoss",
           "RKDDistanceLoss", "RKDAngleLoss", "RKDLoss", "FusedLinearDistillLoss"]


class SoftmaxKLDivLoss(nn.Module):
    """KL(softmax(teacher/T) || softmax(student/T)); see kdfast.softmax_kl_div."""

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean"):
        super().__init__()
        self.temperature, self.reduction = temperature, reduction

    def forward(self, student_logits, teacher_logits, mask=None):
        return F.softmax_kl_div(student_logits, teacher_logits, temperature=self.temperature,
                                reduction=self.reduction, mask=mask)

    def extra_repr(self):
        return f"temperature={self.temperature}, reduction={self.reduction!r}"


class KDLoss(SoftmaxKLDivLoss):
    """Hinton's KD loss, T^2 * softmax-KL; see kdfast.kd_loss."""

    def __init__(self, temperature: float = 4.0, reduction: str = "batchmean"):
        super().__init__(temperature, reduction)

    def forward(self, student_logits, teacher_logits, mask=None):
        return F.kd_loss(student_logits, teacher_logits, temperature=self.temperature,
                         reduction=self.reduction, mask=mask)


class GeneralizedJSDLoss(SoftmaxKLDivLoss):
    """Generalized JSD with TRL's beta (0: KL(P||Q), 1: KL(Q||P)); see kdfast.generalized_jsd."""

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean"):
        super().__init__(temperature, reduction)
        self.beta = beta

    def forward(self, student_logits, teacher_logits, mask=None):
        return F.generalized_jsd(student_logits, teacher_logits, beta=self.beta, temperature=self.temperature,
                                 reduction=self.reduction, mask=mask)

    def extra_repr(self):
        return f"beta={self.beta}, " + super().extra_repr()


class ReverseKLDivLoss(SoftmaxKLDivLoss):
    """KL(softmax(student/T) || softmax(teacher/T)); see kdfast.reverse_kl_div."""

    def forward(self, student_logits, teacher_logits, mask=None):
        return F.reverse_kl_div(student_logits, teacher_logits, temperature=self.temperature,
                                reduction=self.reduction, mask=mask)


class SkewKLDivLoss(SoftmaxKLDivLoss):
    """DistiLLM's skew KL (reverse=True: skew reverse KL); see kdfast.skew_kl_div."""

    def __init__(self, alpha: float = 0.1, reverse: bool = False, temperature: float = 1.0,
                 reduction: str = "batchmean"):
        super().__init__(temperature, reduction)
        self.alpha, self.reverse = alpha, reverse

    def forward(self, student_logits, teacher_logits, mask=None):
        return F.skew_kl_div(student_logits, teacher_logits, alpha=self.alpha, reverse=self.reverse,
                             temperature=self.temperature, reduction=self.reduction, mask=mask)

    def extra_repr(self):
        return f"alpha={self.alpha}, reverse={self.reverse}, " + super().extra_repr()


class TVDistanceLoss(SoftmaxKLDivLoss):
    """Total variation distance of the temperature softmaxes; see kdfast.tv_distance."""

    def forward(self, student_logits, teacher_logits, mask=None):
        return F.tv_distance(student_logits, teacher_logits, temperature=self.temperature,
                             reduction=self.reduction, mask=mask)


class SparseKLDivLoss(nn.Module):
    """KL from a top-k teacher (log-probabilities and ids) to the student; see kdfast.sparse_kl_div."""

    def __init__(self, temperature: float = 1.0, tail: str = "renormalize", reduction: str = "batchmean"):
        super().__init__()
        self.temperature, self.tail, self.reduction = temperature, tail, reduction

    def forward(self, student_logits, teacher_topk_logprobs, teacher_topk_indices, mask=None):
        return F.sparse_kl_div(student_logits, teacher_topk_logprobs, teacher_topk_indices,
                               temperature=self.temperature, tail=self.tail, reduction=self.reduction, mask=mask)

    def extra_repr(self):
        return f"temperature={self.temperature}, tail={self.tail!r}, reduction={self.reduction!r}"


class LogitMSELoss(nn.Module):
    """Squared difference of the logits; see kdfast.logit_mse."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, student_logits, teacher_logits):
        return F.logit_mse(student_logits, teacher_logits, reduction=self.reduction)

    def extra_repr(self):
        return f"reduction={self.reduction!r}"


def _as_list(x):
    if x is None:
        return None
    return [int(c) for c in x] if isinstance(x, Sequence) else [int(x)]


def _projections(student_channels, teacher_channels):
    """One learnable linear map (no bias) per layer whose student and teacher widths differ, an
    identity where they agree; None when neither width is given."""
    s, t = _as_list(student_channels), _as_list(teacher_channels)
    if (s is None) != (t is None):
        raise ValueError("give both student_channels and teacher_channels, or neither")
    if s is None:
        return None
    if len(s) != len(t):
        raise ValueError(f"student_channels has {len(s)} layers but teacher_channels has {len(t)}")
    return nn.ModuleList([nn.Linear(cs, ct, bias=False) if cs != ct else nn.Identity() for cs, ct in zip(s, t)])


def _project(projections, i, f, dim, keep_layout=False):
    """Layer i's student features mapped to the teacher's width along `dim`.

    keep_layout: return them in f's own (contiguous) layout, for a loss that pairs elements with
    the teacher's in memory order (feature_l2). Where `dim` is not the last dim (NCHW feature maps)
    the map is then a 1x1 convolution over f as it lies, instead of a Linear over a permuted view,
    whose input and output would each be copied to and from that layout (commit 06b6cd6 measured
    it)."""
    if projections is None:
        return f
    if i >= len(projections):
        raise ValueError(f"got more feature pairs than the {len(projections)} widths given")
    proj = projections[i]
    if isinstance(proj, nn.Identity):
        return f
    if keep_layout and _maps_in_place(proj, f, dim):
        d = dim % f.dim()
        lead, rest = math.prod(f.shape[:d]), math.prod(f.shape[d + 1:])
        out = torch.nn.functional.conv1d(f.reshape(lead, f.shape[d], rest), proj.weight.unsqueeze(-1), proj.bias)
        return out.reshape(*f.shape[:d], proj.out_features, *f.shape[d + 1:])
    return proj(f.movedim(dim, -1)).movedim(-1, dim)


def _maps_in_place(proj, f, dim):
    """Whether _project may apply proj as a 1x1 convolution over f as it lies: a plain nn.Linear (no
    hooks, no subclass forward to bypass), a channel dim in range and not last, a contiguous f with
    no empty dim (a channels-last tensor already lies as the Linear wants it)."""
    return (type(proj) is nn.Linear and not proj._forward_hooks and not proj._forward_pre_hooks
            and -f.dim() <= dim < f.dim() and dim % f.dim() != f.dim() - 1
            and f.numel() > 0 and f.is_contiguous() and f.shape[dim] == proj.in_features)


class FeatureL2Loss(nn.Module):
    """Squared L2 between feature maps, summed over layer pairs (FitNets hint loss).

    With student_channels and teacher_channels given (an int each, or one per layer) and different,
    a learnable linear projection (a 1x1 convolution on feature maps) maps the student's width to the
    teacher's along `channel_dim` before the distance. Its weights train with the student.
    """

    def __init__(self, student_channels: Optional[Union[int, Sequence[int]]] = None,
                 teacher_channels: Optional[Union[int, Sequence[int]]] = None,
                 reduction: str = "mean", channel_dim: int = -1):
        super().__init__()
        self.reduction, self.channel_dim = reduction, channel_dim
        self.projections = _projections(student_channels, teacher_channels)

    def _project(self, i, f):
        return _project(self.projections, i, f, self.channel_dim, keep_layout=True)

    def forward(self, student_feats, teacher_feats):
        if isinstance(student_feats, torch.Tensor):
            return F.feature_l2(self._project(0, student_feats), teacher_feats, reduction=self.reduction)
        projected = [self._project(i, f) for i, f in enumerate(student_feats)]
        return F.feature_l2(projected, teacher_feats, reduction=self.reduction)

    def extra_repr(self):
        return f"reduction={self.reduction!r}, channel_dim={self.channel_dim}"


class CosineLoss(nn.Module):
    """1 - cosine similarity along `dim`; see kdfast.cosine_loss.

    With student_channels and teacher_channels given and different (e.g. 384-wide student and
    768-wide teacher embeddings), a learnable linear projection maps the student's width to the
    teacher's along `dim` first. Its weights train with the student.
    """

    def __init__(self, dim: int = -1, reduction: str = "mean", eps: float = 1e-8,
                 student_channels: Optional[int] = None, teacher_channels: Optional[int] = None):
        super().__init__()
        self.dim, self.reduction, self.eps = dim, reduction, eps
        for name, c in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if c is not None and (isinstance(c, bool) or not isinstance(c, int)):
                raise TypeError(f"{name} must be an int or None, got {type(c).__name__}")
        self.projections = _projections(student_channels, teacher_channels)

    def forward(self, student_feats, teacher_feats):
        student_feats = _project(self.projections, 0, student_feats, self.dim)
        return F.cosine_loss(student_feats, teacher_feats, dim=self.dim, reduction=self.reduction,
                             eps=self.eps)

    def extra_repr(self):
        return f"dim={self.dim}, reduction={self.reduction!r}, eps={self.eps}"


class RKDDistanceLoss(nn.Module):
    """RKD distance term; see kdfast.rkd_distance_loss."""

    def __init__(self, delta: float = 1.0, squared: bool = False, eps: float = 1e-12):
        super().__init__()
        self.delta, self.squared, self.eps = delta, squared, eps

    def forward(self, student, teacher):
        return F.rkd_distance_loss(student, teacher, delta=self.delta, squared=self.squared, eps=self.eps)

    def extra_repr(self):
        return f"delta={self.delta}, squared={self.squared}, eps={self.eps}"


class RKDAngleLoss(nn.Module):
    """RKD angle term; see kdfast.rkd_angle_loss."""

    def __init__(self, delta: float = 1.0, eps: float = 1e-12):
        super().__init__()
        self.delta, self.eps = delta, eps

    def forward(self, student, teacher):
        return F.rkd_angle_loss(student, teacher, delta=self.delta, eps=self.eps)

    def extra_repr(self):
        return f"delta={self.delta}, eps={self.eps}"


class RKDLoss(nn.Module):
    """RKD-DA: distance_weight * distance term + angle_weight * angle term (weights 25 and 50 as
    published); see kdfast.rkd_loss."""

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, delta: float = 1.0,
                 squared: bool = False, eps: float = 1e-12):
        super().__init__()
        self.distance_weight, self.angle_weight, self.delta = distance_weight, angle_weight, delta
        self.squared, self.eps = squared, eps

    def forward(self, student, teacher):
        return F.rkd_loss(student, teacher, distance_weight=self.distance_weight,
                          angle_weight=self.angle_weight, delta=self.delta, squared=self.squared, eps=self.eps)

    def extra_repr(self):
        return (f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}, delta={self.delta}, "
                f"squared={self.squared}, eps={self.eps}")


class FusedLinearDistillLoss(nn.Module):
    """Distillation loss from hidden states and LM head weights, in chunks of tokens; see
    kdfast.fused_linear_distill_loss. forward(student_hidden, student_weight, teacher_hidden,
    teacher_weight, labels=None, student_bias=None, teacher_bias=None), as Liger's fused losses."""

    def __init__(self, divergence: str = "kl", beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0,
                 ignore_index: int = -100, hard_weight: float = 0.0, soft_weight: float = 1.0,
                 reduction: str = "mean", student_softcap: Optional[float] = None,
                 teacher_softcap: Optional[float] = None, chunk_size: Optional[int] = None):
        super().__init__()
        self.divergence, self.beta, self.alpha, self.temperature = divergence, beta, alpha, temperature
        self.ignore_index, self.hard_weight, self.soft_weight = ignore_index, hard_weight, soft_weight
        self.reduction, self.student_softcap, self.teacher_softcap = reduction, student_softcap, teacher_softcap
        self.chunk_size = chunk_size

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None):
        return F.fused_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, divergence=self.divergence, beta=self.beta, alpha=self.alpha,
            temperature=self.temperature, labels=labels, ignore_index=self.ignore_index,
            hard_weight=self.hard_weight, soft_weight=self.soft_weight, reduction=self.reduction,
            student_softcap=self.student_softcap, teacher_softcap=self.teacher_softcap, chunk_size=self.chunk_size)

    def extra_repr(self):
        return (f"divergence={self.divergence!r}, beta={self.beta}, alpha={self.alpha}, "
                f"temperature={self.temperature}, hard_weight={self.hard_weight}, soft_weight={self.soft_weight}, "
                f"reduction={self.reduction!r}")
