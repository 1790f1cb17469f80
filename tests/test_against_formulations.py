"""The RKD and feature losses (fused kernels or reference, per backend) against the formulations
people run today, written out here: torchdistill / RepDistiller RKDLoss, squared differences,
F.cosine_similarity. Also: half-precision inputs give float32 losses, and every loss matches float64
under every backend."""
import pytest
import torch
import torch.nn.functional as F

import kdfast

from bench.relation import td_pdist  # torchdistill's pdist, written out once for bench and tests
from conftest import FusedOpCalls, needs_native, relerr


# ----------------------------------------------------------------------------- torchdistill RKDLoss
# As in torchdistill (torchdistill/losses/mid_level.py, RKDLoss) and RepDistiller
# (distiller_zoo/RKD.py). `criterion` is smooth_l1_loss as published; `detach_teacher` mirrors their
# `with torch.no_grad()` around the teacher terms (False lets the teacher gradient be compared).

class TorchdistillRKDLoss(torch.nn.Module):
    def __init__(self, dist_factor=25, angle_factor=50, criterion=F.smooth_l1_loss, detach_teacher=True):
        super().__init__()
        self.dist_factor, self.angle_factor = dist_factor, angle_factor
        self.criterion, self.detach_teacher = criterion, detach_teacher

    def teacher_ctx(self):
        return torch.no_grad() if self.detach_teacher else torch.enable_grad()

    def compute_rkd_distance_loss(self, teacher, student):
        with self.teacher_ctx():
            t_d = td_pdist(teacher, squared=False)
            mean_td = t_d[t_d > 0].mean()
            t_d = t_d / mean_td
        d = td_pdist(student, squared=False)
        mean_d = d[d > 0].mean()
        d = d / mean_d
        return self.criterion(d, t_d)

    def compute_rkd_angle_loss(self, teacher, student):
        with self.teacher_ctx():
            td = (teacher.unsqueeze(0) - teacher.unsqueeze(1))
            norm_td = F.normalize(td, p=2, dim=2)
            t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
        sd = (student.unsqueeze(0) - student.unsqueeze(1))
        norm_sd = F.normalize(sd, p=2, dim=2)
        s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
        return self.criterion(s_angle, t_angle)

    def forward(self, student, teacher):
        student = student.view(student.shape[0], -1)
        teacher = teacher.view(teacher.shape[0], -1)
        return (self.dist_factor * self.compute_rkd_distance_loss(teacher, student)
                + self.angle_factor * self.compute_rkd_angle_loss(teacher, student))


def huber(delta):
    return lambda a, b: F.huber_loss(a, b, delta=delta)


def _grads(loss, *xs):
    return torch.autograd.grad(loss, [x for x in xs if x.requires_grad], allow_unused=False)


def _rkd_pair(N, Ds, Dt, B=None, dtype=torch.float64):
    shape = (N,) if B is None else (B, N)
    s = torch.randn(*shape, Ds, dtype=dtype, requires_grad=True)
    t = torch.randn(*shape, Dt, dtype=dtype, requires_grad=True)
    return s, t


def _external(s, t, dist=25.0, angle=50.0, delta=1.0, detach_teacher=False):
    crit = F.smooth_l1_loss if delta == 1.0 else huber(delta)
    return TorchdistillRKDLoss(dist, angle, crit, detach_teacher)(s, t)


def _kdfast_terms(s, t, dist=25.0, angle=50.0, delta=1.0):
    return (dist * kdfast.rkd_distance_loss(s, t, delta=delta) + angle * kdfast.rkd_angle_loss(s, t, delta=delta))


@pytest.mark.parametrize("N,Ds,Dt", [(2, 4, 4), (3, 5, 5), (8, 16, 16), (10, 8, 32), (12, 1, 1), (7, 1, 3),
                                     (16, 64, 8)])
def test_rkd_matches_torchdistill(N, Ds, Dt, backend):
    s, t = _rkd_pair(N, Ds, Dt)
    want = _external(s, t)
    got = kdfast.rkd_loss(s, t)
    assert abs(got.item() - want.item()) <= 1e-10 * max(1.0, abs(want.item()))
    for g, w in zip(_grads(got, s, t), _grads(want, s, t)):
        assert relerr(g, w) < 1e-9 or (g - w).abs().max() < 1e-12
    # the separate terms and the published weights
    d = kdfast.rkd_distance_loss(s, t)
    a = kdfast.rkd_angle_loss(s, t)
    torch.testing.assert_close(d, _external(s, t, 1.0, 0.0), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(a, _external(s, t, 0.0, 1.0), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got, 25 * d + 50 * a, rtol=1e-12, atol=1e-14)


def test_rkd_detached_teacher_like_repdistiller(backend):
    """With the teacher detached (as RepDistiller/torchdistill do), the student gradient is the same."""
    s, t = _rkd_pair(9, 6, 12)
    want = TorchdistillRKDLoss()(s, t.detach())
    got = kdfast.rkd_loss(s, t.detach())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    (gw,) = torch.autograd.grad(want, s)
    (gg,) = torch.autograd.grad(got, s)
    assert relerr(gg, gw) < 1e-9


@pytest.mark.parametrize("delta", [0.1, 0.5, 2.0])
def test_rkd_delta_is_huber(delta, backend):
    s, t = _rkd_pair(9, 6, 10)
    s.data.mul_(3)  # errors both sides of delta
    want = _external(s, t, delta=delta)
    got = _kdfast_terms(s, t, delta=delta)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(kdfast.rkd_loss(s, t, delta=delta), want, rtol=1e-10, atol=1e-14)
    for g, w in zip(_grads(got, s, t), _grads(want, s, t)):
        assert relerr(g, w) < 1e-9
    # delta = 1 is smooth_l1 exactly
    torch.testing.assert_close(kdfast.rkd_loss(s, t, delta=1.0), _external(s, t), rtol=1e-10, atol=1e-14)


def test_rkd_custom_weights(backend):
    s, t = _rkd_pair(6, 4, 4)
    torch.testing.assert_close(kdfast.rkd_loss(s, t, distance_weight=1.5, angle_weight=0.0),
                               _external(s, t, 1.5, 0.0), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(kdfast.rkd_loss(s, t, distance_weight=0.0, angle_weight=2.0),
                               _external(s, t, 0.0, 2.0), rtol=1e-10, atol=1e-14)


def test_rkd_batched_is_mean_of_groups(backend):
    s, t = _rkd_pair(6, 5, 7, B=3)
    got = kdfast.rkd_loss(s, t)
    want = torch.stack([_external(s[b], t[b]) for b in range(3)]).mean()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    for g, w in zip(_grads(got, s, t), _grads(want, s, t)):
        assert relerr(g, w) < 1e-9
    for fn, w_d, w_a in ((kdfast.rkd_distance_loss, 1.0, 0.0), (kdfast.rkd_angle_loss, 0.0, 1.0)):
        torch.testing.assert_close(fn(s, t), torch.stack([_external(s[b], t[b], w_d, w_a) for b in range(3)]).mean(),
                                   rtol=1e-10, atol=1e-14)


def test_rkd_duplicate_points_are_finite(backend):
    s, t = _rkd_pair(8, 5, 6)
    with torch.no_grad():
        s[3] = s[1]
        s[5] = s[1]
        t[2] = t[0]
    got = kdfast.rkd_loss(s, t)
    gs, gt = _grads(got, s, t)
    assert torch.isfinite(got) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    want = _external(s, t)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    # all points identical in the student: still finite
    s_same = torch.ones(5, 4, dtype=torch.float64, requires_grad=True)
    loss = kdfast.rkd_loss(s_same, torch.randn(5, 4, dtype=torch.float64))
    (g,) = torch.autograd.grad(loss, s_same)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_rkd_n2_and_n3_edge_cases(backend):
    # N = 2: one distance, psi makes it 1 on both sides; angles are 0 or 1 on both sides
    s, t = _rkd_pair(2, 3, 5)
    assert kdfast.rkd_distance_loss(s, t).item() == pytest.approx(0.0, abs=1e-12)
    assert kdfast.rkd_angle_loss(s, t).item() == pytest.approx(0.0, abs=1e-12)
    s, t = _rkd_pair(3, 2, 2)
    torch.testing.assert_close(kdfast.rkd_loss(s, t), _external(s, t), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("B", [None, 2])
def test_rkd_far_from_origin_fp32(B, backend):
    """Features near 100 with unit spread (post-ReLU-like): fp32 must stay accurate (centring)."""
    s64, t64 = _rkd_pair(16, 32, 48, B=B)
    s64 = (s64.detach() + 100).requires_grad_()
    t64 = (t64.detach() + 100).requires_grad_()
    s32 = s64.detach().float().requires_grad_()
    t32 = t64.detach().float().requires_grad_()
    if B is None:
        want = _external(s64, t64)
    else:
        want = torch.stack([_external(s64[b], t64[b]) for b in range(B)]).mean()
    got = kdfast.rkd_loss(s32, t32)
    assert got.dtype == torch.float32
    assert relerr(got, want) < 1e-4
    for g, w in zip(_grads(got, s32, t32), _grads(want, s64, t64)):
        assert relerr(g, w) < 1e-3
    for fn in (kdfast.rkd_distance_loss, kdfast.rkd_angle_loss):
        assert relerr(fn(s32, t32), fn(s64, t64)) < 1e-4


def test_rkd_gradcheck(backend):
    s = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kdfast.rkd_loss(a, b), (s, t))
    sb = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    tb = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kdfast.rkd_loss(a, b, delta=0.3), (sb, tb))


def test_rkd_backends_agree_fp32():
    """The fused relation kernels (where present) equal the reference in fp32, with gradients."""
    s = (torch.randn(3, 20, 24) + 5).requires_grad_()
    t = (torch.randn(3, 20, 40) * 2).requires_grad_()
    out = {}
    for backend in ("reference", "auto"):
        kdfast.set_backend(backend)
        vals = [kdfast.rkd_loss(s, t), kdfast.rkd_distance_loss(s, t, delta=0.4, squared=True),
                kdfast.rkd_angle_loss(s, t, delta=0.6), kdfast.pairwise_distances(t).pow(2).sum()]
        grads = torch.autograd.grad(sum(vals), [s, t])
        out[backend] = (vals, grads)
    for a, b in zip(out["auto"][0], out["reference"][0]):
        assert relerr(a, b) < 1e-5
    for a, b in zip(out["auto"][1], out["reference"][1]):
        assert relerr(a, b) < 1e-4


RKD_LAYOUTS = {
    "transposed": ((4, 7), (5, 7), lambda s, t: (s.t(), t.t())),
    "expanded": ((1, 6, 3), (3, 6, 4), lambda s, t: (s.expand(3, 6, 3), t)),
    "sliced": ((3, 8, 10), (3, 4, 5), lambda s, t: (s[:, ::2, 1::3], t)),
    "misaligned": ((19,), (31,), lambda s, t: (s[1:].view(6, 3), t[1:].view(6, 5))),
}


@pytest.mark.parametrize("layout", list(RKD_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_rkd_strides_and_dtypes(layout, dtype, backend):
    """Non-contiguous and low-precision points against float64, values and both gradients."""
    s_shape, t_shape, lay = RKD_LAYOUTS[layout]
    s0, t0 = torch.randn(s_shape, dtype=torch.float64), torch.randn(t_shape, dtype=torch.float64)
    s = s0.to(dtype).requires_grad_()
    t = t0.to(dtype).requires_grad_()
    sd = s.detach().double().requires_grad_()
    td = t.detach().double().requires_grad_()
    vtol, gtol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-5, 1e-2)
    for fn in (kdfast.rkd_loss, kdfast.rkd_distance_loss, kdfast.rkd_angle_loss):
        got = fn(*lay(s, t))
        want = kdfast.reference.__dict__[fn.__name__](*lay(sd, td))
        assert got.dtype == torch.float32
        assert relerr(got, want) < vtol, fn.__name__
        for g, w in zip(torch.autograd.grad(got, [s, t]), torch.autograd.grad(want, [sd, td])):
            assert g.dtype == dtype
            assert relerr(g, w) < gtol, fn.__name__


@pytest.mark.parametrize("backend_name", ["reference", "native"])
def test_rkd_zero_groups(backend_name):
    """(0, N, D) points: a clean ValueError naming the argument, or the reference's value (the mean
    over no groups, NaN), never an unrelated exception."""
    kdfast.set_backend(backend_name)
    for fn in (kdfast.rkd_loss, kdfast.rkd_distance_loss, kdfast.rkd_angle_loss):
        try:
            out = fn(torch.randn(0, 5, 3), torch.randn(0, 5, 4))
        except (ValueError, TypeError) as e:
            assert "student" in str(e)
        else:
            assert out.shape == () and out.isnan()


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_propagates_in_every_loss(where, backend):
    a, b = torch.randn(6, 20), torch.randn(6, 20)
    pa, pb = torch.randn(6, 5), torch.randn(6, 7)
    (a if where == "student" else b)[2, 3] = float("nan")
    (pa if where == "student" else pb)[2, 1] = float("nan")
    for name, fn in _all_losses(a, b, pa, pb).items():
        if name == "pairwise_distances" and where == "teacher":
            continue  # one input only
        out = fn()
        assert out.isnan().any(), f"{name}: NaN input hidden"


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("flags", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["no_grad", "grad_s", "grad_t", "grad_st"])
def test_opcheck_relation_ops(dtype, flags):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s, t = torch.randn(2, 6, 3, dtype=dtype), torch.randn(2, 6, 5, dtype=dtype)
    w = torch.tensor([0.5, 0.25], dtype=acc)
    # (distance weight, angle weight, delta, squared): each term alone, both, none
    for dw, aw, delta, squared in ((1.0, 0.0, 1.0, False), (0.5, 0.0, 0.5, True), (0.0, 1.0, 1.0, False),
                                   (25.0, 50.0, 0.7, False), (0.0, 0.0, 1.0, False)):
        torch.library.opcheck(torch.ops.kdfast.rkd.default, (s, t, dw, aw, delta, squared, 1e-12, w, *flags))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_rkd_op_sums_its_terms(dtype):
    """The fused op's loss and gradients for both terms are the weighted sums of each term alone
    (it computes them in one Gram gradient); a term of weight 0 is not computed at all: a group
    whose points all coincide has, at eps = 0, no positive distance (its distance term is NaN, as
    the reference mean of nothing) but an angle term of 0."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s, t = torch.randn(3, 20, 6, dtype=dtype), torch.randn(3, 20, 4, dtype=dtype)
    w = torch.tensor([0.5, 0.0, 0.25], dtype=acc)

    def op(dw, aw, s=s, t=t):
        return torch.ops.kdfast.rkd(s, t, dw, aw, 0.8, False, 1e-12, w, True, True)
    both, dist, angle = op(25.0, 50.0), op(1.0, 0.0), op(0.0, 1.0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for b, d, a in zip(both, dist, angle):
        assert relerr(b, 25.0 * d + 50.0 * a) < tol
    assert (both[1][1] == 0).all() and (both[2][1] == 0).all()  # the group of weight 0
    same = torch.ones(1, 5, 3, dtype=dtype)
    assert torch.ops.kdfast.rkd(same, same, 1.0, 0.0, 1.0, False, 0.0, w[:1], False, False)[0].isnan().all()
    loss, gs, gt = torch.ops.kdfast.rkd(same, same, 0.0, 1.0, 1.0, False, 0.0, w[:1], True, True)
    assert (loss == 0).all() and (gs == 0).all() and (gt == 0).all()
    bad = s.clone()
    bad[0, 2, 0] = float("inf")  # both weights 0: nothing is computed, not even 0 * inf
    loss, gs, gt = torch.ops.kdfast.rkd(bad, t, 0.0, 0.0, 1.0, False, 1e-12, w, True, True)
    assert loss.shape == (3,) and (loss == 0).all() and (gs == 0).all() and (gt == 0).all()
    assert gs.dtype == s.dtype and gt.shape == t.shape


# ----------------------------------------------------------------------------- logit MSE, feature L2, cosine

@needs_native
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logit_mse_matches_float64(reduction):
    """fp32 logit_mse through the fused op ("none" is elementwise: the reference's F.mse_loss)
    against the squared difference written out in float64, value and gradient."""
    s = torch.randn(4, 3, 9, requires_grad=True)
    t = torch.randn(4, 3, 9)
    with FusedOpCalls() as calls:
        got = kdfast.logit_mse(s, t, reduction=reduction)
    assert ("kdfast.feature_match.default" in calls.ops) == (reduction != "none"), calls.ops
    sd = s.detach().double().requires_grad_()
    sq = (sd - t.double()) ** 2
    want = {"mean": sq.mean(), "sum": sq.sum(), "none": sq}[reduction]
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert relerr(got, want) < 1e-6
    (g,) = torch.autograd.grad(got.sum(), s)
    (w,) = torch.autograd.grad(want.sum(), sd)
    assert relerr(g, w) < 1e-6
    assert kdfast.logit_mse(s, t).shape == ()


@pytest.mark.parametrize("dim", [-1, 0, 1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cosine_loss_equals_one_minus_cosine_similarity(dim, reduction):
    s = torch.randn(4, 6, 5, requires_grad=True)
    t = torch.randn(4, 6, 5)
    got = kdfast.cosine_loss(s, t, dim=dim, reduction=reduction)
    want = 1 - F.cosine_similarity(s, t, dim=dim, eps=1e-8)
    want = {"mean": want.mean(), "sum": want.sum(), "none": want}[reduction]
    torch.testing.assert_close(got, want)
    (g,) = torch.autograd.grad(got.sum(), s)
    (w,) = torch.autograd.grad(want.sum(), s)
    torch.testing.assert_close(g, w)


def test_cosine_loss_zero_vector_is_finite():
    s = torch.zeros(3, 4, requires_grad=True)
    loss = kdfast.cosine_loss(s, torch.randn(3, 4))
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert loss.item() == pytest.approx(1.0)


@needs_native
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_feature_l2_over_pairs(reduction):
    """fp32 feature_l2 through the fused op (one call per layer pair) against the per-pair squared
    distances written out in float64, value and gradients."""
    s = [torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 16, requires_grad=True),
         torch.randn(5, requires_grad=True)]
    t = [torch.randn(2, 8, 4, 4), torch.randn(2, 16), torch.randn(5)]
    with FusedOpCalls() as calls:
        got = kdfast.feature_l2(s, t, reduction=reduction)
    assert calls.ops.count("kdfast.feature_match.default") == 3, calls.ops
    sd = [a.detach().double().requires_grad_() for a in s]
    per_pair = [((a - b.double()) ** 2).mean() if reduction == "mean" else ((a - b.double()) ** 2).sum()
                for a, b in zip(sd, t)]
    want = sum(per_pair)
    assert got.dtype == torch.float32 and relerr(got, want) < 1e-6
    for gg, ww in zip(torch.autograd.grad(got, s), torch.autograd.grad(want, sd)):
        assert relerr(gg, ww) < 1e-6
    # a single tensor pair equals a one-element list; tuples work like lists
    assert relerr(kdfast.feature_l2(s[0], t[0], reduction=reduction), per_pair[0]) < 1e-6
    assert relerr(kdfast.feature_l2(tuple(s), tuple(t), reduction=reduction), want) < 1e-6


# ----------------------------------------------------------------------------- dtypes and backends

def _all_losses(a, b, pa, pb):
    return {
        "softmax_kl_div": lambda: kdfast.softmax_kl_div(a, b, temperature=2.0),
        "kd_loss": lambda: kdfast.kd_loss(a, b, reduction="sum"),
        "logit_mse": lambda: kdfast.logit_mse(a, b),
        "feature_l2": lambda: kdfast.feature_l2([a, a], [b, b]),
        "cosine_loss": lambda: kdfast.cosine_loss(a, b),
        "pairwise_distances": lambda: kdfast.pairwise_distances(pa),
        "rkd_distance_loss": lambda: kdfast.rkd_distance_loss(pa, pb),
        "rkd_angle_loss": lambda: kdfast.rkd_angle_loss(pa, pb),
        "rkd_loss": lambda: kdfast.rkd_loss(pa, pb),
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs_give_float32_losses(dtype):
    a, b = torch.randn(6, 20).to(dtype), torch.randn(6, 20).to(dtype)
    pa, pb = torch.randn(6, 5).to(dtype), torch.randn(6, 7).to(dtype)
    for name, fn in _all_losses(a, b, pa, pb).items():
        out = fn()
        assert out.dtype == torch.float32, name
        assert torch.isfinite(out).all(), name
        # and equal, to fp32 rounding, to the loss of the same values given as float32
        ref32 = _all_losses(a.float(), b.float(), pa.float(), pb.float())[name]()
        assert relerr(out, ref32) < 1e-5, name
    # gradients come back in the input dtype
    a.requires_grad_()
    pa.requires_grad_()
    (ga,) = torch.autograd.grad(kdfast.cosine_loss(a, b), a)
    (gp,) = torch.autograd.grad(kdfast.rkd_loss(pa, pb), pa)
    assert ga.dtype == dtype and gp.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_full_precision_losses_keep_dtype(dtype):
    a, b = torch.randn(6, 20, dtype=dtype), torch.randn(6, 20, dtype=dtype)
    pa, pb = torch.randn(6, 5, dtype=dtype), torch.randn(6, 7, dtype=dtype)
    for name, fn in _all_losses(a, b, pa, pb).items():
        assert fn().dtype == dtype, name


@pytest.mark.parametrize("backend_name", ["native", "auto", "reference"])
def test_every_loss_matches_float64_under_every_backend(backend_name):
    """Every loss in fp32 under each backend against the reference on float64 copies. (Not one
    backend against another: "auto" runs these small squared errors through the reference's own
    F.mse_loss, so that comparison could not fail.)"""
    a, b = torch.randn(6, 20), torch.randn(6, 20)
    pa, pb = torch.randn(6, 5), torch.randn(6, 7)
    kdfast.set_backend("reference")
    want = {name: fn() for name, fn in _all_losses(a.double(), b.double(), pa.double(), pb.double()).items()}
    kdfast.set_backend(backend_name)
    for name, fn in _all_losses(a, b, pa, pb).items():
        got = fn()
        assert got.dtype == torch.float32, name
        assert relerr(got, want[name]) < 2e-6, (name, relerr(got, want[name]))


@needs_native
def test_compile_rkd_loss_fullgraph():
    """torch.compile(fullgraph=True) of rkd_loss traces the fused relation ops: no graph break, same
    value and gradients as eager (batched groups, teacher gradient too)."""
    torch._dynamo.reset()
    s = torch.randn(2, 12, 6, requires_grad=True)
    t = torch.randn(2, 12, 9, requires_grad=True)
    compiled = torch.compile(lambda a, b: kdfast.rkd_loss(a, b), fullgraph=True)
    out = compiled(s, t)
    out.backward()
    gs, gt = s.grad.clone(), t.grad.clone()
    s.grad = t.grad = None
    ref_out = kdfast.rkd_loss(s, t)
    ref_out.backward()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gs, s.grad)
    torch.testing.assert_close(gt, t.grad)
