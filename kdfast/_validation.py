"""Argument checks shared by the native and reference paths. Each error names the argument."""
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
KL_REDUCTIONS = ("none", "sum", "mean", "batchmean")
REDUCTIONS = ("none", "sum", "mean")


def check_strided(x, name):
    # Sparse and nested tensors would otherwise fail deep inside with errors naming no argument.
    if x.is_nested or x.layout != torch.strided:
        kind = "a nested tensor" if x.is_nested else f"layout {x.layout}"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {kind}; "
                        "convert it first, e.g. .to_dense() or .to_padded_tensor(0.0)")


def check_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_strided(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    return x


def check_pair(student, teacher, sname="student_logits", tname="teacher_logits", same_shape=True):
    check_tensor(student, sname)
    check_tensor(teacher, tname)
    if student.device != teacher.device:
        raise ValueError(f"{sname} is on {student.device} but {tname} is on {teacher.device}; "
                         "move both to one device")
    if same_shape and student.shape != teacher.shape:
        raise ValueError(f"{sname} has shape {tuple(student.shape)} but {tname} has shape "
                         f"{tuple(teacher.shape)}; they must match")


def check_positive(value, name, *, allow_tensor=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or value <= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_nonnegative(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or value < 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_unit_interval(value, name):
    """A float in [0, 1] (beta, alpha): endpoints included, never clamped."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def check_reduction(reduction, allowed):
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, allowed))}, got {reduction!r}")
    return reduction


def check_dim(dim, x, name):
    """A valid dim of x, made non-negative."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for {name} of shape {tuple(x.shape)}")
    return dim % x.dim()


def check_logits(student, teacher):
    check_pair(student, teacher)
    if student.dim() == 0:
        raise ValueError("student_logits must have at least one dimension (the vocabulary)")
    if student.shape[-1] == 0:
        raise ValueError("student_logits has an empty vocabulary (last dim is 0)")


def check_mask(mask, logits):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    check_strided(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
    return check_per_row(mask, logits, "mask")


def check_per_row(x, logits, name):
    """x (a mask, labels) holds one entry per row of the logits, on their device."""
    if x.shape != logits.shape[:-1]:
        raise ValueError(f"{name} must have shape {tuple(logits.shape[:-1])} (the logits without their "
                         f"last dim), got {tuple(x.shape)}")
    if x.device != logits.device:
        raise ValueError(f"{name} is on {x.device} but the logits are on {logits.device}")
    return x


def check_points(x, name):
    check_tensor(x, name)
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be (N, D) or (B, N, D), got shape {tuple(x.shape)}; "
                         "flatten feature maps first, e.g. x.flatten(1)")
    if x.shape[-2] < 2:
        raise ValueError(f"{name} needs at least 2 points (dim -2), got {x.shape[-2]}")
    if x.shape[-1] < 1:
        raise ValueError(f"{name} has an empty feature dim (dim -1)")


def check_relation_pair(student, teacher):
    check_points(student, "student")
    check_points(teacher, "teacher")
    if student.device != teacher.device:
        raise ValueError(f"student is on {student.device} but teacher is on {teacher.device}")
    if student.dim() == 3 and student.shape[0] == 0:
        raise ValueError("student has no groups (dim 0 of (B, N, D) is 0)")
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must agree "
                         "in every dim but the feature width (dim -1)")


def result_dtype(*tensors):
    """Losses come back in float32 for half-precision inputs, else in the input dtype."""
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


def compute_dtype(*tensors):
    """The dtype the arithmetic runs in (the kernels' accumulation dtype, their row weights and
    pairwise distances): float64 for float64 inputs, else float32."""
    return torch.float64 if result_dtype(*tensors) == torch.float64 else torch.float32


SPARSE_TAILS = ("renormalize", "bucket")
INDEX_DTYPES = (torch.int64, torch.int32)


def check_sparse(student, logprobs, indices, tail, mask):
    """The arguments of sparse_kl_div (the ids' values are checked where they are read: by the
    kernel, or by the reference's check_sparse_ids)."""
    check_tensor(student, "student_logits")
    check_tensor(logprobs, "teacher_topk_logprobs")
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"teacher_topk_indices must be a torch.Tensor, got {type(indices).__name__}")
    check_strided(indices, "teacher_topk_indices")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"teacher_topk_indices must be int64 or int32 (vocabulary ids), got {indices.dtype}")
    if not isinstance(tail, str) or tail not in SPARSE_TAILS:
        raise ValueError(f"tail must be one of {', '.join(map(repr, SPARSE_TAILS))}, got {tail!r}")
    if student.dim() == 0 or student.shape[-1] == 0:
        raise ValueError(f"student_logits must have a non-empty vocabulary (last dim), got shape {tuple(student.shape)}")
    for x, name in ((logprobs, "teacher_topk_logprobs"), (indices, "teacher_topk_indices")):
        if x.device != student.device:
            raise ValueError(f"{name} is on {x.device} but student_logits is on {student.device}")
        if x.shape[:-1] != student.shape[:-1] or x.dim() != student.dim():
            raise ValueError(f"{name} must have shape {tuple(student.shape[:-1])} + (K,) (the student's rows), got "
                             f"{tuple(x.shape)}")
    if indices.shape != logprobs.shape:
        raise ValueError(f"teacher_topk_indices has shape {tuple(indices.shape)} but teacher_topk_logprobs has "
                         f"shape {tuple(logprobs.shape)}; they must match")
    K, V = logprobs.shape[-1], student.shape[-1]
    if K == 0:
        raise ValueError("teacher_topk_logprobs has no entries (K = 0)")
    if K > V:
        raise ValueError(f"teacher_topk_indices lists K = {K} ids per row, more than the vocabulary of {V}")
    return check_mask(mask, student)


def check_sparse_ids(indices, V, mask):
    """Every id of a counted row in [0, V) and distinct within its row (the kernels' check, in PyTorch)."""
    idx = indices if mask is None else indices[mask]
    if idx.numel() == 0:
        return
    bad = (idx < 0) | (idx >= V)
    if bool(bad.any()):
        raise ValueError(f"teacher_topk_indices holds an id out of range for a vocabulary of {V}: "
                         f"{int(idx[bad][0])} (ids must be in [0, {V}))")
    srt = idx.sort(-1).values
    if bool((srt[..., 1:] == srt[..., :-1]).any()):
        raise ValueError("teacher_topk_indices repeats an id within a row (the top-k ids of a row must be distinct)")
