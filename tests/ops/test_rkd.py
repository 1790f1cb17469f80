"""Relation (RKD) ops: accuracy far from the cluster, any finite scale, non-default eps, the
rkd_loss parameters and its all-zero-weights path, against an independent float64 formulation
(torchdistill's: differences, F.normalize, no Gram matrix)."""
import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import reference as ref

from conftest import collinear_set, far_point_set, point_share, relerr


# ----------------------------------------------------------------------------- float64 oracle

def _pdist64(x, squared, eps):
    """(B, N, D) -> (B, N, N): squared differences summed, clamped at eps, zero diagonal."""
    diff = x.unsqueeze(-3) - x.unsqueeze(-2)
    eye = torch.eye(x.shape[-2], dtype=torch.bool)
    d = (diff * diff).sum(-1).clamp(min=eps).masked_fill(eye, 1)  # no sqrt at 0 (NaN gradient at eps = 0)
    if not squared:
        d = d.sqrt()
    return d.masked_fill(eye, 0)


def _psi(d):
    pos = d > 0
    return d / ((d * pos).sum((-1, -2), keepdim=True) / pos.sum((-1, -2), keepdim=True))


def _cosines64(x, eps):
    diff = x.unsqueeze(-3) - x.unsqueeze(-2)  # [.., i, j] = x_j - x_i
    nonzero = (diff != 0).any(-1, keepdim=True)
    unit = F.normalize(torch.where(nonzero, diff, 1.0), p=2, dim=-1, eps=eps)  # no 0 / 0 at eps = 0
    unit = torch.where(nonzero, unit, torch.zeros((), dtype=unit.dtype))
    return unit @ unit.transpose(-1, -2)


def oracle(fn, s, t, *, delta=1.0, squared=False, eps=1e-12, distance_weight=25.0, angle_weight=50.0):
    """fn's value in float64 from s, t ((N, D) or (B, N, D))."""
    s3, t3 = (x.double() if x.dim() == 3 else x.double().unsqueeze(0) for x in (s, t))
    if fn == "pairwise_distances":
        out = _psi(_pdist64(s3, squared, eps))
        return out if s.dim() == 3 else out[0]
    dist = lambda: F.huber_loss(_psi(_pdist64(s3, squared, eps)), _psi(_pdist64(t3, squared, eps)),  # noqa: E731
                                reduction="none", delta=delta).mean((-1, -2)).mean()
    angle = lambda: F.huber_loss(_cosines64(s3, eps), _cosines64(t3, eps), reduction="none",  # noqa: E731
                                 delta=delta).mean((-1, -2, -3)).mean()
    if fn == "rkd_distance_loss":
        return dist()
    if fn == "rkd_angle_loss":
        return angle()
    return distance_weight * dist() + angle_weight * angle()


def value_and_grads(f, s, t):
    """f(s, t) and its gradients with respect to s and t (upstream 1)."""
    s, t = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    out = f(s, t)
    gs, gt = torch.autograd.grad(out, (s, t))
    return out.detach(), gs, gt


LOSSES = ["rkd_distance_loss", "rkd_angle_loss", "rkd_loss"]


def _teacher_for(ratio, seed):
    # a teacher whose far point sits at another ratio, and whose cluster has its own shape: both
    # terms are then well away from 0
    return far_point_set(ratio * 0.37, D=5, seed=seed + 100)


# ----------------------------------------------------------------------------- far from the cluster

@pytest.mark.parametrize("ratio", [1e2, 1e3, 1e4, 1e5, 1e6])
@pytest.mark.parametrize("fn", LOSSES)
def test_far_point_accuracy(fn, ratio, cpu_isa):
    """fp32 points, 6 at spread 0.03 and one far away: values within 1e-4 of float64 for every
    far-to-near ratio up to 1e6, gradients (student and teacher) at least as close to float64
    as the fp32 reference formulation's (and within 1e-3 wherever that one is)."""
    for seed in range(3):
        s, t = far_point_set(ratio, seed=seed), _teacher_for(ratio, seed)
        want, ws, wt = value_and_grads(lambda a, b: oracle(fn, a, b), s.double(), t.double())
        got, gs, gt = value_and_grads(getattr(kdfast, fn), s, t)
        assert torch.isfinite(got) and relerr(got, want) < 1e-4, (seed, got.item(), want.item())
        _, rs, rt = value_and_grads(getattr(ref, fn), s, t)  # the fp32 reference formulation
        for g, r, w in ((gs, rs, ws), (gt, rt, wt)):
            assert torch.isfinite(g).all()
            assert relerr(g, w) <= max(1e-3, 2 * relerr(r, w)), (seed, relerr(g, w), relerr(r, w))


@pytest.mark.parametrize("ratio", [1e3, 1e6])
def test_far_point_batched_groups(ratio):
    """Groups of different scales in one batch are each as accurate as alone."""
    s = torch.stack([far_point_set(ratio, seed=1), far_point_set(3.0, seed=2) * 1e-3])
    t = torch.stack([_teacher_for(ratio, 1), _teacher_for(10.0, 2) * 1e4])
    want, ws, wt = value_and_grads(lambda a, b: oracle("rkd_loss", a, b), s.double(), t.double())
    got, gs, gt = value_and_grads(kdfast.rkd_loss, s, t)
    assert relerr(got, want) < 1e-4
    assert relerr(gs, ws) < 1e-3 and relerr(gt, wt) < 1e-3


@pytest.mark.parametrize("ratio", [1e2, 1e4, 1e6])
def test_far_point_pairwise_distances(ratio):
    x = far_point_set(ratio)
    up = torch.randn(7, 7, dtype=torch.float64)
    for squared in (False, True):
        f = lambda a: kdfast.pairwise_distances(a, squared=squared)  # noqa: E731
        xd = x.double().requires_grad_()
        want = _psi(_pdist64(xd.unsqueeze(0), squared, 1e-12))[0]
        (gw,) = torch.autograd.grad((want * up).sum(), xd)
        xs = x.clone().requires_grad_()
        got = f(xs)
        (gg,) = torch.autograd.grad((got * up.float()).sum(), xs)
        # every entry to float rounding of itself (the cluster's short distances included)
        assert ((got.double() - want.detach()).abs() <= 1e-6 * want.detach().abs() + 1e-30).all()
        assert relerr(gg, gw) < 1e-4


@pytest.mark.parametrize("D", [512, 3])
def test_concentrated_and_spread_points(D, cpu_isa):
    """High-dimensional Gaussian points (squared distances within a factor 4 of each other: the
    CPU angle loop then needs no lo parts) and low-dimensional ones (a wide span): fp32 values
    and gradients against float64."""
    g = torch.Generator().manual_seed(12)
    s, t = torch.randn(2, 24, D, generator=g), torch.randn(2, 24, D // 2 + 1, generator=g)
    want, ws, wt = value_and_grads(lambda a, b: oracle("rkd_loss", a, b), s.double(), t.double())
    got, gs, gt = value_and_grads(kdfast.rkd_loss, s, t)
    assert relerr(got, want) < 1e-5 and relerr(gs, ws) < 1e-4 and relerr(gt, wt) < 1e-4


# ----------------------------------------------------------------------------- any finite scale

@pytest.mark.parametrize("scale", [1e20, 1e-20, 2.0 ** 120, 2.0 ** -120])
@pytest.mark.parametrize("fn", LOSSES)
def test_scale_invariance(fn, scale):
    """RKD is scale-invariant: fp32 points at 1e20 or 1e-20 (eps = 0, so that no clamp applies)
    give the unscaled loss, and gradients scaled by 1 / scale; all finite."""
    g = torch.Generator().manual_seed(3)
    s0, t0 = torch.randn(9, 6, generator=g), torch.randn(9, 4, generator=g)
    s, t = (s0.double() * scale).float(), (t0.double() * scale).float()
    kw = {"eps": 0.0}
    f = lambda a, b: getattr(kdfast, fn)(a, b, **kw)  # noqa: E731
    want, ws, wt = value_and_grads(lambda a, b: oracle(fn, a, b, eps=0.0), s0.double(), t0.double())
    got, gs, gt = value_and_grads(f, s, t)
    assert torch.isfinite(got) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert relerr(got, want) < 1e-5
    assert relerr(gs.double() * scale, ws) < 1e-4 and relerr(gt.double() * scale, wt) < 1e-4


@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_scale_far_point_default_eps(scale):
    """A far-point set at 1e20 with the default eps: finite and equal to float64 (NaN before)."""
    s, t = far_point_set(1e4, seed=4), _teacher_for(1e4, 4)
    s, t = (s.double() * scale).float(), (t.double() * scale).float()
    want = oracle("rkd_loss", s.double(), t.double())
    got = kdfast.rkd_loss(s, t)
    assert torch.isfinite(got) and relerr(got, want) < 1e-4


def test_float64_extreme_scale():
    """float64 points near the top and bottom of the range: finite, equal to the unscaled loss."""
    s0, t0 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    want = kdfast.rkd_loss(s0, t0, eps=0.0)
    for scale in (1e300, 1e-300):
        got = kdfast.rkd_loss(s0 * scale, t0 * scale, eps=0.0)
        assert relerr(got, want) < 1e-12


def test_float64_sum_beyond_range():
    """float64 points whose coordinate sums overflow (each below DBL_MAX, six of one sign near 1e308):
    the mean that centres them must not be taken before they are scaled into range. Equal to the
    loss of the same points scaled down by a power of 2 (exact, and RKD is scale-invariant)."""
    g = torch.Generator().manual_seed(5)
    s0 = torch.randn(6, 5, generator=g, dtype=torch.float64) + 4.0  # all positive: the sums add up
    t0 = torch.randn(6, 3, generator=g, dtype=torch.float64) - 4.0
    big = 2.0 ** 1021  # |x| up to ~7 * 2^1021 < DBL_MAX; a column's sum of 6 is beyond it
    assert torch.isinf((s0 * big).sum(0)).any() and torch.isinf((t0 * big).sum(0)).any()
    for fn in LOSSES:
        want = getattr(kdfast, fn)(s0, t0, eps=0.0)
        got = getattr(kdfast, fn)(s0 * big, t0 * big, eps=0.0)
        assert torch.isfinite(got) and relerr(got, want) < 1e-12, fn


def test_float64_cluster_far_from_origin_gradients():
    """float64 points at 1e12 from the origin with spread ~1: RKD is translation-invariant, so value
    and gradients equal those of the same points moved back (exactly) to the origin. The gradient
    sum_n W_mn (x_m - x_n), taken as (sum_n W_mn) x_m - (W x)_m, cancels ~1e12 against ~1: only
    centred points keep it to float64 rounding."""
    g = torch.Generator().manual_seed(6)
    off = 1e12
    s = torch.randn(8, 4, generator=g, dtype=torch.float64) + off
    t = torch.randn(8, 3, generator=g, dtype=torch.float64) - off
    for fn in LOSSES:
        want, ws, wt = value_and_grads(lambda a, b: oracle(fn, a, b), s - off, t + off)  # exact moves
        got, gs, gt = value_and_grads(getattr(kdfast, fn), s, t)
        assert relerr(got, want) < 1e-10, fn
        assert relerr(gs, ws) < 1e-8 and relerr(gt, wt) < 1e-8, (fn, relerr(gs, ws), relerr(gt, wt))


# ----------------------------------------------------------------------------- non-default eps

def eps_points(seed, n=8, D=3):
    """Points with sides from about 0.1 to 2: an eps around 1 clamps some and not others."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64) * 0.6


@pytest.mark.parametrize("eps", [0.3, 1.0, 1.7])
@pytest.mark.parametrize("fn", LOSSES + ["rkd_loss_squared", "rkd_distance_loss_squared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_nondefault_eps(fn, eps, dtype):
    """Every relation loss at an eps that clamps some sides: value and both gradients against
    float64 (a term that drops eps, or a gradient that ignores the clamp, fails here)."""
    squared = fn.endswith("_squared")
    name = fn.replace("_squared", "")
    kw = {"eps": eps, **({"squared": True} if squared else {})}
    s, t = eps_points(5), eps_points(6, D=4) * 1.3
    want, ws, wt = value_and_grads(lambda a, b: oracle(name, a, b, **kw), s, t)
    got, gs, gt = value_and_grads(lambda a, b: getattr(kdfast, name)(a, b, **kw), s.to(dtype), t.to(dtype))
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert relerr(got, want) < tol
    assert relerr(gs, ws) < tol and relerr(gt, wt) < tol


@pytest.mark.parametrize("eps", [0.3, 1.0])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_pairwise_distances_eps(eps, squared, normalize, dtype):
    x = torch.stack([eps_points(7), eps_points(8)])
    up = torch.randn(2, 8, 8, dtype=torch.float64)
    xd = x.clone().requires_grad_()
    want = _pdist64(xd, squared, eps)
    want = _psi(want) if normalize else want
    (gw,) = torch.autograd.grad((want * up).sum(), xd)
    xs = x.to(dtype).requires_grad_()
    got = kdfast.pairwise_distances(xs, squared=squared, normalize=normalize, eps=eps)
    (gg,) = torch.autograd.grad((got * up.to(dtype)).sum(), xs)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert relerr(got, want.detach()) < tol and relerr(gg, gw) < tol


# ----------------------------------------------------------------------------- rkd_loss parameters

@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("eps", [1e-12, 0.8])
def test_rkd_loss_eps_squared(squared, eps):
    """rkd_loss passes eps and squared to its terms (native, reference and the module)."""
    s, t = eps_points(9), eps_points(10, D=5)
    want = oracle("rkd_loss", s, t, squared=squared, eps=eps)
    kw = dict(distance_weight=25.0, angle_weight=50.0, squared=squared, eps=eps)
    assert relerr(kdfast.rkd_loss(s, t, **kw), want) < 1e-10
    assert relerr(ref.rkd_loss(s, t, **kw), want) < 1e-10
    assert relerr(kdfast.nn.RKDLoss(**kw)(s, t), want) < 1e-10
    assert "squared=" in repr(kdfast.nn.RKDLoss(**kw)) and "eps=" in repr(kdfast.nn.RKDLoss(**kw))


@pytest.mark.parametrize("fn", [kdfast.rkd_loss, ref.rkd_loss])
@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf"), "1"])
def test_rkd_loss_rejects_bad_eps(fn, eps):
    s, t = eps_points(1), eps_points(2)
    with pytest.raises((ValueError, TypeError), match="eps"):
        fn(s, t, eps=eps)


def test_rkd_loss_defaults_unchanged():
    s, t = eps_points(3), eps_points(4)
    assert relerr(kdfast.rkd_loss(s, t), oracle("rkd_loss", s, t)) < 1e-10


# ----------------------------------------------------------------------------- zero weights, strides

@pytest.mark.parametrize("fn", [kdfast.rkd_loss, ref.rkd_loss], ids=["native", "reference"])
def test_zero_weights_transposed_input(fn):
    """distance_weight = angle_weight = 0 on non-contiguous inputs: 0 with zero gradients (the
    native zero result kept the input's strides and backward raised 'view size is not compatible')."""
    base_s = torch.randn(5, 9, requires_grad=True)
    base_t = torch.randn(3, 9, requires_grad=True)
    s, t = base_s.t(), base_t.t()  # (9, 5) and (9, 3), transposed
    out = fn(s, t, distance_weight=0, angle_weight=0)
    out.backward()
    assert out.item() == 0
    assert (base_s.grad == 0).all() and (base_t.grad == 0).all()
    # batched, and with a strided slice
    s3 = torch.randn(2, 6, 12, requires_grad=True)
    out = fn(s3.transpose(1, 2)[:, ::2], torch.randn(2, 4, 12).transpose(1, 2)[:, ::2],
             distance_weight=0, angle_weight=0)
    out.backward()
    assert (s3.grad == 0).all()


def test_transposed_input_matches_contiguous():
    s, t = torch.randn(6, 10).t(), torch.randn(4, 10).t()
    a = value_and_grads(kdfast.rkd_loss, s, t)
    b = value_and_grads(kdfast.rkd_loss, s.contiguous(), t.contiguous())
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- direct op calls

def test_op_checks_before_computing():
    """torch.ops.kdfast.rkd checks its arguments before any n x n work (a mismatch is reported
    as such, not after forming matrices of the first input)."""
    s = torch.randn(1, 4, 3)
    w = torch.ones(1)
    with pytest.raises(RuntimeError, match="same B and N"):
        torch.ops.kdfast.rkd(s, torch.randn(1, 5, 3), 1.0, 1.0, 1.0, False, 1e-12, w, True, True)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.kdfast.rkd(s, torch.randn(1, 4, 3, dtype=torch.float64), 1.0, 1.0, 1.0, False, 1e-12, w, True, True)
    with pytest.raises(RuntimeError, match="group_weight"):
        torch.ops.kdfast.rkd(s, s, 1.0, 1.0, 1.0, False, 1e-12, torch.ones(2), True, True)
    with pytest.raises(RuntimeError, match="D >= 1"):
        torch.ops.kdfast.rkd(torch.randn(1, 4, 0), torch.randn(1, 4, 0), 1.0, 1.0, 1.0, False, 1e-12, w, True, True)
    with pytest.raises(RuntimeError, match="x must be float32, float64, float16 or bfloat16"):
        torch.ops.kdfast.pairwise_distances(torch.ones(1, 4, 3, dtype=torch.int64), False, True, 1e-12)


@pytest.mark.parametrize("fn", LOSSES + ["pairwise_distances"])
def test_reference_eps_zero_gradients(fn):
    """The reference at eps = 0 has finite gradients (no sqrt or 0 / 0 at the zero diagonal),
    equal to float64's, and so has native."""
    s, t = eps_points(11), eps_points(12, D=4)
    if fn == "pairwise_distances":
        f_ref = lambda a, b: (ref.pairwise_distances(a, eps=0.0) * torch.arange(64.0).view(8, 8)).sum()  # noqa: E731
        want = lambda a, b: (_psi(_pdist64(a.unsqueeze(0), False, 0.0))[0] * torch.arange(64.0).view(8, 8)).sum()  # noqa: E731
        f_nat = lambda a, b: (kdfast.pairwise_distances(a, eps=0.0) * torch.arange(64.0).view(8, 8)).sum()  # noqa: E731
    else:
        f_ref = lambda a, b: getattr(ref, fn)(a, b, eps=0.0)  # noqa: E731
        want = lambda a, b: oracle(fn, a, b, eps=0.0)  # noqa: E731
        f_nat = lambda a, b: getattr(kdfast, fn)(a, b, eps=0.0)  # noqa: E731
    w = value_and_grads(want, s, t) if fn != "pairwise_distances" else None
    for f in (f_ref, f_nat):
        if fn == "pairwise_distances":
            sd = s.clone().requires_grad_()
            (g,) = torch.autograd.grad(f(sd, None), sd)
            sw = s.clone().requires_grad_()
            (gw,) = torch.autograd.grad(want(sw, None), sw)
            assert torch.isfinite(g).all() and relerr(g, gw) < 1e-10
        else:
            got = value_and_grads(f, s, t)
            for a, b in zip(got, w):
                assert torch.isfinite(a).all() and relerr(a, b) < 1e-10


# ----------------------------------------------------------------------------- collinear points

@pytest.mark.parametrize("ratio", [1.0, 1e2, 1e4, 1e6])
@pytest.mark.parametrize("D", [1, 3])
@pytest.mark.parametrize("fn", ["rkd_angle_loss", "rkd_loss"])
def test_collinear_angle_gradients(fn, D, ratio, cpu_isa):
    """fp32 collinear points (D = 1: cosines +-1, an angle gradient of exactly 0): the student's
    gradient within 1e-3 of one point's share of float64's, and 10 times closer than the fp32
    reference formulation, for far-to-near ratios up to 1e6. The terms of the gradient through the
    squared distances are each of size h / n_ij and cancel there, so their float rounding, amplified
    by the ratio of the long sides to the short ones, once left errors of percents of that share."""
    for seed in range(2):
        s = collinear_set(ratio, D, seed)
        t = far_point_set(ratio * 0.37, n=9, D=5, seed=seed + 100)
        kw = dict(distance_weight=0.0) if fn == "rkd_loss" else {}
        want, ws, _ = value_and_grads(lambda a, b: oracle(fn, a, b, **kw), s.double(), t.double())
        got, gs, _ = value_and_grads(lambda a, b: getattr(kdfast, fn)(a, b, **kw), s, t)
        assert relerr(got, want) < 1e-4
        _, rs, _ = value_and_grads(lambda a, b: getattr(ref, fn)(a, b, **kw), s, t)
        share = point_share(s, 50.0 if fn == "rkd_loss" else 1.0)
        err = (gs.double() - ws).abs().max().item() / share
        err_ref = (rs.double() - ws).abs().max().item() / share
        assert err < 1e-3 and err <= 0.1 * err_ref, (seed, err, err_ref)


@pytest.mark.parametrize("dtype,ratio,bound", [(torch.float32, 1e8, 1e-4), (torch.float32, 1e9, 1e-4),
                                               (torch.float64, 1e4, 1e-8), (torch.float64, 1e6, 1e-8)])
@pytest.mark.parametrize("D", [1, 3])
@pytest.mark.parametrize("fn", ["rkd_angle_loss", "rkd_loss"])
def test_wide_span_groups_take_low_parts(fn, D, dtype, ratio, bound):
    """Collinear points beyond the issue's 1e6 (fp32) and float64 points from 1e4: the groups whose
    squared sides span more than 1e6 take D2's low parts and the product back to points from
    differences, so the student's angle gradient stays within `bound` of one point's share of
    float64's, and (fp32) 100 times closer than the fp32 reference formulation. Without them the
    error was ~eps_64 x ratio^2 of that share: 0.36 at 1e8, 2.8e-5 at 1e6 (float64 too)."""
    for seed in range(2):
        s = collinear_set(ratio, D, seed).to(dtype)
        t = far_point_set(ratio * 0.37, n=9, D=5, seed=seed + 100).to(dtype)
        kw = dict(distance_weight=0.0) if fn == "rkd_loss" else {}
        want, ws, _ = value_and_grads(lambda a, b: oracle(fn, a, b, **kw), s.double(), t.double())
        got, gs, _ = value_and_grads(lambda a, b: getattr(kdfast, fn)(a, b, **kw), s, t)
        assert relerr(got, want) < (1e-4 if dtype == torch.float32 else 1e-10)
        share = point_share(s, 50.0 if fn == "rkd_loss" else 1.0)
        err = (gs.double() - ws).abs().max().item() / share
        assert err < bound, (seed, err)
        if dtype == torch.float32:
            _, rs, _ = value_and_grads(lambda a, b: getattr(ref, fn)(a, b, **kw), s, t)
            assert err <= 0.01 * (rs.double() - ws).abs().max().item() / share


# ----------------------------------------------------------------------------- NaN semantics

def _nan_groups_check(f_got, f_want, s, t, group):
    """f_got's value and gradients (native or reference) NaN in every element of `group` (value and
    both gradients), wherever float64 has NaN at least, and equal to float64 elsewhere."""
    want, ws, wt = value_and_grads(f_want, s, t)
    got, gs, gt = value_and_grads(f_got, s, t)
    assert got.isnan().all() and want.isnan().all()
    for g, w in ((gs, ws), (gt, wt)):
        assert g[group].isnan().all(), "a NaN loss with gradients that are not NaN"
        assert (g.isnan() | ~w.isnan()).all()
        other = [b for b in range(g.shape[0]) if b != group]
        assert torch.isfinite(g[other]).all() and relerr(g[other], w[other]) < 1e-10


def _rel_fns(fn, module, **kw):
    if fn == "pairwise_distances":  # the student alone, through the loss sum(out * up)
        up = torch.linspace(-1, 2, 64, dtype=torch.float64).view(8, 8)
        return (lambda a, b: (getattr(module, fn)(a, **kw) * up).sum() + 0 * b.sum(),
                lambda a, b: (_psi(_pdist64(a, kw.get("squared", False), kw["eps"])) * up).sum() + 0 * b.sum())
    return (lambda a, b: getattr(module, fn)(a, b, **kw), lambda a, b: oracle(fn, a, b, **kw))


@pytest.mark.parametrize("module", [kdfast, ref], ids=["native", "reference"])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("fn", ["rkd_distance_loss", "rkd_loss", "pairwise_distances"])
def test_all_duplicates_nan_gradients(fn, squared, module):
    """A group whose points are all equal, at eps = 0: psi is 0 / 0, the loss NaN, and so is every
    gradient of that group (both sides: the teacher's through Huber' of NaN), as float64 has NaN
    for a NaN loss; the other group is unaffected. (Native and the reference once gave zero
    gradients beside the NaN loss.)"""
    s = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    s[0] = s[0, :1]  # group 0 of the student: all one point
    f_got, _ = _rel_fns(fn, module, squared=squared, eps=0.0)
    _, f_want = _rel_fns(fn, ref, squared=squared, eps=0.0)
    want, ws, wt = value_and_grads(f_want, s, t)
    got, gs, gt = value_and_grads(f_got, s, t)
    assert got.isnan()
    for g in ((gs, gt) if fn != "pairwise_distances" else (gs,)):
        assert g[0].isnan().all(), "a NaN loss with gradients that are not NaN"
    want1 = value_and_grads(_rel_fns(fn, ref, squared=squared, eps=0.0)[1], s[1:], t[1:])
    got1 = value_and_grads(f_got, s[1:], t[1:])
    for a, b in zip(got1, want1):
        assert torch.isfinite(a).all() and relerr(a, b) < 1e-10


@pytest.mark.parametrize("module", [kdfast, ref], ids=["native", "reference"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("fn", LOSSES + ["pairwise_distances"])
def test_nonfinite_point_nan_gradients(fn, value, module):
    """One coordinate of one point NaN (or inf) in group 0: float64 has a NaN loss and NaN in the
    gradients, the other coordinates of that point included; native and the reference have NaN
    wherever float64 has it (the whole group), and group 1 as float64."""
    s = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    s[0, 2, 1] = value
    kw = dict(eps=1e-12) if fn == "rkd_angle_loss" else dict(eps=1e-12, squared=False)
    f_got, _ = _rel_fns(fn, module, **kw)
    _, f_want = _rel_fns(fn, kdfast.reference, **kw)
    f_want = _rel_fns(fn, None, **kw)[1] if fn == "pairwise_distances" else (lambda a, b: oracle(fn, a, b, **kw))
    want, ws, wt = value_and_grads(f_want, s, t)
    got, gs, gt = value_and_grads(f_got, s, t)
    assert got.isnan() and want.isnan()
    for g, w in ((gs, ws), (gt, wt)) if fn != "pairwise_distances" else ((gs, ws),):
        assert w[0].isnan().any()
        assert (g[0].isnan() | ~w[0].isnan()).all(), "NaN in float64's gradient, a number here"
        assert torch.isfinite(g[1]).all()
    got1 = value_and_grads(f_got, s[1:], t[1:])
    want1 = value_and_grads(f_want, s[1:], t[1:])
    for a, b in zip(got1, want1):
        assert relerr(a, b) < 1e-10


@pytest.mark.parametrize("module", [kdfast, ref], ids=["native", "reference"])
def test_infinite_side_nan_angle(module):
    """Two points, one with an inf coordinate: the only side is infinite, its unit vector inf / inf
    is NaN in float64, and so is the angle loss (native once took 1 / inf = 0 as a zero-length side
    and returned 0)."""
    s = torch.randn(2, 4, dtype=torch.float64)
    s[0, 1] = float("inf")
    t = torch.randn(2, 3, dtype=torch.float64)
    assert oracle("rkd_angle_loss", s, t).isnan()
    assert module.rkd_angle_loss(s, t).isnan() and module.rkd_angle_loss(s.float(), t.float()).isnan()


@pytest.mark.parametrize("module", [kdfast, ref], ids=["native", "reference"])
def test_nan_upstream_reaches_clamped_distances(module):
    """eps = 1 (squared) clamps some teacher distances; a NaN student point makes the loss NaN and the
    upstream of every teacher distance NaN: float64's clamp passes NaN * 0, so every teacher
    gradient is NaN, the points whose distances are all clamped included."""
    g = torch.Generator().manual_seed(8)
    s = torch.randn(9, 3, generator=g, dtype=torch.float64)
    s[4, 0] = float("nan")
    t = torch.randn(9, 4, generator=g, dtype=torch.float64) * 0.3  # squared sides ~0.7: many below eps
    kw = dict(squared=True, eps=1.0)
    _, _, wt = value_and_grads(lambda a, b: oracle("rkd_distance_loss", a, b, **kw), s, t)
    got, _, gt = value_and_grads(lambda a, b: module.rkd_distance_loss(a, b, **kw), s, t)
    assert got.isnan() and wt.isnan().any()
    assert gt.isnan().all()


def test_float64_far_point_beyond_1e6():
    """float64, far:near 1e9 with the cluster near the origin: the differences of the inputs are
    exact, so the distances hold float64 accuracy. Centring first (the far point moves the mean by
    ~1e9 x spread) rounded the cluster's coordinates by eps * 1e9 x spread: relative errors ~1e-7.
    (The angle term's law of cosines still loses eps * far / near there: not held to this.)"""
    for seed in range(2):
        s = far_point_set(1e9, seed=seed, dtype=torch.float64)
        t = _teacher_for(1e3, seed).double()
        for fn in ["rkd_distance_loss"]:
            want, ws, wt = value_and_grads(lambda a, b: oracle(fn, a, b), s, t)
            got, gs, gt = value_and_grads(getattr(kdfast, fn), s, t)
            assert relerr(got, want) < 1e-10, (fn, relerr(got, want))


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_float64_far_point_near_sides_exact(squared, normalize):
    """The cluster's own sides, float64, with one point 1e9 x spread away: taken from the inputs'
    differences they are exact to float64 rounding. The distance loss cannot see them (its mean is
    the far sides'), but pairwise_distances returns them: distances from centred points (the far
    point moves the mean by ~1e9 x spread / 7) were off by ~1e-8 relative."""
    for seed in range(3):
        x = far_point_set(1e9, seed=seed, dtype=torch.float64)
        want = (x[:, None] - x[None]).pow(2).sum(-1)
        if not squared:
            want = want.sqrt()
        if normalize:
            want = want / want[want > 0].mean()
        got = kdfast.pairwise_distances(x, squared=squared, normalize=normalize)
        near = slice(0, x.shape[0] - 1)
        assert relerr(got[near, near], want[near, near]) < 1e-13, relerr(got[near, near], want[near, near])
        assert relerr(got, want) < 1e-13


@pytest.mark.parametrize("fn", ["rkd_distance_loss", "rkd_loss", "pairwise_distances"])
def test_huge_duplicates_clamped_by_eps_have_finite_gradients(fn):
    """Points ~4e146 that all coincide, eps = 1, squared: every side is clamped to eps, so the
    mean is eps and the gradient 0 (float64 reference). The kernels scale the group down by
    2^-487, so the mean is 2^-974 and its square underflowed: 0 / 0 = NaN (fuzz seed 12, relation
    losses, case 17413)."""
    p = torch.tensor([[4.03857263946777587e+146, 3.99894551726579737e+146]], dtype=torch.float64)
    s = p.expand(5, 2).clone()
    t = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e-3
    grads = []
    for mod in (kdfast, ref):
        x = s.clone().requires_grad_()
        if fn == "pairwise_distances":
            out = mod.pairwise_distances(x, squared=True, normalize=True, eps=1.0)
            out = (out * torch.arange(25.0, dtype=out.dtype).view(5, 5)).sum()
        else:
            out = getattr(mod, fn)(x, t, squared=True, eps=1.0)
        out.backward()
        grads.append(x.grad)
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def _native_and_reference(fn, s, t, eps, squared):
    """(value, student gradient, teacher gradient) of kdfast's fn and the reference's, float64;
    pairwise_distances on s alone, its matrix weighted by 0, 1, 2, ... so every entry counts."""
    out = []
    for mod in (kdfast, ref):
        x, y = s.clone().requires_grad_(), t.clone().requires_grad_()
        if fn == "pairwise_distances":
            n = s.shape[0]
            v = (mod.pairwise_distances(x, squared=squared, eps=eps) * torch.arange(float(n * n)).view(n, n)).sum()
        else:
            kw = {} if fn == "rkd_angle_loss" else {"squared": squared}
            v = getattr(mod, fn)(x, y, eps=eps, **kw)
        v.backward()
        out.append((v.detach(), x.grad, y.grad))
    return out


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("fn", ["rkd_distance_loss", "rkd_loss", "pairwise_distances"])
def test_duplicate_points_eps_zero_finite_gradients(fn, squared):
    """eps = 0 and two coinciding points: their side is 0 = eps, at the clamp, but it has no
    direction; its gradient is 0, as the reference's, not 1 / (2 * 0)."""
    s = torch.tensor([[0.0, 1.0], [0.0, 1.0], [3.0, 0.5], [-2.5, 2.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0], [2.0, 0.5], [1.0, -1.0], [0.0, 3.0]], dtype=torch.float64)
    (_, gs, _), (_, rgs, _) = _native_and_reference(fn, s, t, 0.0, squared)
    assert torch.isfinite(gs).all()
    torch.testing.assert_close(gs, rgs, rtol=1e-10, atol=1e-13)
