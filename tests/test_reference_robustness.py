"""The pure-PyTorch reference (the fallback backend and the tests' oracle) is no weaker than the
native kernels where the inputs are awkward: masked-out rows holding NaN or -inf, relation ops at
eps = 0 (the square root at 0 on the diagonal, duplicate points), cosine rows whose squared norm
overflows fp32. Each case is checked against float64 expectations and against the native op."""
import math

import pytest
import torch

import kdfast
from kdfast import reference as ref
from conftest import GRAD_TOL, VALUE_TOL, needs_native, relerr


def _run(fn, *xs, **kw):
    """fn(*xs, **kw) on leaf copies: (value, [gradient of each x]) with the value summed (times a
    fixed upstream for per-row outputs) for backward."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*leaves, **kw)
    up = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape).to(out.dtype)
    (out * up).sum().backward()
    return out.detach(), [x.grad for x in leaves]


# ----------------------------------------------------------------------------- masked rows

def _poisoned_rows(dtype):
    """Logits (3, 4, 7) whose rows 1 and 4..6 (flattened) hold NaN, all -inf or -inf beside NaN,
    and a mask that leaves exactly those rows out."""
    s = torch.randn(3, 4, 7, dtype=torch.float64) * 2
    t = torch.randn(3, 4, 7, dtype=torch.float64) * 2
    mask = torch.ones(3, 4, dtype=torch.bool)
    bad = [(0, 1), (1, 0), (1, 1), (1, 2)]
    s[0, 1, 3] = math.nan                        # NaN in the student
    t[1, 0, :] = -math.inf                       # a teacher row all -inf (p_t is NaN)
    s[1, 1, :] = -math.inf                       # a student row all -inf
    t[1, 2, 0], s[1, 2, 5] = math.nan, -math.inf  # both at once
    for i, j in bad:
        mask[i, j] = False
    return s.to(dtype), t.to(dtype), mask, bad


@pytest.mark.parametrize("kd", [False, True], ids=["softmax_kl_div", "kd_loss"])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_reference_masked_rows_with_nan_get_zero_gradient(kd, reduction, dtype):
    """A row the mask leaves out adds nothing and gets an exact zero gradient on both sides, whatever
    it holds; the other rows equal the float64 answer on clean values. (The reference used to zero
    the KL after computing it, and log_softmax's backward turned a NaN row's zero into NaN.)"""
    fn = ref.kd_loss if kd else ref.softmax_kl_div
    kw = dict(temperature=2.0, reduction=reduction)
    s, t, mask, bad = _poisoned_rows(dtype)
    out, (gs, gt) = _run(fn, s, t, mask=mask, **kw)

    # float64 expectation: the same rows with finite values in the left-out rows
    clean_s, clean_t = s.double(), t.double()
    for i, j in bad:
        clean_s[i, j] = torch.randn(7, dtype=torch.float64)
        clean_t[i, j] = torch.randn(7, dtype=torch.float64)
    want, (ws, wt) = _run(fn, clean_s, clean_t, mask=mask, **kw)
    assert torch.isfinite(want).all() and torch.isfinite(ws).all() and torch.isfinite(wt).all()
    assert torch.isfinite(out).all(), out
    for g in (gs, gt):
        assert torch.isfinite(g).all(), "NaN gradient from a masked-out row"
        for i, j in bad:
            assert torch.equal(g[i, j], torch.zeros_like(g[i, j]))
    assert relerr(out, want) <= VALUE_TOL[dtype]
    assert relerr(gs, ws) <= GRAD_TOL[dtype] and relerr(gt, wt) <= GRAD_TOL[dtype]
    if reduction == "none":
        assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))


@needs_native
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "none"])
def test_reference_masked_nan_rows_match_native(reduction):
    s, t, mask, _ = _poisoned_rows(torch.float32)
    kw = dict(temperature=2.0, reduction=reduction, mask=mask)
    kdfast.set_backend("native")
    out_n, g_n = _run(kdfast.kd_loss, s, t, **kw)
    out_r, g_r = _run(ref.kd_loss, s, t, **kw)
    assert relerr(out_r, out_n) <= 1e-5
    for a, b in zip(g_r, g_n):
        assert torch.isfinite(b).all()
        assert relerr(a, b) <= 1e-5


# ----------------------------------------------------------------------------- relation ops at eps = 0

def _points(duplicates, B=None):
    shape = (6, 5) if B is None else (B, 6, 5)
    s = torch.randn(*shape, dtype=torch.float64)
    t = torch.randn(*shape[:-1], 3, dtype=torch.float64)
    if duplicates:
        s[..., 4, :] = s[..., 1, :]
        t[..., 2, :] = t[..., 0, :]
    return s, t


# name -> (f, eps) -> the op of module f (kdfast or kdfast.reference) on (student[, teacher]); inputs
RELATION_CASES = {
    "pairwise_distances": (lambda f, eps: lambda x: f.pairwise_distances(x, eps=eps), 1),
    "pairwise_distances_raw": (lambda f, eps: lambda x: f.pairwise_distances(x, normalize=False, eps=eps), 1),
    "rkd_distance_loss": (lambda f, eps: lambda s, t: f.rkd_distance_loss(s, t, eps=eps), 2),
    "rkd_angle_loss": (lambda f, eps: lambda s, t: f.rkd_angle_loss(s, t, eps=eps), 2),
}


@pytest.mark.parametrize("case", list(RELATION_CASES))
@pytest.mark.parametrize("B", [None, 2])
def test_reference_relation_ops_eps_zero_finite_gradients(case, B):
    """eps = 0: sqrt'(0) = inf on the diagonal (and 0/0 in the angle's unit vectors) gave NaN
    gradients to every point. For distinct points eps = 0 and eps = 1e-300 are the same function (no
    off-diagonal distance is near either clamp), so the latter is the float64 expectation."""
    op, n_in = RELATION_CASES[case]
    args = _points(False, B)[:n_in]
    out, grads = _run(op(ref, 0.0), *args)
    want, wgrads = _run(op(ref, 1e-300), *args)
    for g, w in zip(grads, wgrads):
        assert torch.isfinite(g).all(), f"{case}: non-finite gradient at eps = 0"
        assert relerr(g, w) <= 1e-12
    assert relerr(out, want) <= 1e-12


@needs_native
@pytest.mark.parametrize("case", list(RELATION_CASES))
@pytest.mark.parametrize("duplicates", [False, True], ids=["distinct", "duplicates"])
def test_reference_relation_ops_eps_zero_match_native(case, duplicates):
    """The same at eps = 0 against the native op, also with duplicate points (a zero distance off the
    diagonal: value 0, zero gradient through it, as the native op)."""
    op, n_in = RELATION_CASES[case]
    args = _points(duplicates)[:n_in]
    kdfast.set_backend("native")
    out_r, g_r = _run(op(ref, 0.0), *args)
    out_n, g_n = _run(op(kdfast, 0.0), *args)
    assert relerr(out_r, out_n) <= 1e-12
    for a, b in zip(g_r, g_n):
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert relerr(a, b) <= 1e-12


def _pdist_off_diagonal(x, normalize):
    """(N, D) -> (N, N) distances whose norms are taken of the off-diagonal differences only (no
    norm of a zero vector anywhere), so that every derivative is the textbook one for distinct points."""
    n = x.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    d = torch.zeros(n, n, dtype=x.dtype).masked_scatter(off, (x.unsqueeze(1) - x.unsqueeze(0))[off].norm(dim=-1))
    return d / d[off].mean() if normalize else d


@pytest.mark.parametrize("eps", [0.0, 1e-12])
@pytest.mark.parametrize("normalize", [False, True])
def test_reference_pairwise_distances_second_order(eps, normalize):
    """create_graph=True through the reference distances (the native op's double backward recomputes
    through it): the diagonal's zero differences must not turn the second-order gradient into NaN (the
    norm of a zero vector has 0/0 second derivatives, hence the stand-in in _pdist). Distinct points,
    against norms taken of the off-diagonal differences alone."""
    x0 = torch.randn(6, 4, dtype=torch.float64)
    U, R = torch.randn(6, 6, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)

    def second_order(f):
        x = x0.clone().requires_grad_()
        (g,) = torch.autograd.grad((f(x) * U).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad((g * R).sum(), x)
        return h

    got = second_order(lambda x: ref.pairwise_distances(x, normalize=normalize, eps=eps))
    want = second_order(lambda x: _pdist_off_diagonal(x, normalize))
    assert torch.isfinite(got).all(), "non-finite second-order gradient"
    assert relerr(got, want) <= 1e-12


# ----------------------------------------------------------------------------- cosine rows that overflow

def _huge_rows(dtype):
    """Rows whose squared norm overflows the dtype (values up to 3e38 in fp32), beside ordinary ones,
    in (5, 9) with student and teacher taking turns to be the huge one."""
    big = 3e38 if dtype == torch.float32 else 1e305
    s = torch.randn(5, 9, dtype=torch.float64)
    t = torch.randn(5, 9, dtype=torch.float64)
    s[0] *= big / 4
    t[1] *= big / 4
    s[2] *= big / 4
    t[2] *= big / 4
    s[3, 0] = big  # one element near the top of the range, the rest ordinary
    s, t = s.clamp(-big, big), t.clamp(-big, big)
    return s.to(dtype), t.to(dtype)


def _cosine_float64_exact(s, t):
    """1 - cos per row and its gradients, from float64 copies scaled by each row's largest magnitude
    (exact powers of two: no rounding), so that no sum overflows."""
    def scaled(x):
        x = x.detach().double()
        m = torch.exp2(torch.floor(torch.log2(x.abs().amax(-1, keepdim=True))))
        return x / m, m

    (sd, ms), (td, mt) = scaled(s), scaled(t)
    sd.requires_grad_(), td.requires_grad_()
    out = 1 - (sd * td).sum(-1) / (sd.norm(dim=-1) * td.norm(dim=-1))
    up = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64)
    (out * up).sum().backward()
    return out.detach(), [sd.grad / ms, td.grad / mt]  # d/dx f(x / m) = f'(x / m) / m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_reference_cosine_rescales_overflowing_rows(dtype):
    """F.cosine_similarity takes an overflowing norm as inf and gives cosine 0 (loss 1, gradient 0);
    the reference rescales such rows, as the native op does, and matches float64."""
    s, t = _huge_rows(dtype)
    assert torch.isinf((s * s).sum(-1)[[0, 2, 3]]).all() and torch.isinf((t * t).sum(-1)[[1, 2]]).all()
    want, (ws, wt) = _cosine_float64_exact(s, t)
    out, (gs, gt) = _run(ref.cosine_loss, s, t, reduction="none")
    assert relerr(out, want) <= VALUE_TOL[dtype] * 10, (out, want)
    for g, w in ((gs, ws), (gt, wt)):
        for r in range(5):  # row by row: the gradients of huge rows are tiny beside the others
            assert relerr(g[r], w[r]) <= GRAD_TOL[dtype] * 10, (r, g[r], w[r])


@needs_native
def test_reference_cosine_overflowing_rows_match_native():
    s, t = _huge_rows(torch.float32)
    kdfast.set_backend("native")
    out_n, g_n = _run(kdfast.cosine_loss, s, t, reduction="none")
    out_r, g_r = _run(ref.cosine_loss, s, t, reduction="none")
    assert relerr(out_r, out_n) <= 1e-5
    for a, b in zip(g_r, g_n):
        for r in range(5):
            assert relerr(a[r], b[r]) <= 1e-5, (r, a[r], b[r])


# ----------------------------------------------------------------------------- distances from differences

def _far_cluster(dtype, B=None):
    """A tight cluster (spread 1e-3) beside far points, away from the origin, with exact duplicates."""
    x = torch.randn(*(() if B is None else (B,)), 9, 4, dtype=torch.float64) * 1e-3 + 500.0
    x[..., 0, :] += 1e3
    x[..., 5, :] = x[..., 2, :]
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("squared", [False, True])
def test_reference_distances_exact_far_from_cluster(dtype, squared):
    """The reference's distances come from coordinate differences: duplicates give exactly 0 (then
    the eps clamp), and a cluster far from other points (and from the origin) keeps its small
    distances. The Gram form |x_i|^2 + |x_j|^2 - 2 <x_i, x_j> gave 1e-8-sized noise for the
    duplicates in float64 (so psi counted them as positive) and lost the cluster in float32."""
    x = _far_cluster(dtype, B=2)
    want = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist")
    want = want * want if squared else want
    got = ref.pairwise_distances(x, squared=squared, normalize=False, eps=0.0)
    assert torch.equal(got[..., 2, 5], torch.zeros_like(got[..., 2, 5]))
    cluster = [1, 2, 3, 4, 6, 7, 8]  # the small distances, one by one
    sub = got[..., cluster, :][..., cluster].double()
    exp = want[..., cluster, :][..., cluster]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert ((sub - exp).abs() <= tol * exp.abs() + 1e-300).all()


@needs_native
def test_reference_distances_duplicates_far_from_origin_match_native():
    """float64 duplicates far from the origin: psi's mean over positive distances leaves them out on
    both sides (it counted the Gram noise in the reference)."""
    x = _far_cluster(torch.float64)
    kdfast.set_backend("native")
    out_n, (g_n,) = _run(kdfast.pairwise_distances, x)
    out_r, (g_r,) = _run(ref.pairwise_distances, x)
    assert relerr(out_r, out_n) <= 1e-9
    assert relerr(g_r, g_n) <= 1e-6


# ----------------------------------------------------------------------------- feature_l2 over mixed dtypes

@pytest.mark.parametrize("backend", ["reference", "native"])
def test_feature_l2_mixed_dtypes_sums_in_the_widest(backend):
    """Pairs of different dtypes: the total is float64 and no float64 term is rounded to the first
    term's float32 on the way (a 1e297 term became inf, a small one lost its digits). Found by
    tests/fuzz/fuzz_losses.py; native failed too until kdfast.functional summed with promotion."""
    prev = kdfast.get_backend()
    kdfast.set_backend(backend)
    try:
        _mixed_dtypes_checks(ref.feature_l2 if backend == "reference" else kdfast.feature_l2)
    finally:
        kdfast.set_backend(prev)


def _mixed_dtypes_checks(feature_l2):
    a32, b32 = torch.randn(4, 5), torch.randn(4, 5)
    big = torch.randn(3, dtype=torch.float64) * 1e148
    small = torch.tensor([1.0 + 1e-12, 2.0], dtype=torch.float64)
    for second, want2 in ((big, (big * big).sum()), (small, (small * small).sum())):
        got = feature_l2([a32, second], [b32, torch.zeros_like(second)], reduction="sum")
        want = ((a32.double() - b32.double()) ** 2).sum() + want2
        assert got.dtype == torch.float64
        assert torch.isfinite(got) and relerr(got, want) <= 1e-7, (got, want)
    # the term's own float32 rounding stays (each pair computes in its own dtype); the float64 term
    # is kept to float64 precision
    got = feature_l2([a32, small], [b32, torch.zeros_like(small)], reduction="sum")
    first = feature_l2(a32, b32, reduction="sum").double()  # the float32 term
    assert (got - first - (small * small).sum()).abs() <= 1e-12 * got.abs()


# ----------------------------------------------------------------------------- near-equal distributions

def _reverse_kl_grad_exact(s, t, T):
    """d KL(Q||P) / d student of one row, Q = softmax(s / T), P = softmax(t / T), in 50-digit
    decimals: q_i (log q_i - log p_i - KL) / T."""
    from decimal import Decimal, getcontext
    getcontext().prec = 50
    T = Decimal(repr(T))
    a, b = [Decimal(float(x)) / T for x in s], [Decimal(float(x)) / T for x in t]
    zs, zt = sum(x.exp() for x in a), sum(x.exp() for x in b)
    q = [x.exp() / zs for x in a]
    r = [(x - zs.ln()) - (y - zt.ln()) for x, y in zip(a, b)]  # log q - log p
    kl = sum(qi * ri for qi, ri in zip(q, r))
    return [float(qi * (ri - kl) / T) for qi, ri in zip(q, r)]


@pytest.mark.parametrize("name,mix", [("reverse_kl_div", None), ("skew_kl_div", 0.0), ("generalized_jsd", 1.0)])
def test_reference_divergence_rows_rounding_below_zero_keep_their_gradient(name, mix):
    """A teacher that is the student rounded to float32 (P = Q to ~1e-8): the rows' divergences are
    ~1e-16, and rounding lands some below 0, which the reference clamps. Their gradients must stay
    those of the exact divergence (the kernels' too), not the clamp's 0 (fuzz seed 71 case 1258:
    errors of 5% of the gradient). Reverse KL, and its equal forms skew KL(Q||P) at alpha 0 and
    JSD at beta 1, against 50-digit decimals."""
    torch.manual_seed(0)
    s = torch.randn(6, 3, dtype=torch.float64)
    t = s.float().double()
    kw = {} if mix is None else ({"alpha": mix, "reverse": True} if name == "skew_kl_div" else {"beta": mix})
    x = s.clone().requires_grad_()
    rows = getattr(ref, name)(x, t, temperature=0.5, reduction="none", **kw)
    assert (rows == 0).any()  # the clamp is exercised: some rows' sums rounded below 0
    rows.sum().backward()
    want = torch.tensor([_reverse_kl_grad_exact(s[r], t[r], 0.5) for r in range(6)], dtype=torch.float64)
    assert (x.grad - want).abs().max() <= 1e-6 * want.abs().max()
