"""A drop-in for TRL's GKDTrainer.generalized_jsd_loss (huggingface/trl, checked against trl 1.16.0).

    from trl.experimental.gkd import GKDTrainer
    from kdfast.integrations.trl import generalized_jsd_loss

    class FastGKDTrainer(GKDTrainer):
        generalized_jsd_loss = staticmethod(generalized_jsd_loss)

Same signature, same beta convention (beta = 0: KL(P||Q), beta = 1: KL(Q||P), P the teacher's
softmax, Q the student's; between them beta KL(P||M) + (1 - beta) KL(Q||M), M = beta P + (1 - beta) Q)
and the same values for every reduction, labels (-100 ignored) and num_items_in_batch:

- num_items_in_batch given: the sum over the counted tokens divided by it (reduction is not used);
- "batchmean": that sum divided by the number of counted tokens (at least 1) with labels, by
  logits.shape[0] without (for (B, S, V) logits that is B, as in TRL);
- "sum": the sum; "mean": the mean over the counted tokens' vocabulary entries, i.e. the sum divided by
  tokens * V (NaN when no token counts, as torch's mean of nothing, with zero gradients);
- "none": TRL's per-entry terms, shape (..., V), or (counted tokens, V) with labels.

The scalar reductions run in one fused pass (kdfast.generalized_jsd with the labels as its mask);
no (tokens x V) temporary but the gradients. "none" returns a (tokens x V) tensor of per-entry terms,
which the fused kernels do not produce (they sum each row as they stream it): it is computed by
kdfast.reference's plain PyTorch, in at least float32, like the rest.

Differences from TRL, all on purpose: the arithmetic is at least float32, so a bfloat16 student
against a float32 teacher gets the exact divergence of those values, never below 0 (TRL's is
computed from bfloat16 log-probabilities, and can be negative); results come back in float32 for
half-precision inputs (kdfast's rule) where TRL's keep the inputs' promoted dtype; and bad arguments
(beta outside [0, 1], temperature <= 0, an unknown reduction, labels of the wrong shape) raise
ValueError or TypeError where TRL would return NaN or treat an unknown reduction as "none".
"""
import numbers

import torch

from kdfast import _validation as v
from kdfast import functional, reference

__all__ = ["generalized_jsd_loss", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # the label of tokens that count nowhere (TRL's, and transformers')
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _label_mask(labels, logits):
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must hold integer token ids, got {labels.dtype}")
    return v.check_per_row(labels, logits, "labels") != IGNORE_INDEX


def _check_num_items(num_items_in_batch):
    if num_items_in_batch is None or isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
        raise TypeError(f"num_items_in_batch must be a number, a tensor or None, "
                        f"got {type(num_items_in_batch).__name__}")
    if not num_items_in_batch > 0:
        raise ValueError(f"num_items_in_batch must be positive, got {num_items_in_batch}")
    return num_items_in_batch


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """TRL's GKDTrainer.generalized_jsd_loss on kdfast's fused kernels (see the module docstring).

    student_logits, teacher_logits: (..., V), usually (batch, seq, V). labels: integer tensor of the
    logits' shape without V, IGNORE_INDEX (-100) for tokens to ignore. beta in [0, 1], TRL's
    convention. temperature > 0, applied to both. No T^2 factor (as TRL).
    """
    v.check_logits(student_logits, teacher_logits)
    v.check_reduction(reduction, REDUCTIONS)
    mask = _label_mask(labels, student_logits)
    num_items_in_batch = _check_num_items(num_items_in_batch)
    kw = {"beta": beta, "temperature": temperature, "mask": mask}

    if num_items_in_batch is not None:
        total = functional.generalized_jsd(student_logits, teacher_logits, reduction="sum", **kw)
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return functional.generalized_jsd(student_logits, teacher_logits, reduction="sum", **kw)
    if reduction == "batchmean":
        # With labels TRL divides by the counted tokens (at least 1): kdfast's "mean" over the mask;
        # without, by logits.shape[0]: kdfast's "batchmean".
        return functional.generalized_jsd(student_logits, teacher_logits,
                                          reduction="batchmean" if mask is None else "mean", **kw)
    if reduction == "mean":
        # kdfast's "mean" is per counted token; TRL's is per entry. No token counted: NaN, torch's
        # mean of nothing (kdfast says 0), with zero gradients. A where() on mask.any() rather than
        # a branch: no host sync.
        out = functional.generalized_jsd(student_logits, teacher_logits, reduction="mean", **kw)
        out = out / student_logits.shape[-1]
        if mask is not None:
            return torch.where(mask.any(), out, torch.full_like(out, float("nan")))
        return out if student_logits.numel() > 0 else torch.full_like(out, float("nan"))
    return _per_entry_terms(student_logits, teacher_logits, mask, beta, temperature)


def _per_entry_terms(student_logits, teacher_logits, mask, beta, temperature):
    """reduction="none": TRL's (..., V) terms, those of the counted tokens with labels. A (tokens x V)
    result the fused kernels cannot give, so kdfast.reference computes it (in at least float32)."""
    beta = v.check_unit_interval(beta, "beta")
    temperature = v.check_positive(temperature, "temperature")
    if mask is not None:
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
    terms = reference.divergence_terms(student_logits, teacher_logits, temperature, "jsd", beta)
    return terms.to(v.result_dtype(student_logits, teacher_logits))
