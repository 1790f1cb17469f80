"""The fused top-k KL (kdfast.sparse_kl_div, torch.ops.kdfast.sparse_kl) against its float64
reference, and the reference against formulas written out independently: both tails, values and
gradients (student and teacher log-probs), K = 1, K = V, K = 64 at V = 32003, 3-D inputs, every
reduction with an upstream gradient, masks, int32 ids, strides, half precision, long rows, the
tail's floor, errors; gradcheck and opcheck."""
import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import reference as ref

from conftest import DTYPE_IDS, needs_native

pytestmark = needs_native
TAILS = ("renormalize", "bucket")
REDUCTIONS = ("none", "sum", "mean", "batchmean")
# Norm-wise relative tolerances against float64 (values, gradients in the input dtype).
VALUE_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-5, torch.float16: 3e-5}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def relerr(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def topk_teacher(shape, V, K, scale=3.0, seed=0):
    """(log-probs, ids) of a random teacher's top K, as torch.topk of log_softmax gives them."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, V, dtype=torch.float64, generator=g) * scale
    return t.log_softmax(-1).topk(K, -1)


def student(shape, V, dtype, scale=3.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, V, dtype=torch.float64, generator=g) * scale).to(dtype)


def check(s, lp, idx, *, temperature=1.0, tail="renormalize", reduction="batchmean", mask=None, upstream=None,
          grad_teacher=True, dtype=None):
    """kdfast against the float64 reference: the value and the gradients of sum(upstream * loss)."""
    dtype = dtype or s.dtype
    s = s.detach().requires_grad_()
    lp = lp.detach().requires_grad_(grad_teacher)
    kw = dict(temperature=temperature, tail=tail, reduction=reduction, mask=mask)
    out = kdfast.sparse_kl_div(s, lp, idx, **kw)
    s64 = s.detach().double().requires_grad_()
    lp64 = lp.detach().double().requires_grad_(grad_teacher)
    want = ref.sparse_kl_div(s64, lp64, idx, **kw)
    assert out.shape == want.shape
    assert out.dtype == (torch.float32 if s.dtype in (torch.float16, torch.bfloat16) else s.dtype)
    assert relerr(out, want) <= VALUE_TOL[dtype], (relerr(out, want), out, want)
    up = upstream if upstream is not None else torch.tensor(0.37, dtype=torch.float64)
    inputs = (s, lp) if grad_teacher else (s,)
    got = torch.autograd.grad(out, inputs, up.to(out.dtype).expand_as(out))
    exp = torch.autograd.grad(want, (s64, lp64) if grad_teacher else (s64,), up.expand_as(want))
    assert got[0].dtype == s.dtype
    g64 = exp[0].to(s.dtype).double() if s.dtype in (torch.float16, torch.bfloat16) else exp[0]
    assert relerr(got[0], g64) <= GRAD_TOL[dtype], ("student", relerr(got[0], g64))
    if grad_teacher:
        assert got[1].dtype == lp.dtype
        assert relerr(got[1], exp[1]) <= GRAD_TOL[torch.float32 if dtype != torch.float64 else dtype], (
            "teacher", relerr(got[1], exp[1]))
    return out


SHAPES = [
    ((4,), 7, 1),        # K = 1
    ((3,), 37, 37),      # K = V
    ((3,), 32003, 64),   # an LLM-sized row (odd V: a vector tail)
    ((2,), 5000, 300),   # several online-softmax blocks
    ((5,), 33, 5),
]


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("lead,V,K", SHAPES, ids=lambda x: str(x))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_values_and_gradients(tail, dtype, lead, V, K, temperature):
    lp, idx = topk_teacher(lead, V, K)
    s = student(lead, V, dtype)
    check(s, lp.to(dtype if dtype == torch.float64 else torch.float32), idx, temperature=temperature, tail=tail,
          dtype=dtype)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("masked", [False, True])
def test_3d_reductions_masks_upstream(tail, reduction, masked):
    lead, V, K = (3, 4), 300, 16
    lp, idx = topk_teacher(lead, V, K)
    s = student(lead, V, torch.float32)
    mask = None
    if masked:
        mask = torch.tensor([[True, False, True, True], [False, False, True, False], [True, True, True, False]])
        idx = idx.clone()
        idx[~mask] = -7  # masked rows are not read: their ids may be anything
    up = torch.rand(lead, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(-1.7, dtype=torch.float64)
    out = check(s, lp.float(), idx, tail=tail, reduction=reduction, mask=mask, upstream=up, temperature=1.5)
    if masked and reduction == "none":
        assert (out[~mask] == 0).all()


def test_masked_rows_get_zero_gradients():
    lp, idx = topk_teacher((4,), 50, 5)
    s = student((4,), 50, torch.float32).requires_grad_()
    lpf = lp.float().requires_grad_()
    mask = torch.tensor([True, False, True, False])
    kdfast.sparse_kl_div(s, lpf, idx, mask=mask, reduction="sum").backward()
    assert (s.grad[~mask] == 0).all() and (lpf.grad[~mask] == 0).all()
    assert (s.grad[mask] != 0).any()


def test_int32_ids_equal_int64():
    lp, idx = topk_teacher((6,), 1000, 64)
    s = student((6,), 1000, torch.float32)
    for tail in TAILS:
        a = check(s, lp.float(), idx.int(), tail=tail)
        b = kdfast.sparse_kl_div(s, lp.float(), idx, tail=tail)
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("tail", TAILS)
def test_non_contiguous_inputs(tail):
    V, K = 513, 20
    lp, idx = topk_teacher((6,), V, K)
    base = student((6,), V + 40, torch.float32)
    check(base[:, 3:3 + V], lp.float(), idx, tail=tail)  # row stride > V, unit stride along V
    check(student((6,), V, torch.float32).t().contiguous().t(), lp.float(), idx, tail=tail)  # column-major
    check(student((6,), V, torch.float32)[::2], lp.float()[::2], idx[::2], tail=tail)  # every other row
    wide = torch.zeros(6, 2 * K)
    wide[:, ::2] = lp.float()
    wide_idx = torch.zeros(6, 2 * K, dtype=torch.long)
    wide_idx[:, ::2] = idx
    check(student((6,), V, torch.float32), wide[:, ::2], wide_idx[:, ::2], tail=tail)  # strided along K


@pytest.mark.parametrize("tail", TAILS)
def test_long_rows(tail):
    """Rows of 600k (the online softmax over ~300 blocks)."""
    lp, idx = topk_teacher((2,), 600_000, 64, seed=3)
    check(student((2,), 600_000, torch.float32, seed=4), lp.float(), idx, tail=tail)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: DTYPE_IDS[d])
def test_student_equal_to_teacher_with_k_equal_v_is_zero(tail, dtype):
    t = student((5,), 300, torch.float64, seed=7)
    lp, idx = t.log_softmax(-1).topk(300, -1)
    s = t.to(dtype).requires_grad_()
    lpd = lp.to(dtype).requires_grad_()
    out = kdfast.sparse_kl_div(s, lpd, idx, tail=tail, reduction="none")
    assert out.abs().max() <= (1e-12 if dtype == torch.float64 else 2e-6), out
    out.sum().backward()
    assert s.grad.abs().max() <= (1e-12 if dtype == torch.float64 else 1e-6)


# ----------------------------------------------------------------------------- the reference's semantics

def test_renormalize_with_all_ids_is_the_softmax_kl():
    """K = V: the truncated teacher is the teacher; at any T the value is softmax_kl_div's."""
    t = student((4,), 50, torch.float64, seed=2)
    s = student((4,), 50, torch.float64, seed=3)
    lp, idx = t.log_softmax(-1).topk(50, -1)
    for T in (1.0, 3.0):
        want = ref.softmax_kl_div(s, t, temperature=T, reduction="none")
        torch.testing.assert_close(ref.sparse_kl_div(s, lp, idx, temperature=T, reduction="none"), want)
        torch.testing.assert_close(kdfast.sparse_kl_div(s, lp, idx, temperature=T, reduction="none"), want)


def test_renormalize_is_the_kl_to_the_truncated_teacher():
    """Against the dense formula: P the teacher's softmax restricted to its top K and renormalised
    at T, Q the student's full softmax at T."""
    lp, idx = topk_teacher((3,), 40, 6)
    s = student((3,), 40, torch.float64)
    T = 2.0
    p = torch.zeros(3, 40, dtype=torch.float64).scatter(-1, idx, F.softmax(lp / T, -1))
    log_q = F.log_softmax(s / T, -1)
    want = torch.where(p > 0, p * (p.log() - log_q), 0.0).sum(-1)
    torch.testing.assert_close(ref.sparse_kl_div(s, lp, idx, temperature=T, reduction="none"), want)
    torch.testing.assert_close(kdfast.sparse_kl_div(s, lp, idx, temperature=T, reduction="none"), want)


def test_bucket_is_the_k_plus_one_outcome_kl():
    """P = (exp(l_1..K), 1 - sum), Q = (Q_i1..iK, 1 - sum) at the student's T, as F.kl_div."""
    lp, idx = topk_teacher((3,), 40, 6)
    s = student((3,), 40, torch.float64)
    T = 1.7
    q = F.softmax(s / T, -1).gather(-1, idx)
    P = torch.cat([lp.exp(), 1 - lp.exp().sum(-1, keepdim=True)], -1)
    Q = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    want = F.kl_div(Q.log(), P, reduction="none").sum(-1)
    torch.testing.assert_close(ref.sparse_kl_div(s, lp, idx, temperature=T, tail="bucket", reduction="none"), want)
    torch.testing.assert_close(kdfast.sparse_kl_div(s, lp, idx, temperature=T, tail="bucket", reduction="none"), want)


def test_bucket_tail_without_cancellation():
    """A student tail of ~1e-15 (far below float32's 1 - sum resolution) is summed, not subtracted:
    the float32 kernel sees the tail term the float64 reference sees."""
    V, K = 1000, 10
    idx = torch.arange(K).expand(2, K).contiguous()
    s = torch.zeros(2, V, dtype=torch.float64)
    s[:, K:] = -40.0  # unlisted mass 990 e^-40 / K ~ 4e-16
    s[1, K:] = -25.0
    lp = torch.full((2, K), 0.7 / K, dtype=torch.float64).log()  # teacher tail 0.3
    check(s.float(), lp.float(), idx, tail="bucket", reduction="none", upstream=torch.rand(2, dtype=torch.float64))
    rows = ref.sparse_kl_div(s, lp, idx, tail="bucket", reduction="none")
    assert (rows > 0.3 * 15).all()  # the tail term 0.3 log(0.3 / Q_tail), Q_tail ~ 1e-15 and 1e-9, dominates


def test_bucket_floor_and_zero_probabilities():
    """Unlisted student logits of -inf: Q_tail = 0 sits at the floor, finite loss, no tail gradient;
    a teacher entry of -inf log-prob (P = 0) adds nothing."""
    V, K = 20, 4
    idx = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    s = torch.full((2, V), float("-inf"), dtype=torch.float64)
    s[0, :4] = torch.tensor([1.0, 2.0, 0.5, -1.0])
    s[1, 5:9] = torch.tensor([0.0, 0.1, 0.2, 0.3])
    lp = torch.tensor([[-1.0, -2.0, float("-inf"), -3.0], [-1.5, -1.5, -2.0, -2.0]], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        out = check(s.to(dtype), lp.to(dtype), idx, tail="bucket", reduction="none",
                    upstream=torch.tensor([0.5, 2.0], dtype=torch.float64), dtype=dtype)
        assert torch.isfinite(out).all()


def test_teacher_mass_above_one_clamps_the_tail():
    """Log-probs that sum past 1 (rounding, or a sharpened server): P_tail clamps at 0, no log of 0."""
    idx = torch.tensor([[0, 1, 2]])
    lp = torch.tensor([[0.6, 0.3, 0.2]], dtype=torch.float64).log()
    s = student((1,), 10, torch.float64)
    for dtype in (torch.float32, torch.float64):
        out = check(s.to(dtype), lp.to(dtype), idx, tail="bucket", dtype=dtype)
        assert torch.isfinite(out)


def test_nan_propagates():
    lp, idx = topk_teacher((3,), 30, 4)
    s = student((3,), 30, torch.float32).requires_grad_()
    with torch.no_grad():
        s[1, 7] = float("nan")
    for tail in TAILS:
        out = kdfast.sparse_kl_div(s, lp.float(), idx, tail=tail, reduction="none")
        assert out[1].isnan() and not out[0].isnan() and not out[2].isnan()


# ----------------------------------------------------------------------------- modules, autograd, ops

def test_module():
    lp, idx = topk_teacher((2, 3), 100, 8)
    s = student((2, 3), 100, torch.float32)
    m = kdfast.nn.SparseKLDivLoss(temperature=2.0, tail="bucket", reduction="mean")
    assert "tail='bucket'" in repr(m)
    torch.testing.assert_close(m(s, lp.float(), idx),
                               kdfast.sparse_kl_div(s, lp.float(), idx, temperature=2.0, tail="bucket",
                                                    reduction="mean"))


@pytest.mark.parametrize("tail", TAILS)
def test_gradcheck(tail):
    lp, idx = topk_teacher((2, 3), 9, 4)
    s = student((2, 3), 9, torch.float64).requires_grad_()
    lp = lp.clone().requires_grad_()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    for reduction in ("none", "mean"):
        assert torch.autograd.gradcheck(
            lambda a, b: kdfast.sparse_kl_div(a, b, idx, temperature=1.5, tail=tail, reduction=reduction, mask=mask),
            (s, lp))
    # second order goes through the reference rows (create_graph=True)
    assert torch.autograd.gradgradcheck(
        lambda a, b: kdfast.sparse_kl_div(a, b, idx, tail=tail, reduction="sum"), (s, lp))


def test_backend_reference_agrees():
    lp, idx = topk_teacher((3,), 200, 10)
    s = student((3,), 200, torch.float64)
    native = kdfast.sparse_kl_div(s, lp, idx, tail="bucket", reduction="none")
    kdfast.set_backend("reference")
    try:
        torch.testing.assert_close(kdfast.sparse_kl_div(s, lp, idx, tail="bucket", reduction="none"), native)
    finally:
        kdfast.set_backend("auto")


def _op_args(rows, V, K, dtype, gs, gt, tail=0, idx_dtype=torch.long):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(rows, dtype=acc) + 0.1
    if rows > 1:
        w[1] = 0  # a skipped row
    lp, idx = topk_teacher((rows,), V, K)
    return (torch.randn(rows, V, dtype=dtype), lp.to(acc), idx.to(idx_dtype), 0.5, tail, w, gs, gt)


@pytest.mark.parametrize("flags", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["no_grad", "grad_s", "grad_t", "grad_st"])
@pytest.mark.parametrize("shape", [(3, 17, 4), (1, 1, 1), (0, 8, 2), (5, 300, 300)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("tail", [0, 1])
def test_opcheck(flags, shape, tail):
    for dtype in (torch.float32, torch.float64):
        torch.library.opcheck(torch.ops.kdfast.sparse_kl.default, _op_args(*shape, dtype, *flags, tail=tail))
    torch.library.opcheck(torch.ops.kdfast.sparse_kl.default,
                          _op_args(*shape, torch.bfloat16, *flags, tail=tail, idx_dtype=torch.int32))


def test_op_semantics():
    """The raw op: unweighted loss per row (0 where row_weight is 0), row_weight * dL/dinput."""
    s = torch.randn(4, 50, dtype=torch.float64)
    lp, idx = topk_teacher((4,), 50, 7)
    w = torch.tensor([1.0, 0.0, 2.5, -0.5], dtype=torch.float64)
    for tail, name in enumerate(TAILS):
        loss, gs, gt = torch.ops.kdfast.sparse_kl(s, lp, idx, 0.5, tail, w, True, True)
        rows = ref.sparse_kl_div(s, lp, idx, temperature=2.0, tail=name, reduction="none")
        torch.testing.assert_close(loss, torch.where(w != 0, rows, 0.0))
        sd, ld = s.clone().requires_grad_(), lp.clone().requires_grad_()
        (ref.sparse_kl_div(sd, ld, idx, temperature=2.0, tail=name, reduction="none") * w).sum().backward()
        torch.testing.assert_close(gs, sd.grad)
        torch.testing.assert_close(gt, ld.grad)


def test_compile():
    lp, idx = topk_teacher((4,), 64, 8)
    s = student((4,), 64, torch.float32).requires_grad_()
    fn = torch.compile(lambda a, b, i: kdfast.sparse_kl_div(a, b, i, tail="bucket"), fullgraph=False)
    out = fn(s, lp.float(), idx)
    (g,) = torch.autograd.grad(out, s)
    s2 = s.detach().requires_grad_()
    want = kdfast.sparse_kl_div(s2, lp.float(), idx, tail="bucket")
    (g2,) = torch.autograd.grad(want, s2)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(g, g2)


def test_inputs_unchanged():
    lp, idx = topk_teacher((3,), 100, 9)
    s = student((3,), 100, torch.float32).requires_grad_()
    lpf = lp.float().requires_grad_()
    copies = [x.detach().clone() for x in (s, lpf, idx)]
    for tail in TAILS:
        kdfast.sparse_kl_div(s, lpf, idx, tail=tail).backward()
    for a, b in zip((s, lpf, idx), copies):
        assert torch.equal(a.detach(), b)


# ----------------------------------------------------------------------------- errors

@pytest.fixture(params=["auto", "reference"])
def backend(request):
    kdfast.set_backend(request.param)
    yield request.param
    kdfast.set_backend("auto")


def _good():
    lp, idx = topk_teacher((3,), 20, 4)
    return student((3,), 20, torch.float32), lp.float(), idx


@pytest.mark.parametrize("bad,exc,match", [
    (lambda s, lp, idx: (s, lp, idx.float()), TypeError, "teacher_topk_indices must be int64 or int32"),
    (lambda s, lp, idx: (s, lp, idx.clone().index_fill_(1, torch.tensor([2]), 20)), ValueError,
     r"teacher_topk_indices.*out of range"),
    (lambda s, lp, idx: (s, lp, idx.clone().index_fill_(1, torch.tensor([0]), -1)), ValueError,
     r"teacher_topk_indices.*out of range"),
    (lambda s, lp, idx: (s, lp, torch.cat([idx[:, :1], idx[:, :3]], 1)), ValueError,
     r"teacher_topk_indices.*repeat"),
    (lambda s, lp, idx: (s, lp, idx[:, :3]), ValueError, "teacher_topk_indices has shape"),
    (lambda s, lp, idx: (s, lp[:2], idx[:2]), ValueError, r"teacher_topk_logprobs must have shape \(3,\)"),
    (lambda s, lp, idx: (s, lp[:, :0], idx[:, :0]), ValueError, "K = 0"),
    (lambda s, lp, idx: (s[:, :3], lp, idx), ValueError, "more than the vocabulary"),
    (lambda s, lp, idx: (s, lp.long(), idx), TypeError, "teacher_topk_logprobs must be float"),
    (lambda s, lp, idx: (s.long(), lp, idx), TypeError, "student_logits must be float"),
    (lambda s, lp, idx: (s, lp, idx.tolist()), TypeError, "teacher_topk_indices must be a torch.Tensor"),
    (lambda s, lp, idx: (s[:, :0], lp, idx), ValueError, "student_logits must have a non-empty vocabulary"),
    (lambda s, lp, idx: (s, lp.to("meta"), idx), ValueError, "teacher_topk_logprobs is on meta"),
])
def test_errors_name_the_argument(backend, bad, exc, match):
    args = bad(*_good())
    with pytest.raises(exc, match=match):
        kdfast.sparse_kl_div(*args)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(tail="ghost"), ValueError, "tail must be one of 'renormalize', 'bucket'"),
    (dict(tail=None), ValueError, "tail must be one of"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(mask=torch.ones(2, dtype=torch.bool)), ValueError, "mask must have shape"),
])
def test_bad_options(backend, kw, exc, match):
    with pytest.raises(exc, match=match):
        kdfast.sparse_kl_div(*_good(), **kw)


def test_bad_ids_in_a_later_row_are_found():
    s, lp, idx = _good()
    s = torch.randn(64, 20)
    lp, idx = topk_teacher((64,), 20, 4)
    idx = idx.clone()
    idx[50, 3] = idx[50, 0]
    with pytest.raises(ValueError, match=r"teacher_topk_indices\[50, 3\] repeats"):
        kdfast.sparse_kl_div(s, lp.float(), idx)


def test_direct_op_errors():
    s, lp, idx = _good()
    w = torch.ones(3)
    op = torch.ops.kdfast.sparse_kl
    with pytest.raises(ValueError, match=r"teacher_topk_indices\[1, 2\] is out of range"):
        bad = idx.clone()
        bad[1, 2] = 99
        op(s, lp, bad, 1.0, 0, w, True, True)
    with pytest.raises(TypeError, match="teacher_topk_indices must be int64 or int32"):
        op(s, lp, idx.float(), 1.0, 0, w, True, True)
    with pytest.raises(RuntimeError, match="teacher_topk_indices .* and teacher_logprobs .* differ in shape"):
        op(s, lp, idx[:, :2], 1.0, 0, w, True, True)
    with pytest.raises(RuntimeError, match="teacher_logprobs must be Float"):
        op(s, lp.double(), idx, 1.0, 0, w, True, True)
    with pytest.raises(ValueError, match="tail must be 0"):
        op(s, lp, idx, 1.0, 2, w, True, True)
    with pytest.raises(RuntimeError, match="row_weight"):
        op(s, lp, idx, 1.0, 0, torch.ones(2), True, True)
    with pytest.raises(RuntimeError, match="inv_temperature"):
        op(s, lp, idx, float("nan"), 0, w, True, True)


def test_thread_count_does_not_change_bits():
    """Each row is one thread's work: 1 and 2 threads give the same bits (values and gradients)."""
    lp, idx = topk_teacher((40,), 3000, 32)
    s = student((40,), 3000, torch.float32)
    before = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for tail in TAILS:
                out.append(torch.ops.kdfast.sparse_kl(s, lp.float(), idx, 0.5, TAILS.index(tail), torch.ones(40),
                                                      True, True))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(out[:2], out[2:]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("reduction", ["none", "batchmean"])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_row_beyond_float_max_is_finite(tail, reduction, dtype):
    """A row whose KL exceeds FLT_MAX (logits ~2.5e38 apart, T = 0.5): its float64 row value is
    kept until it is weighted, so a mean that is a float stays finite and equal to float64, as
    softmax_kl_div gives it (the row was stored in float32 as inf; found by the fuzz)."""
    if not kdfast.native_available():
        pytest.skip("native extension not built")
    kdfast.set_backend("native")
    s = torch.tensor([[2.5e38, 0.0], [0.0, 0.0], [1.0, -2.0]], dtype=torch.float64).to(dtype)
    lp, idx = torch.tensor([[0.0, 5.0]] * 3, dtype=torch.float64).log_softmax(-1).float().topk(2, -1)
    got = kdfast.sparse_kl_div(s, lp, idx, tail=tail, temperature=0.5, reduction=reduction)
    want = ref.sparse_kl_div(s.double(), lp.double(), idx, tail=tail, temperature=0.5, reduction=reduction)
    if reduction == "none":  # the row itself is beyond float32: inf is its correct rounding there
        want = want.float()
    assert torch.equal(got.isinf(), want.isinf()) and torch.isfinite(got).any()
    fin = torch.isfinite(want)
    assert (((got.double() - want.double()) / want.double().abs().clamp(min=1))[fin].abs() < 1e-5).all(), (got, want)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("upstream", [1e-3, -0.25])
def test_teacher_gradient_beyond_float_max_at_upstream_one(tail, upstream):
    """fp32 student logits +-2.5e38, T = 0.25: the teacher log-probs' gradient of the sum at
    upstream 1 is beyond FLT_MAX, but the wanted one, at upstream 1e-3 or -0.25, is not. The op
    writes it in forward at upstream 1, where it was inf; backward now recomputes at the upstream
    factor (the fuzz's sparse_teacher_grad_overflow class)."""
    if not kdfast.native_available():
        pytest.skip("native extension not built")
    kdfast.set_backend("native")
    s = torch.tensor([[2.5e38, 0.0, -2.5e38], [0.0, 0.0, 1.0], [1.0, -2.0, 0.5]], dtype=torch.float32)
    lp, idx = torch.tensor([[-9.0, 0.1, 0.05]] * 3, dtype=torch.float64).log_softmax(-1).float().topk(2, -1)
    grads = []
    for dtype, fn in ((torch.float32, kdfast.sparse_kl_div), (torch.float64, ref.sparse_kl_div)):
        lpx = lp.to(dtype).detach().clone().requires_grad_()
        (fn(s.to(dtype), lpx, idx, tail=tail, temperature=0.25, reduction="sum") * upstream).backward()
        grads.append(lpx.grad)
    got, want = grads
    fmax = torch.finfo(torch.float32).max
    assert (want / upstream).abs().max() > fmax and want.abs().max() < fmax  # the case is what it says
    assert torch.isfinite(got).all(), got
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-30)
