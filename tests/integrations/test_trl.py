"""kdfast.integrations.trl.generalized_jsd_loss against TRL's own GKDTrainer.generalized_jsd_loss,
imported from the trl package (`make test` installs the pinned trl: TEST_DEPS in the Makefile):
values and student and teacher gradients across beta (endpoints included), every reduction, labels
with -100 (rows and whole batches ignored), num_items_in_batch, temperatures, 2-D and 3-D logits,
and a bfloat16 student against a float32 teacher, where TRL's own result can fall below 0.

Without trl the module is skipped, unless KDFAST_REQUIRE_TRL=1 (as `make test` and CI set), where
a missing trl is a failure rather than a silent skip.
"""
import os

import pytest
import torch

import kdfast
from kdfast import reference as ref
from kdfast.integrations.trl import generalized_jsd_loss

from conftest import GRAD_TOL, FusedOpCalls, relerr

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl warns on every import of trl.experimental
try:
    from trl.experimental.gkd import GKDTrainer
except ImportError as e:  # trl, or one of its dependencies (transformers, accelerate, datasets)
    if os.environ.get("KDFAST_REQUIRE_TRL") == "1":
        raise
    pytest.skip(f"trl cannot be imported ({e}); `make test` installs the pinned version",
                allow_module_level=True)

trl_loss = GKDTrainer.generalized_jsd_loss
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
REDUCTIONS = ("batchmean", "sum", "mean", "none")
IGNORE = -100


def logits(*shape, dtype=torch.float64, scale=2.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def make_labels(kind, lead, V):
    """None, "some" (-100 at scattered positions and on every position of batch row 1) or "all"."""
    if kind is None:
        return None
    labels = torch.randint(0, V, lead)
    if kind == "all":
        return torch.full_like(labels, IGNORE)
    labels[torch.rand(lead) < 0.3] = IGNORE
    labels[1] = IGNORE
    return labels


def run(fn, s, t, upstream_seed, **kw):
    """fn's result and the gradients of sum(result * upstream), upstream random (of the result's shape)."""
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    out = fn(s, t, **kw)
    g = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.rand(out.shape, generator=g, dtype=torch.float64).to(out.dtype) + 0.5
    (out * upstream).sum().backward()
    return out.detach(), s.grad, t.grad


def assert_same(ours, theirs, rtol):
    (o, gso, gto), (r, gsr, gtr) = ours, theirs
    assert o.shape == r.shape
    assert torch.allclose(o.double(), r.double(), rtol=rtol, atol=rtol * 1e-3, equal_nan=True), (o, r)
    for a, b, what in ((gso, gsr, "student"), (gto, gtr, "teacher")):
        assert torch.allclose(a.double(), b.double(), rtol=rtol, atol=rtol * 1e-3), \
            f"{what} gradient: relerr {relerr(a, b):.3g}"


# ----------------------------------------------------------------------------- equal to TRL's function

@pytest.mark.parametrize("num_items", [None, 7, "tensor"])
@pytest.mark.parametrize("labels_kind", [None, "some", "all"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", BETAS)
def test_equals_trl_float64(backend, beta, reduction, labels_kind, num_items):
    """(B, S, V) float64 logits at T = 2: ours equals TRL's to float64 rounding, values and both
    gradients (under an uneven upstream gradient for reduction="none")."""
    B, S, V = 3, 5, 37
    s, t = logits(B, S, V), logits(B, S, V)
    kw = {"labels": make_labels(labels_kind, (B, S), V), "beta": beta, "temperature": 2.0,
          "reduction": reduction,
          "num_items_in_batch": torch.tensor(11) if num_items == "tensor" else num_items}
    assert_same(run(generalized_jsd_loss, s, t, 1, **kw), run(trl_loss, s, t, 1, **kw), rtol=1e-9)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", (0.0, 0.5, 1.0))
def test_equals_trl_2d_float32(backend, beta, reduction):
    """(N, V) float32 logits (batchmean divides by N), T = 1 and 0.7, V past a few SIMD blocks:
    equal to TRL's float32 evaluation within its rounding."""
    N, V = 6, 5000
    s, t = logits(N, V, dtype=torch.float32), logits(N, V, dtype=torch.float32)
    labels = make_labels("some", (N,), V)
    for temperature in (1.0, 0.7):
        for lab in (None, labels):
            kw = {"labels": lab, "beta": beta, "temperature": temperature, "reduction": reduction}
            assert_same(run(generalized_jsd_loss, s, t, 2, **kw), run(trl_loss, s, t, 2, **kw), rtol=2e-4)


@pytest.mark.parametrize("num_items", [None, 5])
@pytest.mark.parametrize("reduction", ("batchmean", "sum", "mean"))
def test_scalar_reductions_are_one_fused_call(native_backend, reduction, num_items):
    """The scalar reductions run the fused op once (loss and gradients in one pass) and no
    (rows x V) log_softmax of the formula it replaces."""
    s = logits(2, 6, 300, dtype=torch.float32).requires_grad_(True)
    t = logits(2, 6, 300, dtype=torch.float32)
    labels = make_labels("some", (2, 6), 300)
    with FusedOpCalls() as calls:
        generalized_jsd_loss(s, t, labels, beta=0.3, reduction=reduction, num_items_in_batch=num_items).backward()
    assert len(calls.flags) == 1
    assert not [op for op in calls.ops if op.startswith("aten.") and ("softmax" in op or "logsumexp" in op)]


def test_all_ignored_mean_is_nan_with_zero_gradients(backend):
    """reduction="mean" with every label -100: TRL's mean over no element is NaN, its gradients 0."""
    s, t = logits(2, 3, 9), logits(2, 3, 9)
    labels = torch.full((2, 3), IGNORE)
    out, gs, gt = run(generalized_jsd_loss, s, t, 3, labels=labels, reduction="mean")
    assert torch.isnan(out)
    assert not gs.any() and not gt.any()
    for reduction in ("batchmean", "sum"):
        assert generalized_jsd_loss(s, t, labels, reduction=reduction).item() == 0.0


def test_bf16_student_fp32_teacher_never_negative(backend):
    """ms-swift #10156: a bfloat16 student against a float32 teacher gave a negative JSD, because the
    log-probabilities were computed in bfloat16. Here the teacher holds the student's own values
    (JSD exactly 0 per row) or values a rounding away from them: TRL's formula goes below 0 on these
    inputs (checked, so the case is a real trap), ours is the float64 answer for those values, and
    never below 0 beyond float32 rounding."""
    torch.manual_seed(3)
    V = 4000
    teacher = logits(16, V, dtype=torch.float32, scale=3.0)
    student = teacher.to(torch.bfloat16)
    rows = student.shape[0]
    for t in (student.float(), teacher):
        for beta in BETAS:
            ours = generalized_jsd_loss(student, t, beta=beta, reduction="sum")
            exact = ref.divergence_rows(student.double(), t.double(), 1.0, "jsd", beta).sum().item()
            assert ours.dtype == torch.float32
            assert ours.item() >= -1e-6 * rows
            assert abs(ours.item() - exact) <= 1e-5 * exact + 1e-6 * rows
            ours_rows = generalized_jsd_loss(student, t, beta=beta, reduction="none").sum(-1)
            assert ours_rows.min().item() >= -1e-6
            if t is not teacher:  # identical distributions: TRL's rows go negative
                assert trl_loss(student, t, beta=beta, reduction="none").sum(-1).min().item() < -1e-4


@pytest.mark.parametrize("beta", (0.0, 0.5, 1.0))
def test_bf16_student_fp32_teacher_gradients(backend, beta):
    """The same mixed-dtype call under the default reduction: the student's gradient comes back in
    bfloat16 and equals the float64 gradient to bfloat16 rounding; the teacher's likewise in float32;
    TRL's agrees with both within bfloat16's error."""
    s = logits(2, 8, 3000, dtype=torch.bfloat16)
    t = logits(2, 8, 3000, dtype=torch.float32)
    labels = make_labels("some", (2, 8), 3000)
    kw = {"labels": labels, "beta": beta, "temperature": 1.5}
    out, gs, gt = run(generalized_jsd_loss, s, t, 4, **kw)
    r_out, r_gs, r_gt = run(generalized_jsd_loss, s.double(), t.double(), 4, **kw)
    assert gs.dtype == torch.bfloat16 and gt.dtype == torch.float32
    assert relerr(out, r_out) < 1e-5
    assert relerr(gs, r_gs.to(torch.bfloat16)) < GRAD_TOL[torch.bfloat16]
    assert relerr(gt, r_gt) < 1e-5
    _, trl_gs, trl_gt = run(trl_loss, s, t, 4, **kw)
    assert relerr(trl_gs, r_gs) < 5e-2 and relerr(trl_gt, r_gt) < 5e-2


def test_gkd_trainer_subclass_uses_the_drop_in(backend):
    """The README's swap: a GKDTrainer subclass whose generalized_jsd_loss is ours. TRL's own
    compute_loss (causal shift, labels, beta from the trainer, num_items_in_batch) then runs kdfast's
    function and gives TRL's loss and gradients."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return generalized_jsd_loss(*args, **kwargs)

    class FastGKDTrainer(GKDTrainer):
        generalized_jsd_loss = staticmethod(counted)

    class Logits(torch.nn.Module):
        def __init__(self, table):
            super().__init__()
            self.table = torch.nn.Parameter(table)

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": self.table[input_ids]})()

    V = 50
    input_ids = torch.randint(0, V, (2, 7))
    labels = input_ids.clone()
    labels[:, :3] = IGNORE  # the prompt
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    student_table, teacher_table = logits(V, V), logits(V, V)
    results = []
    for cls in (GKDTrainer, FastGKDTrainer):
        trainer = cls.__new__(cls)  # compute_loss reads only these attributes
        trainer.teacher_model, trainer.beta = Logits(teacher_table), 0.3
        student = Logits(student_table)
        loss = trainer.compute_loss(student, inputs, num_items_in_batch=torch.tensor(9))
        loss.backward()
        results.append((loss.detach(), student.table.grad))
    assert len(calls) == 1 and calls[0]["beta"] == 0.3
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-10)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-9, atol=1e-15)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,exc,match", [
    ({"beta": 1.5}, ValueError, "beta"),
    ({"beta": -0.1}, ValueError, "beta"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"reduction": "batch_mean"}, ValueError, "reduction"),
    ({"reduction": "none", "beta": 2.0}, ValueError, "beta"),
    ({"labels": torch.zeros(3, 4, dtype=torch.long)}, ValueError, "labels"),
    ({"labels": torch.zeros(2, 3)}, TypeError, "labels"),
    ({"labels": [0, 1]}, TypeError, "labels"),
    ({"num_items_in_batch": 0}, ValueError, "num_items_in_batch"),
    ({"num_items_in_batch": "7"}, TypeError, "num_items_in_batch"),
])
def test_bad_arguments_name_themselves(kwargs, exc, match):
    s, t = logits(2, 3, 5), logits(2, 3, 5)
    before = (s.clone(), t.clone())
    with pytest.raises(exc, match=match):
        generalized_jsd_loss(s, t, **kwargs)
    assert torch.equal(s, before[0]) and torch.equal(t, before[1])
