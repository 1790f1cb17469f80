"""The fused temperature softmax-KL (kdfast.softmax_kl_div, kdfast.kd_loss) against its float64
reference: values and gradients across dtypes, shapes, reductions, masks, temperatures, extreme and
-inf logits, strides; autograd edge cases; determinism; F.kl_div equivalence; gradcheck, opcheck and
torch.compile."""
import math

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import reference as ref

from conftest import (DTYPE_IDS, DTYPES, HALF, FusedOpCalls, assert_kl_deterministic, check_kl, check_scale_rows,
                      compare_compiled, extreme_logit_rows, needs_native, relerr, run_in_threads, same_bits)

pytestmark = needs_native
NINF = float("-inf")
REDUCTIONS = ("none", "sum", "mean", "batchmean")


def logits(*shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def dtype_params(dtypes=DTYPES):
    return pytest.mark.parametrize("dtype", dtypes, ids=[DTYPE_IDS[d] for d in dtypes])


# ----------------------------------------------------------------------------- values and gradients

SHAPES = [
    (4, 1),          # V = 1: every KL is 0
    (3, 7),          # shorter than one SIMD vector
    (5, 33),         # one vector body plus a scalar tail
    (2, 64),         # exact multiple of the vector width
    (6, 1000),
    (3, 5000),       # several 2048-element blocks of the online softmax
    (2, 70001),      # few rows, V >= 65536: the split path
    (17, 70001),     # many rows, large V: the row path
    (0, 17),         # no rows
    (2, 3, 33),      # 3-D leading shape
    (3, 0, 9),       # 3-D with no rows but shape[0] > 0
]


@dtype_params()
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(dtype, shape):
    check_kl(logits(*shape, dtype=dtype), logits(*shape, dtype=dtype), temperature=2.0,
             reduction="batchmean", grad_teacher=True)


@pytest.mark.parametrize("kd", [False, True], ids=["softmax_kl_div", "kd_loss"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask_kind", ["none", "random", "all_false", "all_true"])
@pytest.mark.parametrize("lead", [(6,), (2, 5)], ids=["2d", "3d"])
def test_reductions_and_masks(kd, reduction, mask_kind, lead):
    V = 37
    s, t = logits(*lead, V), logits(*lead, V)
    mask = {"none": None, "random": torch.rand(lead) > 0.4, "all_false": torch.zeros(lead, dtype=torch.bool),
            "all_true": torch.ones(lead, dtype=torch.bool)}[mask_kind]
    if mask_kind == "random":
        mask.view(-1)[0], mask.view(-1)[1] = True, False  # both kinds present
    out, gs, gt = check_kl(s, t, kd=kd, temperature=1.7, reduction=reduction, mask=mask, grad_teacher=True)
    if mask is not None:
        rows_off = ~mask
        assert (gs[rows_off] == 0).all() and (gt[rows_off] == 0).all(), "masked rows must get no gradient"
        if reduction == "none":
            assert (out[rows_off] == 0).all()
    if mask_kind == "all_false":
        assert (out == 0).all()


def _kl_rows_float64(s, t, temperature):
    """KL(p_t || p_s) per row, written out in float64 from log_softmax (finite logits only)."""
    log_ps = F.log_softmax(s.double() / temperature, -1)
    log_pt = F.log_softmax(t.double() / temperature, -1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def test_reduction_semantics_by_hand():
    """batchmean divides by logits.shape[0], mean by the number of counted rows: each reduction
    against the float64 rows reduced by hand."""
    s, t = logits(2, 3, 11), logits(2, 3, 11)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    rows = _kl_rows_float64(s, t, 1.0)
    cases = [(dict(reduction="none"), rows), (dict(reduction="sum"), rows.sum()),
             (dict(reduction="batchmean"), rows.sum() / 2), (dict(reduction="mean"), rows.sum() / 6),
             (dict(reduction="mean", mask=mask), rows[mask].sum() / 4),
             (dict(reduction="batchmean", mask=mask), rows[mask].sum() / 2),
             (dict(reduction="none", mask=mask), torch.where(mask, rows, 0.0))]
    for kw, want in cases:
        got = kdfast.softmax_kl_div(s, t, **kw)
        assert got.shape == want.shape, kw
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0, msg=str(kw))


@pytest.mark.parametrize("temperature", [0.05, 0.3, 1.0, 4.0, 20.0, 100.0])
@dtype_params((torch.float32, torch.float64, torch.bfloat16))
def test_temperatures(temperature, dtype):
    check_kl(logits(8, 1000, dtype=dtype), logits(8, 1000, dtype=dtype), temperature=temperature,
             reduction="sum", grad_teacher=True)
    check_kl(logits(8, 1000, dtype=dtype), logits(8, 1000, dtype=dtype), kd=True, temperature=temperature,
             reduction="batchmean", grad_teacher=True)


@pytest.mark.parametrize("temperature", [0.05, 1.0, 100.0])
@dtype_params()
def test_huge_logits(temperature, dtype):
    """Logits of +-1e4 must not overflow: finite results equal to the float64 reference."""
    s = (torch.randn(6, 300) * 1e4).clamp(-1e4, 1e4)
    t = (torch.randn(6, 300) * 1e4).clamp(-1e4, 1e4)
    s[0], t[0] = 1e4, -1e4            # a constant row at each extreme
    s[1, ::2], t[1, 1::2] = 1e4, 1e4  # exactly +-1e4 in alternation
    s[1, 1::2], t[1, ::2] = -1e4, -1e4
    out, gs, gt = check_kl(s.to(dtype), t.to(dtype), temperature=temperature, reduction="none",
                           grad_teacher=True)
    assert torch.isfinite(out).all() and torch.isfinite(gs).all()
    if dtype != torch.float16 or temperature >= 1:
        # (at T = 0.05 the exact teacher gradient, ~1e4 / T^2, is beyond float16's range: inf is the
        # correctly rounded answer there, which check_kl has compared already)
        assert torch.isfinite(gt).all()
    assert (out > 1e3 / temperature).any()  # really far apart, not accidentally tiny


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("V", [300, 5000, 70001])  # one block; online-softmax blocks; the split path
@dtype_params((torch.float32, torch.bfloat16))
def test_logits_near_float_max(temperature, V, dtype):
    """Finite logits up to ~FLT_MAX, 6e38 apart: the kernels' sums must not overflow where the
    float64 answer is finite (values, both gradients), and give inf exactly where it is inf."""
    s, t = extreme_logit_rows(V, dtype)
    # (value_tol: row 4 sums 35000 equal terms of A in float lanes, whose rounding errors add up
    # one way, to ~2e-5 at V = 70001; any row of equal terms does that, whatever their size)
    out, gs, gt = check_kl(s, t, temperature=temperature, reduction="none", grad_teacher=True, value_tol=1e-4)
    assert (out[[1, 5]] > 1e36 / temperature).all()  # really that far apart
    assert torch.isfinite(out[[1, 2, 5]]).all()
    assert torch.isfinite(gs).all()  # p_s - p_t: bounded whatever the KL


@pytest.mark.parametrize("reduction", ["none", "batchmean", "sum"])
@pytest.mark.parametrize("V", [300, 70001])  # the row path; the split path
@dtype_params((torch.float32, torch.bfloat16))
def test_kd_row_kl_beyond_float_max(V, reduction, dtype):
    """At T = 0.24, logits ~3e38 apart give a row KL of ~1e39, beyond FLT_MAX, while T^2 KL (~7e37)
    and the gradients are floats: kd_loss must be finite and equal to float64, not inf from a row
    value rounded to float before the weighting."""
    g = torch.Generator().manual_seed(5)
    s = (torch.randn(3, V, generator=g, dtype=torch.float64) * 3e38).clamp(-3e38, 3e38).to(dtype)
    t = (torch.randn(3, V, generator=g, dtype=torch.float64) * 3e38).clamp(-3e38, 3e38).to(dtype)
    rows = ref.softmax_kl_div(s.double(), t.double(), temperature=0.24, reduction="none")
    assert (rows > torch.finfo(torch.float32).max).any()  # the case is real
    out, gs, gt = check_kl(s, t, kd=True, temperature=0.24, reduction=reduction, grad_teacher=True)
    assert torch.isfinite(out).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()


# ----------------------------------------------------------------------------- -inf logits

def _neg_inf_case(kind, V):
    s, t = logits(3, V), logits(3, V)
    if kind == "teacher":              # masked teacher vocabulary: those terms are 0
        t[:, 1::3] = NINF
    elif kind == "same":               # the same positions masked in both
        s[:, 2::5] = NINF
        t[:, 2::5] = NINF
    elif kind == "different":          # student -inf where p_t > 0: KL = +inf, as the reference says
        s[:, 1::3] = NINF
        t[:, 2::3] = NINF
    elif kind == "student_where_teacher_zero":
        t[:, 1::2] = NINF
        s[:, 3::4] = NINF              # a subset of the teacher's -inf positions: finite KL
    elif kind == "first_block":        # the whole first 2048-element block -inf in both
        s[:, :2048] = NINF
        t[:, :2048] = NINF
    elif kind == "teacher_first_block":
        t[:, :2048] = NINF
    elif kind == "only_last_finite":   # teacher mass only in the last few entries (vector tail)
        t[:, :-3] = NINF
    elif kind == "mixed_rows":         # one row each: fine, +inf, teacher-masked
        s[1, 0], t[1, 0] = NINF, 5.0
        t[2, V // 2:] = NINF
    return s, t


NEG_INF_KINDS = ["teacher", "same", "different", "student_where_teacher_zero", "first_block",
                 "teacher_first_block", "only_last_finite", "mixed_rows"]


NEG_INF_PARAMS = [
    pytest.param(kind, V, dtype, id=f"{DTYPE_IDS[dtype]}-{V}-{kind}")
    for dtype in (torch.float32, torch.float64, torch.bfloat16)
    for V in (37, 5000, 70001)  # scalar tail only; several online-softmax blocks; the split path
    for kind in NEG_INF_KINDS
    if not ("block" in kind and V < 4096)             # needs more than one 2048-element block
    and not (V == 70001 and dtype == torch.float64)   # fp32 and bf16 cover the split path
]


@pytest.mark.parametrize("kind,V,dtype", NEG_INF_PARAMS)
def test_neg_inf_logits(kind, V, dtype):
    s, t = _neg_inf_case(kind, V)
    out, gs, gt = check_kl(s.to(dtype), t.to(dtype), temperature=1.5, reduction="none", grad_teacher=True)
    expect_inf = {"different": [0, 1, 2], "mixed_rows": [1]}.get(kind, [])
    for r in range(3):
        if r in expect_inf:
            assert out[r] == math.inf
        else:
            assert torch.isfinite(out[r])
    assert torch.isfinite(gs).all(), "the student gradient is finite even where KL is +inf"


def test_neg_inf_masked_terms_are_zero():
    """Masking teacher entries with -inf equals dropping those vocabulary entries."""
    s, t = logits(4, 50), logits(4, 50)
    keep = torch.rand(50) > 0.3
    t_masked = t.clone()
    t_masked[:, ~keep] = NINF
    full = kdfast.softmax_kl_div(s, t_masked, reduction="none")
    # p_s renormalised over the kept entries changes KL by log(sum of kept p_s) per row
    log_ps = F.log_softmax(s.double(), -1)
    log_pt = F.log_softmax(t[:, keep].double(), -1)
    expected = (log_pt.exp() * (log_pt - log_ps[:, keep])).sum(-1)
    torch.testing.assert_close(full.double(), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- strides

def _misaligned(x, R, V):
    return x[1:1 + R * V].view(R, V)


LAYOUTS = {
    # name: (student leaf shape, teacher leaf shape, layout) for R = 6 rows of V = 37
    "transposed": ((37, 6), (37, 6), lambda s, t: (s.t(), t.t())),
    "row_step": ((12, 37), (12, 37), lambda s, t: (s[::2], t[1::2])),
    "col_step": ((6, 74), (6, 111), lambda s, t: (s[:, ::2], t[:, 1::3])),
    "misaligned": ((6 * 37 + 1,), (6 * 37 + 3,), lambda s, t: (_misaligned(s, 6, 37), t[3:].view(6, 37))),
    "expanded_teacher": ((6, 37), (1, 37), lambda s, t: (s, t.expand(6, 37))),
    "expanded_both": ((1, 37), (1, 37), lambda s, t: (s.expand(6, 37), t.expand(6, 37))),
    "permuted_3d": ((37, 2, 3), (2, 37, 3), lambda s, t: (s.permute(1, 2, 0), t.transpose(1, 2))),
    "narrow_rows": ((6, 50), (6, 40), lambda s, t: (s[:, 5:42], t[:, :37])),
    "v1_transposed": ((1, 6), (1, 6), lambda s, t: (s.t(), t.t())),  # V = 1 with a non-unit last stride
}


@pytest.mark.parametrize("name", list(LAYOUTS))
@dtype_params((torch.float32, torch.float64, torch.bfloat16, torch.float16))
def test_non_contiguous(name, dtype):
    s_shape, t_shape, layout = LAYOUTS[name]
    check_kl(logits(*s_shape, dtype=dtype), logits(*t_shape, dtype=dtype), layout=layout, temperature=1.3,
             reduction="sum", grad_teacher=True, upstream=0.7)


def test_misaligned_large_rows():
    """Odd storage offsets with rows long enough for the vector body (and the split path)."""
    for R, V in ((5, 1001), (2, 70001)):
        base_s, base_t = logits(R * V + 1), logits(R * V + 5)
        check_kl(base_s, base_t, layout=lambda s, t: (s[1:].view(R, V), t[5:].view(R, V)),
                 reduction="batchmean", grad_teacher=True)


# ----------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("ds,dt", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                   (torch.float32, torch.float64), (torch.float16, torch.bfloat16),
                                   (torch.float64, torch.bfloat16)],
                         ids=lambda d: DTYPE_IDS[d])
def test_mixed_dtypes(ds, dt):
    out, gs, gt = check_kl(logits(5, 300, dtype=ds), logits(5, 300, dtype=dt), temperature=2.0,
                           reduction="mean", grad_teacher=True)
    assert gs.dtype == ds and gt.dtype == dt


@dtype_params(HALF)
def test_half_loss_is_float32(dtype):
    out = kdfast.kd_loss(logits(4, 50, dtype=dtype), logits(4, 50, dtype=dtype))
    assert out.dtype == torch.float32


# ----------------------------------------------------------------------------- gradient paths

@dtype_params((torch.float32, torch.float64, torch.bfloat16))
def test_teacher_gradient_only(dtype):
    check_kl(logits(7, 130, dtype=dtype), logits(7, 130, dtype=dtype), grad_student=False, grad_teacher=True,
             temperature=3.0, reduction="batchmean")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("masked", [False, True])
def test_upstream_gradient_not_one(reduction, masked):
    """An upstream gradient other than the one the forward assumed: rows are rescaled in place."""
    lead = (4, 3)
    mask = (torch.rand(lead) > 0.3) if masked else None
    if reduction == "none":
        upstream = torch.randn(lead, dtype=torch.float64)
        upstream[0, 0] = 0.0  # a zero weight on a counted row
    else:
        upstream = 0.3
    check_kl(logits(*lead, 45), logits(*lead, 45), kd=True, temperature=2.5, reduction=reduction, mask=mask,
             grad_teacher=True, upstream=upstream)


def test_upstream_scaling_matches_reference_ops():
    """Rescaling, loss reuse and a second consumer of the student all match the reference."""
    def losses(fn, s, t, t2):
        a = fn.kd_loss(s, t, temperature=2.0, reduction="none")
        b = fn.softmax_kl_div(s, t2, temperature=0.5)
        return (a * torch.linspace(-1, 2, a.numel()).view_as(a).to(a.dtype)).sum() + 3 * b + b * b + (s ** 2).mean()

    S, T1, T2 = logits(6, 90), logits(6, 90), logits(6, 90)
    got, want = [], []
    for fn, dtype, sink in ((kdfast, torch.float32, got), (ref, torch.float64, want)):
        s = S.detach().clone().to(dtype).requires_grad_()
        t1 = T1.detach().clone().to(dtype).requires_grad_()
        t2 = T2.detach().clone().to(dtype).requires_grad_()
        losses(fn, s, t1, t2).backward()
        sink.extend([s.grad, t1.grad, t2.grad])
    for g, w in zip(got, want):
        assert relerr(g, w) < 1e-5


def _fp16_scaled_grads(scale):
    """fp16 logits, loss * scale (loss scaling as with AMP's GradScaler): kdfast's student gradient
    and the best float16 answer (the float64 gradient rounded once)."""
    s, t = logits(64, 32000, dtype=torch.float16, scale=1.0), logits(64, 32000, dtype=torch.float16, scale=1.0)
    s1 = s.clone().requires_grad_()
    (kdfast.softmax_kl_div(s1, t) * scale).backward()
    sd = s.double().requires_grad_()
    (ref.softmax_kl_div(sd, t.double()) * scale).backward()
    return s1.grad, sd.grad.to(torch.float16)


def test_fp16_loss_scaling_does_not_overflow():
    got, best = _fp16_scaled_grads(65536.0)  # GradScaler's default initial scale
    assert torch.isfinite(got).all(), f"{int((~torch.isfinite(got)).sum())} non-finite gradient entries"
    assert relerr(got, best) < 1e-3


def test_fp16_loss_scaling_keeps_precision():
    got, best = _fp16_scaled_grads(1024.0)
    assert relerr(got, best) < 1e-3  # the reference backend gets ~2e-5 here


def test_scale_rows_half_large_ratio():
    g = torch.full((2, 40), 1e-3, dtype=torch.float16)
    ratio = torch.tensor([65536.0, 3.0])
    expected = (g.float() * ratio.unsqueeze(1)).half()
    torch.ops.kdfast.scale_rows_(g, ratio)
    torch.testing.assert_close(g, expected, rtol=1e-3, atol=0)


def test_backward_twice_with_retain_graph():
    for kw in (dict(reduction="batchmean"), dict(reduction="none", mask=torch.tensor([True, False, True, True]))):
        s, t = logits(4, 70), logits(4, 70)
        s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
        out = kdfast.kd_loss(s1, t1, **kw)
        loss = (out * torch.arange(1.0, out.numel() + 1).view_as(out)).sum()
        loss.backward(retain_graph=True)
        g_once_s, g_once_t = s1.grad.clone(), t1.grad.clone()
        loss.backward(retain_graph=True)
        torch.testing.assert_close(s1.grad, 2 * g_once_s, rtol=1e-6, atol=0)
        torch.testing.assert_close(t1.grad, 2 * g_once_t, rtol=1e-6, atol=0)
        # and once more with a different upstream, through torch.autograd.grad
        (g3,) = torch.autograd.grad(out.sum() * 0.5, s1)
        s2 = s.clone().requires_grad_()
        (g_ref,) = torch.autograd.grad(kdfast.kd_loss(s2, t, **kw).sum() * 0.5, s2)
        assert relerr(g3, g_ref) < 1e-6


def test_backward_twice_without_retain_graph_raises():
    s = logits(3, 20).requires_grad_()
    loss = kdfast.softmax_kl_div(s, logits(3, 20))
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.parametrize("fn", ["kd_loss", "logit_mse", "cosine_loss"])
def test_create_graph_recomputes_through_reference(fn):
    """create_graph=True through a fused row loss: the first-order gradient carries a graph (through
    the plain-PyTorch row formulas), and second-order gradients match the reference backend's.
    (Native against reference only: the reference against itself could not fail.)"""
    def run(b):
        kdfast.set_backend(b)
        s = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
        t = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).requires_grad_()
        (gs,) = torch.autograd.grad(getattr(kdfast, fn)(s, t) * 3.0, s, create_graph=True)
        return [gs] + list(torch.autograd.grad((gs * gs).sum(), [s, t]))
    got, want = run("native"), run("reference")
    for a, b in zip(got, want):
        assert relerr(a.detach(), b.detach()) < 1e-10


def _step_compute_ops(step):
    """The compute ops one forward+backward dispatches. Views, metadata ops and allocations launch
    nothing and are not counted, nor is reading the CPU upstream factor (select, _local_scalar_dense)."""
    with FusedOpCalls() as calls:
        step()
    metadata = ("aten.view.", "aten.expand.", "aten.detach.", "aten.reshape.", "aten.promote_types.",
                "aten.select.", "aten._local_scalar_dense.", "aten.empty_like.")
    return sorted(op for op in calls.ops if not op.startswith(metadata))


def test_kd_step_launches():
    """A kd_loss step dispatches four compute ops of kdfast's own: the row weights, the fused op,
    weighting (float64 rows into the weights' dtype, one op) and sum. Backward hands the op's buffer over as it is: on the CPU, which reads the
    upstream factor 1, nothing besides autograd's root gradient (CUDA, which cannot read it without
    a sync, adds one scale_rows_ launch that skips rows of factor 1)."""
    s, t = logits(4, 50).requires_grad_(), logits(4, 50)
    kdfast.kd_loss(s, t).backward()  # first call: lazy initialisation outside the count
    s.grad = None
    ops = _step_compute_ops(lambda: kdfast.kd_loss(s, t).backward())
    assert ops == sorted(["aten.full.default", "kdfast.softmax_kl.default", "aten.mul.out", "aten.sum.default",
                          "aten.ones_like.default"]), ops
    assert s.grad is not None


@dtype_params((torch.float32, torch.bfloat16, torch.float64))
def test_weighted_loss_steps(dtype):
    """`ce + alpha * kd` over training steps. Once alpha repeats, the forward computes the gradient
    at it and backward makes no pass over the buffer; when alpha changes, is 0, or differs between
    rows, the buffer is rescaled (or recomputed first). Every step gives the bits of the same step
    with no history (so results never depend on earlier steps), and matches float64."""
    s0, t0 = logits(6, 70, dtype=dtype), logits(6, 70, dtype=dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    sd = s0.double().clone().requires_grad_()

    def step(alpha, reduction, fresh=False):
        if fresh:
            kdfast._grad_scale_prediction.PREDICTOR.clear()
        s = s0.clone().requires_grad_()
        out = kdfast.kd_loss(s, t0, temperature=2.0, reduction=reduction)
        up = alpha if reduction != "none" else torch.linspace(0, 2, 6) * alpha
        (out * up).sum().backward()
        return out.detach(), s.grad, up

    plan = [(0.3, "batchmean")] * 3 + [(2.0, "batchmean"), (2.0, "batchmean"), (0.0, "batchmean"),
                                       (0.3, "none"), (0.3, "sum"), (0.3, "sum"), (0.3, "sum")]
    kdfast._grad_scale_prediction.PREDICTOR.clear()
    for alpha, reduction in plan:
        out, grad, up = step(alpha, reduction)
        sd.grad = None
        want = kdfast.reference.kd_loss(sd, t0.double(), temperature=2.0, reduction=reduction)
        (want * (up if isinstance(up, float) else up.double())).sum().backward()
        assert relerr(out, want.detach()) < tol, (alpha, reduction)
        assert relerr(grad, sd.grad) < tol or (alpha == 0 and not grad.any()), (alpha, reduction)
    # bit-identity with and without history, and what each step dispatched
    for history, alpha, expect_rescale, expect_recompute in [
            ([0.3, 0.3], 0.3, False, False),   # predicted right: no pass over the buffer
            ([0.3, 0.3], 0.7, True, True),     # predicted wrong: recompute, then rescale
            ([], 0.7, True, False)]:           # nothing predicted: rescale, as always
        kdfast._grad_scale_prediction.PREDICTOR.clear()
        for a in history:
            step(a, "batchmean")
        s = s0.clone().requires_grad_()
        ops = _step_compute_ops(lambda: (alpha * kdfast.kd_loss(s, t0, temperature=2.0)).backward())
        assert ("kdfast.scale_rows_.default" in ops) == expect_rescale, (history, alpha, ops)
        assert ops.count("kdfast.softmax_kl.default") == 1 + expect_recompute, (history, alpha, ops)
        _, fresh_grad, _ = step(alpha, "batchmean", fresh=True)
        assert same_bits(s.grad, fresh_grad), (history, alpha)


@pytest.mark.parametrize("shape", [(5, 77), (2, 70001)], ids=["row_path", "split_path"])
@dtype_params((torch.float32, torch.bfloat16, torch.float64))
def test_grad_scale_has_the_bits_of_scale_rows(cpu_isa, shape, dtype):
    """softmax_kl(..., grad_scale=f) writes the bits of softmax_kl(...) then scale_rows_(g, f)."""
    s, t = logits(*shape, dtype=dtype), logits(*shape, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(shape[0], dtype=acc)
    w[0] = 0  # a skipped row: zeros, signed as the rescale leaves them
    for f in (0.3, -2.5, 1e-3):
        kl, gs, gt = torch.ops.kdfast.softmax_kl(s, t, 0.7, 0, 0.0, w, True, True, f)
        kl0, gs0, gt0 = torch.ops.kdfast.softmax_kl(s, t, 0.7, 0, 0.0, w, True, True)
        for g in (gs0, gt0):
            torch.ops.kdfast.scale_rows_(g, torch.full((shape[0],), f, dtype=acc))
        assert same_bits(kl, kl0) and same_bits(gs, gs0) and same_bits(gt, gt0), f


def test_no_grad_anywhere_builds_no_graph():
    s, t = logits(3, 20), logits(3, 20)
    for kd in (False, True):
        out = check_kl(s, t, kd=kd, grad_student=False, grad_teacher=False)[0]
        assert out.grad_fn is None
    s.requires_grad_()
    with FusedOpCalls() as calls:  # no gradient is computed either (eval loops pay the forward only)
        with torch.no_grad():
            out = kdfast.kd_loss(s, t, reduction="none")
        assert out.grad_fn is None and not out.requires_grad
        with torch.inference_mode():
            out = kdfast.softmax_kl_div(s, t)
        assert out.grad_fn is None
    assert calls.flags == [(False, False)] * 2


# ----------------------------------------------------------------------------- determinism, inputs, NaN

@pytest.mark.parametrize("shape", [(64, 1000), (3, 70001)], ids=["row_path", "split_path"])
@dtype_params((torch.float32, torch.bfloat16, torch.float64))
def test_deterministic(shape, dtype):
    assert_kl_deterministic(logits(*shape, dtype=dtype), logits(*shape, dtype=dtype))


def test_concurrent_python_threads_match_serial():
    """Calls from several Python threads at once (sharing the kernel table and the gradient block
    cache) give the same bits as serial calls."""
    shapes = [(64, 32768), (3, 70001), (16, 999), (64, 32768)]
    data = [(logits(*sh), logits(*sh)) for sh in shapes]

    def run(s, t):
        s1 = s.clone().requires_grad_()
        out = kdfast.kd_loss(s1, t, temperature=2.0, reduction="none")
        (out * 0.5).sum().backward()
        return out.detach(), s1.grad

    serial = [run(s, t) for s, t in data]
    results = run_in_threads([lambda d=d: run(*d) for d in data])
    for got, want in zip(results, serial):
        assert same_bits(got[0], want[0]) and same_bits(got[1], want[1])


def test_inputs_unchanged_by_forward_backward():
    s, t = logits(5, 300), logits(5, 300)
    mask = torch.tensor([True, True, False, True, True])
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = kdfast.kd_loss(s1, t1, mask=mask, reduction="none")
    (out * torch.randn(5)).sum().backward(retain_graph=True)
    (out * 2).sum().backward()
    assert same_bits(s1.detach(), s) and same_bits(t1.detach(), t)
    assert mask.tolist() == [True, True, False, True, True]


@pytest.mark.parametrize("where", ["student_body", "student_tail", "teacher_body", "teacher_tail"])
@pytest.mark.parametrize("V", [33, 5000, 70001])
@dtype_params((torch.float32, torch.float64, torch.bfloat16))
def test_nan_propagates(where, V, dtype):
    s, t = logits(3, V, dtype=dtype), logits(3, V, dtype=dtype)
    pos = 3 if where.endswith("body") else V - 1
    (s if where.startswith("student") else t)[1, pos] = math.nan
    rows = kdfast.softmax_kl_div(s, t, reduction="none")
    assert rows[1].isnan(), "NaN in a logit must give a NaN loss for its row"
    assert torch.isfinite(rows[[0, 2]]).all(), "NaN must not leak into other rows"
    for reduction in ("sum", "mean", "batchmean"):
        assert kdfast.kd_loss(s, t, reduction=reduction).isnan()
    expected = ref.softmax_kl_div(s.double(), t.double(), reduction="none")
    assert torch.equal(rows.isnan(), expected.isnan())
    # the gradient: all of the NaN row, none of the others (the kernels' maxima may skip a NaN
    # lane; the sums still carry it to the whole row)
    sg, tg = s.clone().requires_grad_(), t.clone().requires_grad_()
    kdfast.softmax_kl_div(sg, tg, reduction="sum").backward()
    for g in (sg.grad, tg.grad):
        assert g[1].isnan().all() and torch.isfinite(g[[0, 2]]).all()


@pytest.mark.parametrize("case", ["student_nan_at_masked", "teacher_block_masked_but_nan",
                                  "teacher_all_masked_but_nan", "both_masked_student_nan"])
@pytest.mark.parametrize("V", [100, 4096, 70001])
@dtype_params((torch.float32, torch.bfloat16, torch.float64))
def test_nan_beside_masked_logits(case, V, dtype):
    """A NaN next to -inf logits (masked vocabulary), where the kernels' p_t = 0 guard and skipped
    maxima could leave parts of the gradient finite: the row's loss and both gradients are NaN
    throughout, as the reference gives them; other rows are untouched."""
    s, t = logits(3, V, dtype=dtype), logits(3, V, dtype=dtype)
    head = min(2048, V)
    if case == "student_nan_at_masked":
        t[1, 3] = -math.inf
        s[1, 3] = math.nan
    elif case == "teacher_block_masked_but_nan":
        t[1, :head] = -math.inf
        t[1, 7] = math.nan
    elif case == "teacher_all_masked_but_nan":
        t[1] = -math.inf
        t[1, 7] = math.nan
    else:
        s[1, :head] = -math.inf
        t[1, :head] = -math.inf
        s[1, 7] = math.nan
    sg, tg = s.clone().requires_grad_(), t.clone().requires_grad_()
    rows = kdfast.softmax_kl_div(sg, tg, reduction="none")
    rows.sum().backward()
    assert rows[1].isnan() and torch.isfinite(rows[[0, 2]]).all()
    for g in (sg.grad, tg.grad):
        assert g[1].isnan().all() and torch.isfinite(g[[0, 2]]).all()
    sr, tr = s.double().requires_grad_(), t.double().requires_grad_()
    ref.softmax_kl_div(sr, tr, reduction="none").sum().backward()
    assert sr.grad[1].isnan().all() and tr.grad[1].isnan().all()  # the reference agrees


# ----------------------------------------------------------------------------- equivalences

@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_equals_f_kl_div(temperature, reduction):
    s, t = logits(16, 500), logits(16, 500)
    s1 = s.clone().requires_grad_()
    got = kdfast.softmax_kl_div(s1, t, temperature=temperature, reduction=reduction)
    got.backward()
    sd = s.double().requires_grad_()
    want = F.kl_div(F.log_softmax(sd / temperature, -1), F.log_softmax(t.double() / temperature, -1),
                    reduction=reduction, log_target=True)
    want.backward()
    assert relerr(got, want) < 1e-5
    assert relerr(s1.grad, sd.grad) < 1e-5
    if reduction == "batchmean":
        mean = kdfast.softmax_kl_div(s, t, temperature=temperature, reduction="mean")
        assert relerr(mean, got) < 1e-6


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0, 10.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kd_loss_is_t_squared_kl(temperature, reduction):
    """kd_loss against T^2 KL written out in float64 (not against softmax_kl_div, which shares its
    code path), with a mask and every reduction: value and student gradient."""
    s, t = logits(3, 4, 70), logits(3, 4, 70)
    mask = torch.rand(3, 4) > 0.3
    s1 = s.clone().requires_grad_()
    kd = kdfast.kd_loss(s1, t, temperature=temperature, reduction=reduction, mask=mask)
    sd = s.double().requires_grad_()
    rows = torch.where(mask, _kl_rows_float64(sd, t, temperature), 0.0) * temperature ** 2
    want = {"none": rows, "sum": rows.sum(), "batchmean": rows.sum() / 3,
            "mean": rows.sum() / mask.sum()}[reduction]
    assert kd.shape == want.shape
    assert relerr(kd, want) < 1e-5
    kd.sum().backward()
    want.sum().backward()
    assert relerr(s1.grad, sd.grad) < 1e-5


def test_default_temperatures():
    """kd_loss: T = 4 and batchmean by default; an int temperature works as the float. Against
    float64; softmax_kl_div: T = 1 and batchmean, against F.kl_div."""
    s, t = logits(4, 30), logits(4, 30)
    assert relerr(kdfast.kd_loss(s, t), 16 * _kl_rows_float64(s, t, 4.0).sum() / 4) < 1e-5
    assert relerr(kdfast.kd_loss(s, t, temperature=2), 4 * _kl_rows_float64(s, t, 2.0).sum() / 4) < 1e-5
    torch.testing.assert_close(kdfast.softmax_kl_div(s, t),
                               F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean",
                                        log_target=True))


def test_native_and_reference_backends_agree():
    s, t = logits(2, 5, 77), logits(2, 5, 77)
    mask = torch.rand(2, 5) > 0.5
    results = {}
    for b in ("native", "reference"):
        kdfast.set_backend(b)
        s1 = s.clone().requires_grad_()
        out = kdfast.kd_loss(s1, t, temperature=3.0, reduction="mean", mask=mask)
        out.backward()
        results[b] = (out, s1.grad)
    assert relerr(results["native"][0], results["reference"][0]) < 1e-6
    assert relerr(results["native"][1], results["reference"][1]) < 1e-5


def test_split_path_huge_vocabulary():
    """2 x 600000: few rows with a huge vocabulary run the split path (values and both gradients)."""
    check_kl(logits(2, 600000), logits(2, 600000), kd=True, temperature=2.0, reduction="batchmean",
             grad_teacher=True)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_split_path_mask_and_upstream(reduction):
    """The split path (few rows, V >= 65536) with a masked row and an upstream gradient != 1."""
    mask = torch.tensor([True, False, True])
    upstream = torch.tensor([0.5, 2.0, -1.5], dtype=torch.float64) if reduction == "none" else 0.3
    check_kl(logits(3, 70001), logits(3, 70001), kd=True, temperature=1.5, reduction=reduction, mask=mask,
             grad_teacher=True, upstream=upstream)


def test_non_contiguous_mask():
    mask = (torch.rand(5, 4) > 0.4).t()  # (4, 5), not contiguous
    check_kl(logits(4, 5, 40), logits(4, 5, 40), reduction="mean", mask=mask, grad_teacher=True)


def test_large_gradient_buffers_do_not_alias():
    """Gradients of 8 MB and more come from a block cache: a live gradient is never handed out
    again, and a recycled block gives correct results."""
    shape = (64, 32768)  # 8 MiB of fp32
    s, t = logits(*shape), logits(*shape)
    s1 = s.clone().requires_grad_()
    kdfast.kd_loss(s1, t, temperature=2.0).backward()
    g1 = s1.grad
    g1_keep = g1.clone()
    s2 = s.clone().requires_grad_()
    kdfast.kd_loss(s2, t.flip(0), temperature=2.0).backward()
    assert s2.grad.data_ptr() != g1.data_ptr()
    assert same_bits(g1, g1_keep), "a live gradient buffer was overwritten"
    # accumulate a second loss into the same .grad, then free everything and go again
    kdfast.kd_loss(s1, t, temperature=2.0).backward()
    torch.testing.assert_close(s1.grad, 2 * g1_keep, rtol=1e-6, atol=0)
    del s1, s2, g1
    out, gs, _ = check_kl(s, t, kd=True, temperature=2.0, reduction="batchmean")
    assert same_bits(gs, g1_keep)


def test_autocast_bf16_logits_give_float32_loss():
    """Logits from a layer under CPU autocast are bf16; the loss is float32 and equals the loss of
    the same bf16 values outside autocast."""
    lin = torch.nn.Linear(16, 40)
    x = torch.randn(8, 16)
    t = logits(8, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = lin(x)
        assert s.dtype == torch.bfloat16
        loss = kdfast.kd_loss(s, t, temperature=2.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    expected = ref.kd_loss(s.detach().double(), t.double(), temperature=2.0)
    assert relerr(loss, expected) < 1e-5


# ----------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("fn", [kdfast.softmax_kl_div, kdfast.kd_loss], ids=["softmax_kl_div", "kd_loss"])
@pytest.mark.parametrize("reduction", ["none", "batchmean", "mean"])
@pytest.mark.parametrize("lead", [(3,), (2, 3)], ids=["2d", "3d"])
def test_gradcheck(fn, reduction, lead):
    s = torch.randn(*lead, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(*lead, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(lead, dtype=torch.bool)
    mask.view(-1)[1] = False
    for m in (None, mask):
        assert torch.autograd.gradcheck(
            lambda a, b: fn(a, b, temperature=1.7, reduction=reduction, mask=m), (s, t),
            check_batched_grad=False)


def test_gradcheck_non_contiguous_expanded_teacher():
    s = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)   # transposed view below
    t = torch.randn(1, 7, dtype=torch.float64, requires_grad=True)   # broadcast row
    assert torch.autograd.gradcheck(
        lambda a, b: kdfast.kd_loss(a.t(), b.expand(4, 7), temperature=2.0, reduction="none"), (s, t),
        check_batched_grad=False)


# ----------------------------------------------------------------------------- opcheck

def _op_args(rows, V, dtype, gs, gt):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(rows, dtype=acc) + 0.1
    if rows > 1:
        w[1] = 0  # a skipped row
    return (torch.randn(rows, V, dtype=dtype), torch.randn(rows, V, dtype=dtype), 0.5, 0, 0.0, w, gs, gt)


@pytest.mark.parametrize("flags", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["no_grad", "grad_s", "grad_t", "grad_st"])
@pytest.mark.parametrize("shape", [(3, 17), (1, 1), (0, 8), (5, 300)], ids=lambda s: "x".join(map(str, s)))
@dtype_params((torch.float32, torch.float64))
def test_opcheck_softmax_kl(flags, shape, dtype):
    torch.library.opcheck(torch.ops.kdfast.softmax_kl.default, _op_args(*shape, dtype, *flags))


def test_opcheck_softmax_kl_split_and_half():
    torch.library.opcheck(torch.ops.kdfast.softmax_kl.default, _op_args(2, 70001, torch.float32, True, True))
    torch.library.opcheck(torch.ops.kdfast.softmax_kl.default, _op_args(3, 40, torch.float32, True, True) + (0.25,))
    torch.library.opcheck(torch.ops.kdfast.softmax_kl.default, _op_args(3, 40, torch.bfloat16, True, True))


def test_softmax_kl_op_semantics():
    """The raw op: unweighted KL per row (0 where row_weight is 0), row_weight * dKL/dinput."""
    s, t = torch.randn(4, 50, dtype=torch.float64), torch.randn(4, 50, dtype=torch.float64)
    w = torch.tensor([1.0, 0.0, 2.5, -0.5], dtype=torch.float64)
    kl, gs, gt = torch.ops.kdfast.softmax_kl(s, t, 0.5, 0, 0.0, w, True, True)
    rows = ref.softmax_kl_div(s, t, temperature=2.0, reduction="none")
    torch.testing.assert_close(kl, torch.where(w != 0, rows, 0.0))
    sd, td = s.clone().requires_grad_(), t.clone().requires_grad_()
    (ref.softmax_kl_div(sd, td, temperature=2.0, reduction="none") * w).sum().backward()
    torch.testing.assert_close(gs, sd.grad)
    torch.testing.assert_close(gt, td.grad)
    _, gs0, gt0 = torch.ops.kdfast.softmax_kl(s, t, 0.5, 0, 0.0, w, False, False)
    assert gs0.numel() == 0 and gt0.numel() == 0


@dtype_params()
def test_opcheck_scale_rows(dtype):
    check_scale_rows(dtype, "cpu", 33)


# ----------------------------------------------------------------------------- torch.compile

def test_compile_kd_loss_fullgraph():
    def f(s, t):
        return kdfast.kd_loss(s, t, temperature=2.0)
    compare_compiled(f, [logits(8, 100).requires_grad_(), logits(8, 100)], grads_of=[0])


def test_compile_softmax_kl_div_fullgraph_mask_teacher_grad():
    def f(s, t, m):
        return 0.5 * kdfast.softmax_kl_div(s, t, temperature=3.0, reduction="mean", mask=m)
    mask = torch.rand(2, 4) > 0.3
    mask[0, 0] = True
    compare_compiled(f, [logits(2, 4, 50).requires_grad_(), logits(2, 4, 50).requires_grad_(), mask],
                      grads_of=[0, 1])


# ----------------------------------------------------------------------------- slow (KDFAST_SLOW=1)

@pytest.mark.slow
def test_random_sweep():
    """A larger randomized sweep: random shapes, V, temperatures, dtypes, reductions, masks, strides."""
    gen = torch.Generator().manual_seed(1234)

    def rint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    for i in range(300):
        dtype = DTYPES[rint(0, 3)]
        V = [1, rint(2, 40), rint(41, 3000), rint(3000, 70000), rint(65536, 140000)][rint(0, 4)]
        lead = [(rint(0, 9),), (rint(1, 3), rint(0, 5))][rint(0, 1)]
        if V > 3000:
            lead = (rint(1, 4),)
        T = float(torch.empty(1).uniform_(-3, 4.6, generator=gen).exp())  # about 0.05 .. 100
        reduction = REDUCTIONS[rint(0, 3)]
        mask = (torch.rand(lead, generator=gen) > 0.3) if rint(0, 1) else None
        layout = None
        kind = rint(0, 3)
        if kind == 1 and len(lead) == 1:
            layout = lambda a, b: (a.t(), b.t())  # noqa: E731
            s = logits(V, *lead, dtype=dtype)
            t = logits(V, *lead, dtype=dtype)
        elif kind == 2:
            n = math.prod(lead) * V
            s, t = logits(n + 1, dtype=dtype), logits(n + 3, dtype=dtype)
            layout = lambda a, b, lead=lead: (a[1:].view(*lead, V), b[3:].view(*lead, V))  # noqa: E731
        else:
            s, t = logits(*lead, V, dtype=dtype), logits(*lead, V, dtype=dtype)
        kd, grad_teacher = bool(rint(0, 1)), bool(rint(0, 1))
        try:
            check_kl(s, t, kd=kd, temperature=T, reduction=reduction, mask=mask, layout=layout,
                     grad_teacher=grad_teacher, upstream=0.7)
        except AssertionError as e:
            raise AssertionError(f"case {i}: dtype={dtype} lead={lead} V={V} T={T:.4g} reduction={reduction} "
                                 f"mask={mask is not None} layout={kind} kd={kd} grad_teacher={grad_teacher}: "
                                 f"{e}") from None


@pytest.mark.slow
@pytest.mark.parametrize("V", [1 << 20, (1 << 20) + 3], ids=["row_path_max", "split_by_size"])
def test_very_long_rows(V):
    """16 rows at the row path's limit (2^20) and just past it (the split path by size)."""
    check_kl(logits(16, V), logits(16, V), kd=True, temperature=2.0, reduction="sum", grad_teacher=True)
