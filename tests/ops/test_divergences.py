"""The divergence family of the softmax-KL op (issue 16, DESIGN.md section 5): generalized_jsd,
reverse_kl_div, skew_kl_div (both directions) and tv_distance against their float64 references
(conftest.check_kl with loss=...) in values and both gradients, across shapes, dtypes, reductions,
masks, layouts, temperatures, huge and -inf logits and NaN; never negative; determinism; endpoint
identities; independent textbook formulas; errors; modules; gradcheck, opcheck, double backward."""
import math

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import reference as ref

from conftest import (DTYPE_IDS, HALF, check_kl, extreme_logit_rows, needs_native, relerr, same_bits)
from test_softmax_kl import LAYOUTS, NINF, REDUCTIONS, _neg_inf_case, dtype_params, logits

pytestmark = needs_native

# Every divergence of the family with the mixes the issue names: (id, function name, options).
# The endpoints (beta 0 and 1, alpha 0) are TRL's exact definitions, taken by the op's glue.
SPECS = ([(f"jsd{b}", "generalized_jsd", dict(beta=b)) for b in (0.0, 0.1, 0.5, 0.9, 1.0)]
         + [("reverse_kl", "reverse_kl_div", {})]
         + [(f"skew{'_rev' if r else ''}{a}", "skew_kl_div", dict(alpha=a, reverse=r))
            for r in (False, True) for a in (0.0, 0.1, 0.5, 1.0)]
         + [("tvd", "tv_distance", {})])
SPEC_IDS = [s[0] for s in SPECS]
# One of each kernel kind (JSD, skew in both directions, TVD) and reverse KL: for the costlier cases.
CORE = [s for s in SPECS if s[0] in ("jsd0.5", "reverse_kl", "skew0.1", "skew_rev0.1", "tvd")]
# The kinds whose value is finite for any pair of distributions (bounded ratios): JSD inside (0, 1),
# skew with alpha > 0, TVD.
BOUNDED = [s for s in SPECS if s[0] in ("jsd0.1", "jsd0.5", "jsd0.9", "skew0.1", "skew0.5", "skew1.0",
                                          "skew_rev0.1", "skew_rev0.5", "skew_rev1.0", "tvd")]


def specs(which=SPECS, slow_beyond=None):
    """Parametrize over (name, options) of `which`; with slow_beyond, the specs not in it run with
    KDFAST_SLOW=1 only."""
    return pytest.mark.parametrize("name,options", [
        pytest.param(*s[1:], id=s[0], marks=pytest.mark.slow if slow_beyond is not None and s not in slow_beyond else ())
        for s in which])


def cases(*groups):
    """pytest params from groups of (specs, [extra argument tuples]): every spec of a group with
    every tuple of its group, ids spec-extra."""
    out = []
    for which, extras in groups:
        for _, name, options in which:
            sid = next(s[0] for s in SPECS if s[1] == name and s[2] == options)
            for extra in extras:
                out.append(pytest.param(name, options, *extra, id="-".join([sid, *map(str, extra)])))
    return out


def call(name, options, s, t, **kw):
    return getattr(kdfast, name)(s, t, **options, **kw)


def op_code(name, options):
    """(divergence, mix) of torch.ops.kdfast.softmax_kl for a spec."""
    if name == "generalized_jsd":
        return 2, options["beta"]
    if name == "reverse_kl_div":
        return 1, 0.0
    if name == "skew_kl_div":
        return (4 if options["reverse"] else 3), options["alpha"]
    return 5, 0.0


# ----------------------------------------------------------------------------- values and gradients

SHAPES = [(5, V) for V in (1, 2, 15, 16, 17, 31, 33, 100, 1000, 4099)] + [(0, 17), (2, 3, 33), (3, 0, 9)]


@specs()
def test_matches_reference(name, options):
    """Vector widths broken every way (V = 1 .. 4099), no rows, 3-D: values and both gradients."""
    for shape in SHAPES:
        try:
            out, gs, gt = check_kl(logits(*shape), logits(*shape), loss=name, options=options, temperature=2.0,
                                   reduction="batchmean", grad_teacher=True)
        except AssertionError as e:
            raise AssertionError(f"shape {shape}: {e}") from None
        if shape[-1] == 1:  # one outcome: P = Q = 1, nothing to diverge (a mixture 0.1 + 0.9 may round)
            assert 0 <= out <= 1e-6 and not gs.any() and not gt.any()


@specs()
@dtype_params()
def test_dtypes(name, options, dtype):
    check_kl(logits(6, 300, dtype=dtype), logits(6, 300, dtype=dtype), loss=name, options=options,
             temperature=1.5, reduction="sum", grad_teacher=True, upstream=0.7)


@pytest.mark.parametrize("name,options,ds,dt", cases(
    (SPECS, [(torch.bfloat16, torch.float32)]),
    (CORE, [(torch.float16, torch.float32), (torch.float32, torch.float64)])))
def test_mixed_dtypes(name, options, ds, dt):
    out, gs, gt = check_kl(logits(5, 300, dtype=ds), logits(5, 300, dtype=dt), loss=name, options=options,
                           temperature=2.0, reduction="mean", grad_teacher=True)
    assert gs.dtype == ds and gt.dtype == dt


@specs()
@pytest.mark.parametrize("temperature", [0.3, 4.0])
def test_temperatures(name, options, temperature):
    check_kl(logits(4, 500), logits(4, 500), loss=name, options=options, temperature=temperature,
             reduction="sum", grad_teacher=True)


@pytest.mark.parametrize("name,options,reduction,mask_kind", cases(
    (SPECS, [(r, "random") for r in REDUCTIONS]),
    (CORE, [(r, m) for r in REDUCTIONS for m in ("none", "all_false")])))
def test_reductions_and_masks(name, options, reduction, mask_kind):
    """3-D logits, every reduction with an upstream gradient other than 1 (a random tensor for
    "none", with a zero on a counted row), masks."""
    lead, V = (2, 5), 37
    mask = {"none": None, "random": torch.rand(lead) > 0.4, "all_false": torch.zeros(lead, dtype=torch.bool)}[mask_kind]
    if mask_kind == "random":
        mask[0, 0], mask[0, 1] = True, False  # both kinds present
    if reduction == "none":
        upstream = torch.randn(lead, dtype=torch.float64)
        upstream[0, 0] = 0.0
    else:
        upstream = -1.7
    out, gs, gt = check_kl(logits(*lead, V), logits(*lead, V), loss=name, options=options, temperature=1.7,
                           reduction=reduction, mask=mask, grad_teacher=True, upstream=upstream)
    if mask is not None:
        assert not gs[~mask].any() and not gt[~mask].any(), "masked rows must get no gradient"
        if reduction == "none":
            assert not out[~mask].any()
    if mask_kind == "all_false":
        assert not out.any()


def _rows_by_hand(name, options, s, t, temperature):
    """float64 per-row values from the probabilities, written out here (not kdfast.reference):
    the check that the reference and the kernels read beta and alpha the right way round."""
    p = torch.softmax(t.double() / temperature, -1)
    q = torch.softmax(s.double() / temperature, -1)

    def kl(a, b):
        return torch.where(a > 0, a * (a / b).log(), 0.0).sum(-1)  # (0 log 0 = 0)

    if name == "reverse_kl_div":
        return kl(q, p)
    if name == "tv_distance":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "generalized_jsd":
        b = options["beta"]
        if b == 0:
            return kl(p, q)
        if b == 1:
            return kl(q, p)
        m = b * p + (1 - b) * q
        return b * kl(p, m) + (1 - b) * kl(q, m)
    a = options["alpha"]
    if options["reverse"]:
        return kl(q, a * q + (1 - a) * p)
    return kl(p, a * p + (1 - a) * q)


@specs()
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_textbook_formulas(name, options, backend):
    """Both backends against the definitions of DESIGN.md section 5, written out in float64 here,
    every reduction read off the same rows (batchmean: / shape[0]; mean: / counted rows)."""
    kdfast.set_backend(backend)
    s, t = logits(2, 3, 50, dtype=torch.float64), logits(2, 3, 50, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    rows = _rows_by_hand(name, options, s, t, 1.3)
    for kw, want in [(dict(reduction="none"), rows), (dict(reduction="sum"), rows.sum()),
                     (dict(reduction="batchmean"), rows.sum() / 2), (dict(reduction="mean"), rows.sum() / 6),
                     (dict(reduction="mean", mask=mask), rows[mask].sum() / 5),
                     (dict(reduction="batchmean", mask=mask), rows[mask].sum() / 2)]:
        got = call(name, options, s, t, temperature=1.3, **kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14, msg=str(kw))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_beta_is_trls_convention(backend):
    """Small beta: JSD ~ beta KL(P||Q); beta near 1: JSD ~ (1 - beta) KL(Q||P) (trl #2202 swapped
    them). KL(P||Q) and KL(Q||P) differ by far more than the 1e-2 allowed here."""
    kdfast.set_backend(backend)
    # (a sharper teacher: KL(P||Q) and KL(Q||P) 12% apart; mild enough that the first-order terms
    # dominate at beta = 1e-4, to 0.2%)
    s, t = logits(16, 200, scale=0.5), logits(16, 200, scale=2.0)
    fwd = kdfast.softmax_kl_div(s.double(), t.double(), reduction="sum")
    rev = kdfast.softmax_kl_div(t.double(), s.double(), reduction="sum")
    assert relerr(fwd, rev) > 0.08
    eps = 1e-4
    assert relerr(kdfast.generalized_jsd(s, t, beta=eps, reduction="sum") / eps, fwd) < 1e-2
    assert relerr(kdfast.generalized_jsd(s, t, beta=1 - eps, reduction="sum") / eps, rev) < 1e-2
    # skew KL: alpha -> 0 is KL(P||Q) continuously (no clamp near the endpoint)
    assert relerr(kdfast.skew_kl_div(s, t, alpha=1e-6, reduction="sum"), fwd) < 1e-4
    assert relerr(kdfast.skew_kl_div(s, t, alpha=1e-6, reverse=True, reduction="sum"), rev) < 1e-4


# ----------------------------------------------------------------------------- long rows and layouts

@specs(slow_beyond=[s for s in CORE if s[0] != "reverse_kl"])  # (reverse KL: test_endpoints)
def test_split_path(name, options):
    """Few rows with V >= 65536 (the split path), a masked row, per-row upstream gradients."""
    mask = torch.tensor([True, False, True])
    check_kl(logits(3, 70001), logits(3, 70001), loss=name, options=options, temperature=1.5,
             reduction="none", mask=mask, grad_teacher=True,
             upstream=torch.tensor([0.5, 2.0, -1.5], dtype=torch.float64))


@specs(slow_beyond=[s for s in SPECS if s[0] in ("jsd0.5", "tvd")])
def test_long_rows(name, options):
    """2 x 600000: the split path over many chunks, values and both gradients."""
    check_kl(logits(2, 600000), logits(2, 600000), loss=name, options=options, temperature=2.0,
             reduction="batchmean", grad_teacher=True)


@pytest.mark.parametrize("name,options,layout,dtype", cases(
    (SPECS, [(lay, torch.float32) for lay in ("transposed", "row_step", "col_step", "expanded_teacher", "misaligned",
                                              "permuted_3d")]),
    (CORE, [(lay, torch.bfloat16) for lay in ("transposed", "expanded_teacher")])))
def test_non_contiguous(name, options, layout, dtype):
    """Transposed, sliced, misaligned, permuted 3-D, and a teacher broadcast with row stride 0."""
    s_shape, t_shape, fn = LAYOUTS[layout]
    check_kl(logits(*s_shape, dtype=dtype), logits(*t_shape, dtype=dtype), layout=fn, loss=name, options=options,
             temperature=1.3, reduction="sum", grad_teacher=True, upstream=0.7)


# ----------------------------------------------------------------------------- huge, -inf and NaN logits

@pytest.mark.parametrize("name,options,V,dtype", cases(
    (SPECS, [(300, torch.float32)]),
    (CORE, [(300, torch.bfloat16), (5000, torch.float32)])) + [
    pytest.param(*p.values, marks=pytest.mark.slow, id=p.id)
    for p in cases((SPECS, [(70001, torch.float32), (70001, torch.bfloat16)]))])
def test_logits_near_float_max(name, options, V, dtype):
    """Finite logits up to +-3e38 (6e38 apart), the maxima jumping late in the row: the float64
    values and gradients, inf exactly where float64 has inf (reverse KL at T = 1)."""
    s, t = extreme_logit_rows(V, dtype)
    out, gs, gt = check_kl(s, t, loss=name, options=options, temperature=1.0, reduction="none",
                           grad_teacher=True, value_tol=1e-4)
    if (name, options) in [s[1:] for s in BOUNDED]:
        assert torch.isfinite(out).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@specs()
@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_huge_logits(name, options, temperature):
    """Logits of +-1e30 (far beyond any exp): finite results equal to float64."""
    s = torch.randn(6, 300, dtype=torch.float64) * 1e30
    t = torch.randn(6, 300, dtype=torch.float64) * 1e30
    s[0], t[0] = 1e30, -1e30          # constant rows at each extreme: P, Q uniform
    s[1, ::2], t[1, 1::2] = 1e30, 1e30
    s[1, 1::2], t[1, ::2] = -1e30, -1e30
    s[2, 5] = t[2, 5] = 1e30          # the same winner on both sides
    out, gs, gt = check_kl(s.float(), t.float(), loss=name, options=options, temperature=temperature,
                           reduction="none", grad_teacher=True)
    if (name, options) in [sp[1:] for sp in BOUNDED]:
        assert torch.isfinite(out).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()


NEG_INF_KINDS = ["teacher", "student", "same", "different", "student_where_teacher_zero", "first_block",
                 "teacher_first_block", "only_last_finite", "mixed_rows"]


def _neg_inf(kind, V):
    if kind == "student":  # masked student vocabulary only (reverse KL's analogue of "teacher")
        t, s = _neg_inf_case("teacher", V)
        return s, t
    return _neg_inf_case(kind, V)


@pytest.mark.parametrize("name,options,kind,V", cases(
    (SPECS, [(k, 37) for k in NEG_INF_KINDS if "block" not in k]),
    (CORE, [(k, 5000) for k in NEG_INF_KINDS])))
def test_neg_inf_logits(name, options, kind, V):
    """-inf logits (masked vocabulary) in the teacher, the student, both: the float64 value where
    it is finite, inf where it is infinite (e.g. reverse KL where the teacher is -inf under the
    student's mass), finite gradients on the side the value is finite in."""
    s, t = _neg_inf(kind, V)
    out, gs, gt = check_kl(s, t, loss=name, options=options, temperature=1.5, reduction="none", grad_teacher=True)
    if (name, options) in [sp[1:] for sp in BOUNDED]:
        assert torch.isfinite(out).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    if name == "reverse_kl_div" and kind in ("teacher", "different"):
        assert (out == math.inf).all()
        assert torch.isfinite(gt).all()  # the teacher's side: P - Q, bounded whatever the value


@specs(BOUNDED + [s for s in SPECS if s[0] == "reverse_kl"])
@pytest.mark.parametrize("side", ["both", "student"])
def test_masked_entries_are_dropped(name, options, side):
    """-inf in both at the same entries equals dropping those entries (every kind); -inf in the
    student only equals dropping them from the student's softmax, against a P that still has mass
    there (written out here in float64, reverse KL and the bounded kinds)."""
    s, t = logits(4, 50, dtype=torch.float64), logits(4, 50, dtype=torch.float64)
    keep = torch.rand(50) > 0.3
    sm = s.clone()
    sm[:, ~keep] = NINF
    tm = t.clone()
    if side == "both":
        tm[:, ~keep] = NINF
        got = call(name, options, sm.float(), tm.float(), reduction="none")
        want = call(name, options, s[:, keep].float(), t[:, keep].float(), reduction="none")
        assert relerr(got, want) < 1e-5
        return
    got = call(name, options, sm.float(), t.float(), reduction="none")
    assert relerr(got, _rows_by_hand(name, options, sm, t, 1.0)) < 1e-5


@pytest.mark.parametrize("name,options,side", [
    pytest.param(*s[1:], side, id=f"{s[0]}-{side}") for s in SPECS for side in ("student", "teacher")])
def test_all_neg_inf_row(name, options, side):
    """A row whose logits are all -inf has no softmax (0/0): NaN value and gradients in that row,
    as float64 (and the KL kernel) give, nothing in the others."""
    s, t = logits(3, 40), logits(3, 40)
    (s if side == "student" else t)[1] = NINF
    sg, tg = s.clone().requires_grad_(), t.clone().requires_grad_()
    rows = call(name, options, sg, tg, reduction="none")
    rows.sum().backward()
    assert getattr(ref, name)(s.double(), t.double(), reduction="none", **options)[1].isnan()
    assert rows[1].isnan() and torch.isfinite(rows[[0, 2]]).all()
    assert sg.grad[1].isnan().all() and tg.grad[1].isnan().all()


@pytest.mark.parametrize("name,options,where,V", cases(
    (SPECS, [(w, 33) for w in ("student_body", "student_tail", "teacher_body", "teacher_tail")]),
    (CORE, [(w, V) for V in (5000, 70001) for w in ("student_tail", "teacher_body")])))
def test_nan_propagates(name, options, where, V):
    """A NaN logit gives its row a NaN loss and NaN gradients (both sides), no other row anything
    but finite numbers, and every reduction a NaN."""
    s, t = logits(3, V), logits(3, V)
    pos = 3 if where.endswith("body") else V - 1
    student_nan = where.startswith("student")
    (s if student_nan else t)[1, pos] = math.nan
    sg, tg = s.clone().requires_grad_(), t.clone().requires_grad_()
    rows = call(name, options, sg, tg, reduction="none")
    (rows * torch.tensor([1.0, 0.5, -2.0])).sum().backward()
    # (skew KL at alpha = 1 is KL(P || P) = 0, but a NaN student still shows, as M = 1 P + 0 Q)
    assert rows[1].isnan(), "NaN in a logit must give a NaN loss for its row"
    assert torch.isfinite(rows[[0, 2]]).all(), "NaN must not leak into other rows"
    for reduction in ("sum", "mean", "batchmean"):
        assert call(name, options, s, t, reduction=reduction).isnan()
    for g in (sg.grad, tg.grad):
        assert torch.isfinite(g[[0, 2]]).all(), "NaN gradient outside the NaN row"
    one_sided = name == "skew_kl_div" and options["alpha"] == 1.0  # (the other side has no gradient)
    for g, nan_side in ((sg.grad, student_nan), (tg.grad, not student_nan)):
        if nan_side or not one_sided:
            assert g[1].isnan().all(), "the NaN row's gradient must be NaN throughout"


# ----------------------------------------------------------------------------- never negative

@specs()
@dtype_params()
def test_equal_inputs_give_zero(name, options, dtype):
    """student == teacher: 0 up to rounding, never below; gradients ~0."""
    s = logits(8, 1000, dtype=dtype)
    sg, tg = s.clone().requires_grad_(), s.clone().requires_grad_()
    out = call(name, options, sg, tg, temperature=1.3, reduction="none")
    out.sum().backward()
    assert (out >= 0).all(), out.min()
    assert (out <= 1e-6).all(), out.max()
    assert sg.grad.double().abs().max() <= 1e-5 and tg.grad.double().abs().max() <= 1e-5


@specs()
def test_never_negative_bf16_student_fp32_teacher(name, options):
    """ms-swift #10156: a bf16 student against an fp32 teacher close to it (the rounding of the
    student is the whole difference), many random rows and scales: every row >= 0."""
    gen = torch.Generator().manual_seed(7)
    mins = []
    for scale in (0.1, 1.0, 5.0, 30.0):
        for V in (17, 1000, 4099):
            s = (torch.randn(64, V, generator=gen) * scale).to(torch.bfloat16)
            t = s.float() + torch.randn(64, V, generator=gen) * scale * 1e-3
            t[:8] = s[:8].float()  # some rows exactly equal in value, different in dtype
            mins.append(call(name, options, s, t, reduction="none").min())
    assert min(mins) >= 0, min(mins)


# ----------------------------------------------------------------------------- determinism

@specs(CORE)
@pytest.mark.parametrize("shape", [(64, 1000), (3, 70001)], ids=["row_path", "split_path"])
@dtype_params((torch.float32, torch.bfloat16))
def test_deterministic(name, options, shape, dtype):
    """Two forward+backward calls give the same bits, at 2 threads and at 1; 1 versus 2 threads
    agree to rounding (as the KL kernels, tests/test_isa.py)."""
    s, t = logits(*shape, dtype=dtype), logits(*shape, dtype=dtype)

    def run():
        s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
        out = call(name, options, s1, t1, temperature=2.0, reduction="none")
        (out * 0.5).sum().backward()
        return out.detach(), s1.grad, t1.grad

    results = {}
    for n in (2, 1, 2, 1):
        torch.set_num_threads(n)
        r = run()
        if n in results:
            assert all(same_bits(a, b) for a, b in zip(r, results[n])), f"{n} threads not deterministic"
        results[n] = r
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for a, b in zip(results[1], results[2]):
        assert relerr(a, b) < tol


# ----------------------------------------------------------------------------- endpoint identities

def _value_and_grads(fn, s, t, **kw):
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = fn(s1, t1, **kw)
    (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum().backward()
    return out.detach(), s1.grad, t1.grad


@pytest.mark.parametrize("shape", [(5, 77), (2, 70001)], ids=["row_path", "split_path"])
@dtype_params((torch.float32, torch.bfloat16, torch.float64))
def test_endpoints(shape, dtype):
    """TRL's endpoints exactly, bit for bit where the op computes the same thing: jsd(beta=0) and
    skew(alpha=0) are softmax_kl_div; jsd(beta=1) and skew reverse(alpha=0) are reverse_kl_div,
    whose value is softmax_kl_div with the arguments swapped; skew(alpha=1) is 0 with zero
    gradients, in both directions."""
    s, t = logits(*shape, dtype=dtype), logits(*shape, dtype=dtype)
    kw = dict(temperature=1.7, reduction="none")
    kl = _value_and_grads(kdfast.softmax_kl_div, s, t, **kw)
    rkl = _value_and_grads(kdfast.reverse_kl_div, s, t, **kw)
    for got, want in [(_value_and_grads(kdfast.generalized_jsd, s, t, beta=0.0, **kw), kl),
                      (_value_and_grads(kdfast.skew_kl_div, s, t, alpha=0.0, **kw), kl),
                      (_value_and_grads(kdfast.generalized_jsd, s, t, beta=1, **kw), rkl),
                      (_value_and_grads(kdfast.skew_kl_div, s, t, alpha=0, reverse=True, **kw), rkl)]:
        assert all(same_bits(a, b) for a, b in zip(got, want))
    swapped = _value_and_grads(kdfast.softmax_kl_div, t, s, **kw)
    assert same_bits(rkl[0], swapped[0])
    assert same_bits(rkl[1], swapped[2]) and same_bits(rkl[2], swapped[1])
    for reverse in (False, True):
        out, gs, gt = _value_and_grads(kdfast.skew_kl_div, s, t, alpha=1.0, reverse=reverse, **kw)
        assert out.abs().max() <= 1e-6 and gs.abs().max() <= 1e-6 and gt.abs().max() <= 1e-6


@dtype_params()
def test_tvd_range(dtype):
    """TVD per row in [0, 1]: 0 for equal rows, 1 for disjoint supports, in between otherwise."""
    s, t = logits(6, 200, dtype=dtype, scale=10.0), logits(6, 200, dtype=dtype, scale=10.0)
    s[0, :100], t[0, 100:] = NINF, NINF     # disjoint supports
    s[1] = t[1]
    s[2, 0], t[2, 1] = 1e4, 1e4             # one-hot on different entries
    out = kdfast.tv_distance(s, t, reduction="none")
    assert ((out >= 0) & (out <= 1 + 1e-6)).all(), out  # (sums of probabilities round)
    assert abs(out[0] - 1) <= 1e-6 and out[1] == 0 and abs(out[2] - 1) <= 1e-6
    assert (out[3:] > 0.05).all() and (out[3:] < 1).all()


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("fn,arg", [(kdfast.generalized_jsd, "beta"), (kdfast.skew_kl_div, "alpha"),
                                    (ref.generalized_jsd, "beta"), (ref.skew_kl_div, "alpha")],
                         ids=["jsd", "skew", "ref_jsd", "ref_skew"])
@pytest.mark.parametrize("value,error", [(-0.1, ValueError), (1.5, ValueError), (math.nan, ValueError),
                                         (math.inf, ValueError), (-1e-300, ValueError), (True, TypeError),
                                         ("0.5", TypeError), (None, TypeError), (torch.tensor([0.5, 0.5]), TypeError)],
                         ids=["neg", "above1", "nan", "inf", "tiny_neg", "bool", "str", "none", "tensor"])
def test_bad_mix_raises(fn, arg, value, error):
    s, t = logits(2, 5), logits(2, 5)
    with pytest.raises(error, match=arg):
        fn(s, t, **{arg: value})


@pytest.mark.parametrize("module,arg", [(kdfast.nn.GeneralizedJSDLoss, "beta"), (kdfast.nn.SkewKLDivLoss, "alpha")])
def test_module_bad_mix_raises(module, arg):
    s, t = logits(2, 5), logits(2, 5)
    with pytest.raises(ValueError, match=arg):
        module(**{arg: 1.5})(s, t)


@specs([s for s in SPECS if s[0] in ("jsd0.5", "reverse_kl", "skew0.1", "tvd")])
def test_shared_argument_errors(name, options):
    """The rest of section 2's bad input for the new functions, each naming its argument."""
    s, t = logits(2, 5), logits(2, 5)
    for kw, error, match in [(dict(temperature=0.0), ValueError, "temperature"),
                             (dict(temperature=math.nan), ValueError, "temperature"),
                             (dict(reduction="avg"), ValueError, "reduction"),
                             (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask")]:
        with pytest.raises(error, match=match):
            call(name, options, s, t, **kw)
    with pytest.raises((ValueError, TypeError), match="teacher|shape"):
        call(name, options, s, logits(2, 6))
    with pytest.raises(TypeError):
        call(name, options, s.long(), t)
    with pytest.raises(ValueError):
        call(name, options, logits(2, 0), logits(2, 0))


@pytest.mark.parametrize("divergence,mix,match", [(6, 0.0, "divergence"), (-1, 0.0, "divergence"),
                                                  (100, 0.5, "divergence"), (2, 1.5, "mix"), (3, -0.5, "mix"),
                                                  (2, math.nan, "mix"), (4, math.inf, "mix")])
def test_direct_op_bad_divergence_or_mix(divergence, mix, match):
    s, t = torch.randn(3, 8), torch.randn(3, 8)
    w = torch.ones(3)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.kdfast.softmax_kl(s, t, 1.0, divergence, mix, w, True, True)


# ----------------------------------------------------------------------------- modules

MODULES = [
    (kdfast.nn.GeneralizedJSDLoss, dict(beta=0.3, temperature=2.0, reduction="sum"),
     "GeneralizedJSDLoss(beta=0.3, temperature=2.0, reduction='sum')", "generalized_jsd"),
    (kdfast.nn.ReverseKLDivLoss, dict(temperature=0.5, reduction="mean"),
     "ReverseKLDivLoss(temperature=0.5, reduction='mean')", "reverse_kl_div"),
    (kdfast.nn.SkewKLDivLoss, dict(alpha=0.25, reverse=True, temperature=1.5, reduction="none"),
     "SkewKLDivLoss(alpha=0.25, reverse=True, temperature=1.5, reduction='none')", "skew_kl_div"),
    (kdfast.nn.TVDistanceLoss, dict(temperature=3.0, reduction="batchmean"),
     "TVDistanceLoss(temperature=3.0, reduction='batchmean')", "tv_distance"),
]


@pytest.mark.parametrize("cls,kwargs,text,fn", MODULES, ids=[m[0].__name__ for m in MODULES])
def test_modules(cls, kwargs, text, fn):
    """Each module equals its function (values and gradients, with a mask), has a repr that
    shows its settings, and the defaults of its function (beta 0.5, alpha 0.1, T 1, batchmean)."""
    module = cls(**kwargs)
    assert repr(module) == text
    s, t = logits(3, 4, 40), logits(3, 4, 40)
    mask = torch.rand(3, 4) > 0.3
    got = _value_and_grads(lambda a, b: module(a, b, mask=mask), s, t)
    want = _value_and_grads(lambda a, b: getattr(kdfast, fn)(a, b, mask=mask, **kwargs), s, t)
    assert all(same_bits(a, b) for a, b in zip(got, want))
    assert same_bits(cls()(s, t), getattr(kdfast, fn)(s, t))
    assert cls().reduction == "batchmean" and cls().temperature == 1.0
    assert getattr(cls(), "beta", 0.5) == 0.5 and getattr(cls(), "alpha", 0.1) == 0.1


# ----------------------------------------------------------------------------- gradcheck, opcheck, autograd

@pytest.mark.parametrize("name,options,reduction", cases((SPECS, [("none",)]), (CORE, [("mean",)])))
def test_gradcheck(name, options, reduction):
    s = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 1] = False
    assert torch.autograd.gradcheck(
        lambda a, b: call(name, options, a, b, temperature=1.7, reduction=reduction, mask=mask), (s, t),
        check_batched_grad=False)


def test_gradcheck_non_contiguous_expanded_teacher():
    s = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 7, dtype=torch.float64, requires_grad=True)
    for _, name, options in CORE:
        assert torch.autograd.gradcheck(
            lambda a, b: call(name, options, a.t(), b.expand(4, 7), temperature=2.0, reduction="none"), (s, t),
            check_batched_grad=False)


# (divergence, mix, shape, dtype, flags): every divergence 1..5 with both gradients, and the other
# shapes, dtypes and flags spread over them (opcheck is slow: ~0.1 s a call on idle cores).
OPCHECK = [(d, m, (3, 17), torch.float32, (True, True)) for d, m in ((1, 0.0), (2, 0.5), (3, 0.1), (4, 0.5), (5, 0.0))]
OPCHECK += [(2, 1.0, (3, 17), torch.float32, (False, False)), (3, 1.0, (3, 17), torch.float32, (False, True)),
            (2, 0.1, (5, 300), torch.float64, (True, True)), (4, 0.5, (3, 40), torch.bfloat16, (True, True)),
            (5, 0.0, (1, 1), torch.float32, (True, True)), (3, 0.5, (0, 8), torch.float32, (True, True))]


@pytest.mark.parametrize("divergence,mix,shape,dtype,flags", OPCHECK + [
    pytest.param(d, 0.5, (2, 70001), torch.float32, (True, True), marks=pytest.mark.slow) for d in (2, 3, 4, 5)])
def test_opcheck_softmax_kl(divergence, mix, shape, dtype, flags):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(shape[0], dtype=acc) + 0.1
    if shape[0] > 1:
        w[1] = 0  # a skipped row
    args = (torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype), 0.5, divergence, mix, w, *flags)
    torch.library.opcheck(torch.ops.kdfast.softmax_kl.default, args)
    if flags == (True, True):
        torch.library.opcheck(torch.ops.kdfast.softmax_kl.default, args + (0.25,))


@specs()
def test_op_semantics(name, options):
    """The raw op: the unweighted divergence per row (0 where row_weight is 0) and
    row_weight * dD/dinput, against the float64 reference."""
    divergence, mix = op_code(name, options)
    s, t = torch.randn(4, 50, dtype=torch.float64), torch.randn(4, 50, dtype=torch.float64)
    w = torch.tensor([1.0, 0.0, 2.5, -0.5], dtype=torch.float64)
    rows, gs, gt = torch.ops.kdfast.softmax_kl(s, t, 0.5, divergence, mix, w, True, True)
    sd, td = s.clone().requires_grad_(), t.clone().requires_grad_()
    want = getattr(ref, name)(sd, td, temperature=2.0, reduction="none", **options)
    torch.testing.assert_close(rows, torch.where(w != 0, want.detach(), 0.0))
    (want * w).sum().backward()
    torch.testing.assert_close(gs, sd.grad if sd.grad is not None else torch.zeros_like(s))
    torch.testing.assert_close(gt, td.grad if td.grad is not None else torch.zeros_like(t))


@specs()
def test_create_graph(name, options):
    """create_graph=True: first-order gradients with a graph (through the reference row formulas),
    second-order gradients equal to the reference backend's. (Native against reference only: the
    reference against itself could not fail.)"""
    def run(backend):
        kdfast.set_backend(backend)
        s = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
        t = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).requires_grad_()
        out = call(name, options, s, t, temperature=1.5, reduction="none")
        gs, gt = torch.autograd.grad((out * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum() * 3.0,
                                     [s, t], create_graph=True, allow_unused=True)
        gs = torch.zeros_like(s) if gs is None else gs
        gt = torch.zeros_like(t) if gt is None else gt
        second = torch.autograd.grad((gs * gs).sum() + (gt * gt.sin()).sum(), [s, t], allow_unused=True)
        return [gs, gt] + [torch.zeros_like(s) if g is None else g for g in second]
    got, want = run("native"), run("reference")
    for a, b in zip(got, want):
        assert relerr(a.detach(), b.detach()) < 1e-10


@specs(CORE)
def test_backward_twice_and_upstream_rescale(name, options):
    """retain_graph: a second backward recomputes; an upstream factor other than the predicted
    one rescales (or recomputes) the gradient buffers: both as from scratch."""
    s, t = logits(4, 70), logits(4, 70)
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = call(name, options, s1, t1, reduction="none")
    loss = (out * torch.arange(1.0, 5.0)).sum()
    loss.backward(retain_graph=True)
    g_s, g_t = s1.grad.clone(), t1.grad.clone()
    loss.backward()
    torch.testing.assert_close(s1.grad, 2 * g_s, rtol=1e-6, atol=0)
    torch.testing.assert_close(t1.grad, 2 * g_t, rtol=1e-6, atol=0)
    for factor in (0.3, 0.3, 0.3, 2.0):  # the second 0.3 is predicted, 2.0 then is not
        s2 = s.clone().requires_grad_()
        (call(name, options, s2, t) * factor).backward()
        sd = s.double().requires_grad_()
        (getattr(ref, name)(sd, t.double(), **options) * factor).backward()
        assert relerr(s2.grad, sd.grad) < 1e-5, factor


@specs(CORE)
def test_inputs_unchanged(name, options):
    s, t = logits(5, 300), logits(5, 300)
    mask = torch.tensor([True, True, False, True, True])
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = call(name, options, s1, t1, mask=mask, reduction="none")
    (out * torch.randn(5)).sum().backward()
    assert same_bits(s1.detach(), s) and same_bits(t1.detach(), t)
    assert mask.tolist() == [True, True, False, True, True]


# ----------------------------------------------------------------------------- slow (KDFAST_SLOW=1)

@pytest.mark.slow
@specs()
def test_random_sweep(name, options):
    """Random shapes, V, temperatures, dtypes, reductions, masks and layouts."""
    gen = torch.Generator().manual_seed(4321)

    def rint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    for i in range(40):
        dtype = dtypes[rint(0, 3)]
        V = [1, rint(2, 40), rint(41, 3000), rint(65536, 140000)][rint(0, 3)]
        lead = (rint(1, 4),) if V > 3000 else [(rint(0, 9),), (rint(1, 3), rint(0, 5))][rint(0, 1)]
        T = float(torch.empty(1).uniform_(-2, 3, generator=gen).exp())
        reduction = REDUCTIONS[rint(0, 3)]
        mask = (torch.rand(lead, generator=gen) > 0.3) if rint(0, 1) else None
        s, t = logits(*lead, V, dtype=dtype), logits(*lead, V, dtype=dtype)
        try:
            check_kl(s, t, loss=name, options=options, temperature=T, reduction=reduction, mask=mask,
                     grad_teacher=bool(rint(0, 1)), upstream=0.7)
        except AssertionError as e:
            raise AssertionError(f"case {i}: {dtype} lead={lead} V={V} T={T:.4g} {reduction} "
                                 f"mask={mask is not None}: {e}") from None


def test_reference_unknown_divergence():
    """reference.divergence_rows names the divergences it knows when given another."""
    s = torch.randn(2, 5)
    with pytest.raises(ValueError, match="divergence must be one of"):
        ref.divergence_rows(s, s.clone(), 1.0, "hellinger", 0.5)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_skew_alpha_one_nan_row_gives_nan_gradients(backend, reverse):
    """Skew KL at alpha = 1 is KL(P||P) = 0 whatever the other side, but a row without mass on the
    mixing side is NaN, and a NaN row sends NaN to both sides, as at every alpha < 1 (the reference
    gave it zero gradients); the other rows get exact zeros."""
    if backend == "native" and not kdfast.native_available():
        pytest.skip("native extension not built")
    kdfast.set_backend(backend)
    ni = -math.inf
    mixing = torch.tensor([[0.3, ni, 2.0], [ni, ni, ni]], dtype=torch.float64)
    other = torch.tensor([[ni, 2.4, 11.0], [1.0, 7.3, ni]], dtype=torch.float64)
    s, t = (mixing, other) if reverse else (other, mixing)
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = kdfast.skew_kl_div(s, t, alpha=1.0, reverse=reverse, reduction="none")
    out.sum().backward()
    assert out[0] == 0 and out[1].isnan()
    for g in (s.grad, t.grad):
        assert (g[0] == 0).all() and g[1].isnan().all(), g
