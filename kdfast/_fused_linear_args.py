"""Argument checks of fused_linear_distill_loss, shared by the chunked path (kdfast/fused_linear.py)
and the materialised reference (kdfast/reference.py). Each error names the argument."""
from dataclasses import dataclass
from typing import Optional

import torch

from kdfast import _validation as v
from kdfast.reference import DIVERGENCES  # the softmax_kl op's numbering

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class Options:
    divergence: int          # index into DIVERGENCES (the softmax_kl op's argument)
    mix: float               # beta for jsd, alpha for the skew forms, else 0
    temperature: float
    ignore_index: int
    hard_weight: float
    soft_weight: float
    reduction: str
    student_softcap: Optional[float]
    teacher_softcap: Optional[float]
    chunk_size: Optional[int]


def _check_softcap(value, name):
    return None if value is None else v.check_positive(value, name)


def _check_same_dtype_and_device(x, x_name, like, like_name):
    if x.dtype != like.dtype:
        raise TypeError(f"{x_name} is {x.dtype} but {like_name} is {like.dtype}; they must have one dtype")
    if x.device != like.device:
        raise ValueError(f"{x_name} is on {x.device} but {like_name} is on {like.device}")


def _check_side(hidden, weight, bias, side):
    h, w, b = f"{side}_hidden", f"{side}_weight", f"{side}_bias"
    v.check_tensor(hidden, h)
    v.check_tensor(weight, w)
    if hidden.dim() < 1:
        raise ValueError(f"{h} must have at least one dimension (the hidden width), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{w} must be 2-D (vocab, hidden) like nn.Linear.weight, got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{w} has hidden width {weight.shape[1]} (dim 1) but {h} has width "
                         f"{hidden.shape[-1]} (last dim); they must match")
    _check_same_dtype_and_device(weight, w, hidden, h)
    if bias is not None:
        v.check_tensor(bias, b)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{b} must have shape ({weight.shape[0]},) (the vocabulary of {w}), "
                             f"got {tuple(bias.shape)}")
        _check_same_dtype_and_device(bias, b, weight, w)


def check(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, divergence,
          beta, alpha, temperature, labels, ignore_index, hard_weight, soft_weight, reduction, student_softcap,
          teacher_softcap, chunk_size, vocab=None):
    """Validated Options; raises TypeError / ValueError naming the argument. vocab: the full
    vocabulary the labels index (None: the weights'; kdfast.distributed passes its group's, the
    weights being slices of it)."""
    _check_side(student_hidden, student_weight, student_bias, "student")
    _check_side(teacher_hidden, teacher_weight, teacher_bias, "teacher")
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but student_hidden is on "
                         f"{student_hidden.device}; move both to one device")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student_weight has vocabulary {student_weight.shape[0]} (dim 0) but teacher_weight has "
                         f"{teacher_weight.shape[0]}; they must match")
    vocab = student_weight.shape[0] if vocab is None else vocab
    if vocab == 0:
        raise ValueError("student_weight has an empty vocabulary (dim 0 is 0)")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
                         f"{tuple(teacher_hidden.shape)} must have the same tokens (every dim but the last)")
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(map(repr, DIVERGENCES))}, got {divergence!r}")
    beta = v.check_unit_interval(beta, "beta")
    alpha = v.check_unit_interval(alpha, "alpha")
    mix = beta if divergence == "jsd" else alpha if divergence.startswith("skew") else 0.0
    temperature = v.check_positive(temperature, "temperature")
    hard_weight = v.check_nonnegative(hard_weight, "hard_weight")
    soft_weight = v.check_nonnegative(soft_weight, "soft_weight")
    v.check_reduction(reduction, REDUCTIONS)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if hard_weight != 0 and labels is None:
        raise ValueError(f"hard_weight={hard_weight} needs labels (the hard cross-entropy's targets); pass labels "
                         "or set hard_weight=0")
    if labels is not None:
        _check_labels(labels, student_hidden, vocab, ignore_index)
    return Options(DIVERGENCES.index(divergence), mix, temperature, ignore_index, hard_weight, soft_weight,
                   reduction, _check_softcap(student_softcap, "student_softcap"),
                   _check_softcap(teacher_softcap, "teacher_softcap"), chunk_size)


def _check_labels(labels, hidden, V, ignore_index):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an integer torch.Tensor or None, got {type(labels).__name__}")
    v.check_strided(labels, "labels")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (student_hidden without its last dim), "
                         f"got {tuple(labels.shape)}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but student_hidden is on {hidden.device}")
    bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(f"labels must be in [0, {V}) (the vocabulary) or ignore_index={ignore_index}, got {first}")
