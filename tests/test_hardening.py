"""Hardening: scale (64-bit indexing, RKD at N = 4096), concurrency and thread counts, resources
(no leak over many calls or on exceptions), autograd edge cases of the relation losses, module
round trips, and a check that every validation `raise` in kdfast is triggered by some test.

What the rest of the suite already holds is not repeated here: softmax-KL double backward, backward
twice, no-grad and CPU autocast (test_softmax_kl.py), KL thread-count determinism (test_isa.py),
pickle / deepcopy / state_dict of every module and the single-layer projection training
(test_modules_api.py), the table of bad inputs (test_errors.py, which the raise-coverage check here
runs under coverage.py).
"""
import ast
import collections
import copy
import gc
import io
import math
import os
import pickle
import re
import subprocess
import sys
import warnings

import coverage
import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import nn as knn
from kdfast import reference as ref

from conftest import (REPO, GRAD_TOL, VALUE_TOL, FusedOpCalls, check_zero_upstream_rows, run_in_threads, needs_cuda,
                      needs_native, relerr, same_bits, zero_upstream_case)

pytestmark = needs_native
KDFAST_DIR = os.path.dirname(os.path.abspath(kdfast.__file__))


# ============================================================================= known bugs

@pytest.mark.parametrize("kind", ["col_step_student", "col_step_teacher", "col_step_both_masked"])
def test_zero_rows_with_strided_vocab(kind):
    kdfast.set_backend("native")
    if kind == "col_step_student":
        s, t = torch.randn(0, 8)[:, ::2], torch.randn(0, 4)
    elif kind == "col_step_teacher":
        s, t = torch.randn(0, 4), torch.randn(0, 12)[:, 1::3]
    else:
        s, t = torch.randn(0, 10)[:, 1::2], torch.randn(0, 15)[:, ::3]
    mask = torch.ones(0, dtype=torch.bool) if kind.endswith("masked") else None
    s.requires_grad_()
    for reduction in ("batchmean", "none"):
        out = kdfast.kd_loss(s, t, reduction=reduction, mask=mask)
        expected = ref.kd_loss(s, t, reduction=reduction, mask=mask)
        assert out.shape == expected.shape and torch.equal(out.detach(), expected.detach())
    out.sum().backward()
    assert s.grad.shape == s.shape


def test_pairwise_distances_double_backward_is_right_or_raises():
    """create_graph=True through the native pairwise_distances gives the reference's second-order
    gradient (its backward recomputes through the reference), or a clear error."""
    x0 = torch.randn(6, 4, dtype=torch.float64)
    U, R = torch.randn(6, 6, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)

    def second_order(backend):
        kdfast.set_backend(backend)
        x = x0.clone().requires_grad_()
        (g,) = torch.autograd.grad((kdfast.pairwise_distances(x) * U).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad((g * R).sum(), x)
        return h

    want = second_order("reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            got = second_order("native")
        except RuntimeError as e:
            assert re.search(r"(?i)double backward|create_graph|higher.order", str(e)), str(e)
            return
    assert relerr(got, want) < 1e-8


# ============================================================================= scale (KDFAST_SLOW=1)

@pytest.mark.slow
def test_softmax_kl_rows_times_vocab_beyond_2_pow_31_bf16():
    """bf16 logits with rows x V > 2^31 (64-bit indexing in every offset), student gradient and an
    upstream gradient that differs per row (the in-place rescale pass runs over the whole buffer).

    16,400 x 131,073 rather than exactly 16,384 x 131,072: that product is exactly 2^31, whose
    largest element index 2^31 - 1 still fits in int32; here every row from 16,384 on starts past
    2^31, and the odd V misaligns every row. Student and teacher are two row-shifted views of one
    buffer (teacher row r = student row r - 1), so the inputs take 4.3 GB instead of 8.6 GB (plus
    4.3 GB of gradient)."""
    R, V = 16400, 131073
    assert R * V > 2**31
    gen = torch.Generator().manual_seed(31)
    buf = torch.empty(R + 1, V, dtype=torch.bfloat16)
    for i in range(0, R + 1, 1024):
        buf[i:i + 1024].normal_(0.0, 2.0, generator=gen)
    s = buf[1:].requires_grad_()
    t = buf[:-1]
    upstream = torch.rand(R, generator=gen, dtype=torch.float64) + 0.5
    out = kdfast.kd_loss(s, t, temperature=2.0, reduction="none")
    assert out.dtype == torch.float32 and out.shape == (R,)
    (out * upstream.float()).sum().backward()
    g = s.grad
    assert g.shape == (R, V) and g.dtype == torch.bfloat16
    assert bool(torch.isfinite(out).all())
    first_past = -(-2**31 // V)  # first row that starts past element 2^31
    rows = sorted({0, 1, 2, first_past - 1, first_past, first_past + 1, R - 2, R - 1}
                  | set(torch.randint(0, R, (16,), generator=gen).tolist()))
    sd = s.detach()[rows].double().requires_grad_()
    td = t[rows].double()
    want = ref.kd_loss(sd, td, temperature=2.0, reduction="none")
    (want * upstream[rows]).sum().backward()
    for k, r in enumerate(rows):
        assert relerr(out[r], want[k]) < VALUE_TOL[torch.bfloat16], f"row {r}: loss {out[r]} vs {want[k]}"
        assert relerr(g[r], sd.grad[k].to(torch.bfloat16)) < GRAD_TOL[torch.bfloat16], f"row {r}: gradient"
    # rows whose weights differ get differently scaled gradients: not one row's buffer reused
    assert not torch.equal(g[first_past], g[first_past + 1])
    del g, s, out


def _similar_teacher_with_one_moved_point(N, D, Dt, p, gen):
    """Student X (fp32-exact values) and a teacher that is X rotated into Dt dims, scaled and shifted
    (every distance ratio and angle equal to the student's) except point p, which is moved."""
    X = (torch.randn(N, D, generator=gen, dtype=torch.float64) * 64).round() / 64
    Q, _ = torch.linalg.qr(torch.randn(Dt, D, generator=gen, dtype=torch.float64))  # orthonormal columns
    Y = 3.0 * X @ Q.t() + 7.0
    Y[p] = torch.randn(Dt, generator=gen, dtype=torch.float64) * 2.0 + 7.0
    return X.float().double(), Y.float().double()  # the values the fp32 run sees


def _angle_loss_through_point(X, Y, p, delta, eps=1e-12):
    """(1/N^3) sum of Huber_delta(cos_s - cos_t) over the triplets that contain point p, in float64
    and differentiable: for a teacher similar to the student except at p, the other triplets have
    equal cosines on both sides, so this is the whole angle loss and its gradient. With
    cos(i; j, k) = (G_jk - G_ij - G_ik + G_ii) / (d_ij d_ik) it is the i = p slice plus twice the
    j = p slice (the k = p slice mirrors it); the overlaps (two of i, j, k equal to p) contribute 0
    on both sides."""
    N = X.shape[0]

    def slices(Z):
        Z = Z - Z.mean(0, keepdim=True)
        G = Z @ Z.t()
        diag = G.diagonal()
        d2 = (diag[:, None] + diag[None, :] - 2 * G).clamp(min=0)
        pos = d2 > 0
        d = torch.where(pos, d2, torch.ones((), dtype=Z.dtype)).sqrt()  # no inf/NaN in unused branches
        inv = torch.where(pos, 1 / d.clamp(min=eps), torch.zeros((), dtype=Z.dtype))
        vertex_p = (G - G[p][None, :] - G[p][:, None] + G[p, p]) * inv[p][:, None] * inv[p][None, :]
        side_p = (G[p][None, :] - G[:, p][:, None] - G + diag[:, None]) * inv[:, p][:, None] * inv
        return vertex_p, side_p

    a_s, b_s = slices(X)
    a_t, b_t = slices(Y)
    h = lambda u, v: F.huber_loss(u, v, reduction="sum", delta=delta)  # noqa: E731
    return (h(a_s, a_t) + 2 * h(b_s, b_t)) / N**3


@pytest.mark.slow
def test_rkd_at_n_4096():
    """N = 4096 (N^3 = 6.9e10 triplets, past 2^31): fp32 native against independent float64 answers.
    Angle: a teacher similar to the student except one moved point p near the end, so the exact loss
    and gradient are sums over the triplets through p (computed in float64 from N x N slices), and
    every other triplet must cancel exactly; a wrong index anywhere shows up as a spurious term.
    Distance and pairwise_distances: a random teacher far from the origin against the float64
    reference in full (O(N^2))."""
    N, D, Dt, p = 4096, 32, 48, 4093
    gen = torch.Generator().manual_seed(4096)
    X, Y = _similar_teacher_with_one_moved_point(N, D, Dt, p, gen)
    s, t = X.float().requires_grad_(), Y.float().requires_grad_()
    loss = kdfast.rkd_angle_loss(s, t, delta=0.5)
    gs, gt = torch.autograd.grad(loss, [s, t])
    Xd, Yd = X.clone().requires_grad_(), Y.clone().requires_grad_()
    want = _angle_loss_through_point(Xd, Yd, p, 0.5)
    ws, wt = torch.autograd.grad(want, [Xd, Yd])
    assert want.item() > 1e-5, "the check would be vacuous"
    assert relerr(loss, want) < 1e-4, f"angle loss {loss.item():.9g} vs {want.item():.9g}"
    # (the teacher is similar to the student only up to its fp32 rounding: the other triplets add
    # noise of ~1e-7 each, ~1e-6 relative in the gradient at N = 300)
    assert relerr(gs, ws) < 1e-3 and relerr(gt, wt) < 1e-3, (relerr(gs, ws), relerr(gt, wt))
    # the moved point carries the largest gradient on both sides, as in float64
    assert int(gt.norm(dim=1).argmax()) == int(wt.norm(dim=1).argmax()) == p

    # distance loss and pairwise distances, far from the origin (offset 100, unit spread)
    Xf = (torch.randn(N, D, generator=gen) + 100).requires_grad_()
    Tf = (torch.randn(N, Dt, generator=gen) * 2 - 100).requires_grad_()
    Xd, Td = Xf.detach().double().requires_grad_(), Tf.detach().double().requires_grad_()
    got = kdfast.rkd_distance_loss(Xf, Tf)
    want = ref.rkd_distance_loss(Xd, Td)
    assert relerr(got, want) < 1e-4
    for g, w in zip(torch.autograd.grad(got, [Xf, Tf]), torch.autograd.grad(want, [Xd, Td])):
        assert relerr(g, w) < 1e-3
    with torch.no_grad():
        pd = kdfast.pairwise_distances(Xf)
        exact = torch.empty(N, N, dtype=torch.float64)  # in row blocks of direct differences
        Xe = Xd.detach() - Xd.detach().mean(0)
        for i in range(0, N, 256):
            exact[i:i + 256] = torch.cdist(Xe[i:i + 256], Xe, compute_mode="donot_use_mm_for_euclid_dist")
        exact.fill_diagonal_(0)
        exact = exact / exact[exact > 0].mean()
    assert relerr(pd, exact) < 1e-5
    idx = torch.randint(0, N, (2, 1000), generator=gen)
    assert (pd[idx[0], idx[1]].double() - exact[idx[0], idx[1]]).abs().max() < 1e-4


# ============================================================================= concurrency

def _relation_job(fn, s, t, kw):
    def run():
        sl, tl = s.clone().requires_grad_(), t.clone().requires_grad_()
        out = fn(sl, tl, **kw)
        if out.dim():  # pairwise_distances
            (out * torch.linspace(0, 1, out.numel()).view_as(out).to(out.dtype)).sum().backward()
        else:
            (out * 0.5).backward()
        return out.detach(), sl.grad, tl.grad if tl.grad is not None else torch.empty(0)
    return run


def _pairwise(s, t, **kw):
    return kdfast.pairwise_distances(s, **kw)


RELATION_JOBS = [  # (fn, student shape, teacher shape, dtype, kwargs): one per thread
    (kdfast.rkd_angle_loss, (160, 24), (160, 40), torch.float32, dict(delta=0.5)),
    (kdfast.rkd_distance_loss, (3, 96, 16), (3, 96, 8), torch.float64, dict(squared=True)),
    (kdfast.rkd_loss, (2, 80, 12), (2, 80, 12), torch.bfloat16, {}),
    (_pairwise, (128, 33), (1, 1), torch.float32, dict(normalize=True)),
]


def _relation_inputs():
    gen = torch.Generator().manual_seed(7)
    return [(fn, torch.randn(ss, generator=gen).to(dt), torch.randn(ts, generator=gen).to(dt), kw)
            for fn, ss, ts, dt, kw in RELATION_JOBS]


def test_relation_ops_from_python_threads_match_serial():
    """Four Python threads running different relation losses (and dtypes) at once give the same
    bits as the same calls made one after another."""
    jobs = [_relation_job(fn, s, t, kw) for fn, s, t, kw in _relation_inputs()]
    serial = [job() for job in jobs]
    for got, want in zip(run_in_threads(jobs), serial):
        assert all(same_bits(a, b) for a, b in zip(got, want))


def _kl_jobs():
    """Softmax-KL calls with different configurations: dtypes, mask, teacher gradient, the split
    path (few long rows), reductions, upstream not one."""
    gen = torch.Generator().manual_seed(8)

    def job(shape, dtype, grad_teacher, mask, reduction):
        s = (torch.randn(shape, generator=gen) * 3).to(dtype)
        t = (torch.randn(shape, generator=gen) * 3).to(dtype)
        m = (torch.rand(shape[:-1], generator=gen) > 0.3) if mask else None

        def run():
            sl, tl = s.clone().requires_grad_(), t.clone().requires_grad_(grad_teacher)
            out = kdfast.kd_loss(sl, tl, temperature=1.7, reduction=reduction, mask=m)
            (out * 1.3).sum().backward()
            return out.detach(), sl.grad, tl.grad if grad_teacher else torch.empty(0)
        return run

    return [job((8, 4, 3000), torch.bfloat16, True, True, "mean"),
            job((2, 70001), torch.float32, True, False, "batchmean"),
            job((33, 515), torch.float64, False, True, "none"),
            job((16, 2048), torch.float16, True, False, "sum")]


def test_kl_mixed_configs_from_python_threads_match_serial():
    """Four threads with different softmax-KL configurations give the bits of serial calls.
    (Same-config fp32 threads: test_softmax_kl.py.)"""
    jobs = _kl_jobs()
    serial = [j() for j in jobs]
    for got, want in zip(run_in_threads(jobs), serial):
        assert all(same_bits(a, b) for a, b in zip(got, want))


def test_results_do_not_depend_on_thread_count():
    """torch.set_num_threads(1) vs (2): the relation ops and softmax-KL in half precision, with masks
    and teacher gradients agree to rounding, and the same thread count gives identical bits.
    (fp32 softmax-KL: test_isa.py.)"""
    jobs = [_relation_job(fn, s, t, kw) for fn, s, t, kw in _relation_inputs()]
    jobs.append(_relation_job(kdfast.rkd_angle_loss, torch.randn(2, 300, 16), torch.randn(2, 300, 20), {}))
    jobs += _kl_jobs()
    results = {}
    for n in (1, 2, 1, 2):
        torch.set_num_threads(n)
        r = [job() for job in jobs]
        if n in results:
            for i, (a, b) in enumerate(zip(r, results[n])):
                assert all(same_bits(x, y) for x, y in zip(a, b)), f"job {i}: {n} threads not deterministic"
        results[n] = r
    for i, (a, b) in enumerate(zip(results[1], results[2])):
        tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(a[1].dtype, 1e-5)
        for x, y in zip(a, b):
            assert relerr(x, y) < tol, f"job {i}: 1 vs 2 threads differ beyond rounding"


# ============================================================================= resources

def _rss_mb():
    import psutil
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def _steady_state(step, warmup, calls):
    """RSS growth (MB) and Python object growth over `calls` calls of step(i), after `warmup`."""
    for i in range(warmup):
        step(i)
    rss0, objs0 = _rss_mb(), len(gc.get_objects())
    for i in range(calls):
        step(i)
    return _rss_mb() - rss0, len(gc.get_objects()) - objs0


def test_ten_thousand_forward_backward_calls_leave_rss_flat():
    """10,000 forward + backward calls (softmax-KL, plus relation losses every fifth call): RSS stays
    flat after a warm-up, and no Python objects pile up. Each call allocates 256 KB of student
    gradient, so leaking it (or its graph) would add 2.5 GB; anything over 1 KB a call shows."""
    s0, t0 = torch.randn(16, 4096), torch.randn(16, 4096)
    mask = torch.rand(16) > 0.2
    p0, q0 = torch.randn(2, 24, 8), torch.randn(2, 24, 12)

    def step(i):
        s = s0.clone().requires_grad_()
        t = t0.clone().requires_grad_(i % 2 == 0)
        kdfast.kd_loss(s, t, temperature=2.0, reduction=("mean", "none")[i % 2], mask=mask).sum().backward()
        if i % 5 == 0:
            p = p0.clone().requires_grad_()
            (kdfast.rkd_loss(p, q0) + kdfast.pairwise_distances(p).mean()).backward()

    grew, objs = _steady_state(step, warmup=500, calls=10_000)
    assert grew < 10, f"RSS grew by {grew:.1f} MB over 10,000 calls"
    assert objs < 500, f"{objs} Python objects more after 10,000 calls"


class _HookError(Exception):
    pass


def _raise_hook(grad):
    raise _HookError("raised from a gradient hook")


def test_exceptions_mid_call_leak_nothing():
    """Calls that fail half-way (a bad mask after valid logits; a raw op rejecting its inputs after
    centring and Gram matrices are built; a hook raising inside backward on the input, after the
    fused gradient was handed over, or on the loss, before the fused node ran) free everything:
    RSS and Python objects stay flat over many repetitions. Each failing call has ~1 MB in flight."""
    s0, t0 = torch.randn(32, 8192), torch.randn(32, 8192)
    big_s, big_t = torch.randn(1, 512, 256), torch.randn(1, 500, 256)
    w = torch.ones(1)
    p0, q0 = torch.randn(64, 32), torch.randn(64, 32)

    def step(i):
        kind = i % 5
        if kind == 0:  # validation fails after the logits passed
            with pytest.raises(ValueError, match="mask"):
                kdfast.kd_loss(s0.clone().requires_grad_(), t0, mask=torch.ones(31, dtype=torch.bool))
        elif kind == 1:  # the C++ op throws after allocating (N differs)
            with pytest.raises(RuntimeError, match="same B and N"):
                torch.ops.kdfast.rkd(big_s, big_t, 0.0, 1.0, 1.0, False, 1e-12, w, True, True)
        elif kind == 2:  # a hook on the leaf raises while the fused gradient is being accumulated
            s = s0.clone().requires_grad_()
            s.register_hook(_raise_hook)
            loss = kdfast.kd_loss(s, t0)
            with pytest.raises(_HookError):
                loss.backward()
        elif kind == 3:  # a hook on the loss raises before the fused node's backward runs
            s = s0.clone().requires_grad_()
            loss = kdfast.softmax_kl_div(s, t0, reduction="sum")
            loss.register_hook(_raise_hook)
            with pytest.raises(_HookError):
                loss.backward()
        else:  # the same for a relation loss
            p = p0.clone().requires_grad_()
            p.register_hook(_raise_hook)
            with pytest.raises(_HookError):
                kdfast.rkd_loss(p, q0).backward()

    grew, objs = _steady_state(step, warmup=100, calls=1500)
    assert grew < 10, f"RSS grew by {grew:.1f} MB over 1,500 failing calls"
    assert objs < 500, f"{objs} Python objects more after 1,500 failing calls"
    # and the library still works afterwards
    s = s0.clone().requires_grad_()
    kdfast.kd_loss(s, t0).backward()
    assert torch.isfinite(s.grad).all()


# ============================================================================= autograd edges (relation losses)

RELATION_FNS = [("rkd_distance_loss", kdfast.rkd_distance_loss), ("rkd_angle_loss", kdfast.rkd_angle_loss),
                ("rkd_loss", kdfast.rkd_loss)]


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("name,fn", RELATION_FNS, ids=[n for n, _ in RELATION_FNS])
def test_relation_double_backward_raises_clear_error(name, fn):
    s = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="(?i)double backward|create_graph"):
        torch.autograd.grad(fn(s, t), s, create_graph=True)
    with pytest.raises(RuntimeError, match="(?i)double backward|create_graph"):
        fn(s, t).backward(create_graph=True)


@pytest.mark.parametrize("name,fn", RELATION_FNS, ids=[n for n, _ in RELATION_FNS])
def test_relation_backward_twice(name, fn):
    """Without retain_graph: PyTorch's usual error. With it: the gradients add up."""
    s = torch.randn(2, 7, 4, requires_grad=True)
    t = torch.randn(2, 7, 6, requires_grad=True)
    loss = fn(s, t)
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    s.grad, t.grad = None, None
    loss = fn(s, t) * 1.5
    loss.backward(retain_graph=True)
    gs, gt = s.grad.clone(), t.grad.clone()
    loss.backward()  # recomputed (the first gradient buffer was handed over): equal to fp32 rounding
    assert relerr(s.grad, 2 * gs) < 1e-5 and relerr(t.grad, 2 * gt) < 1e-5


WITH_PAIRWISE = RELATION_FNS + [("pairwise_distances", lambda s, t: kdfast.pairwise_distances(s))]


@pytest.mark.parametrize("name,fn", WITH_PAIRWISE, ids=[n for n, _ in WITH_PAIRWISE])
def test_relation_no_grad_anywhere_builds_no_graph(name, fn):
    s, t = torch.randn(6, 4), torch.randn(6, 5)
    out = fn(s, t)
    assert out.grad_fn is None and not out.requires_grad
    s.requires_grad_()
    with FusedOpCalls() as calls:  # and computes no gradient
        with torch.no_grad():
            out = fn(s, t)
        assert out.grad_fn is None and not out.requires_grad
        with torch.inference_mode():
            assert fn(s, t).grad_fn is None
    assert all(f == (False, False) for f in calls.flags)
    assert len(calls.flags) == {"pairwise_distances": 0}.get(name, 2)  # rkd_loss: one op for both terms


@pytest.mark.parametrize("name,fn", RELATION_FNS, ids=[n for n, _ in RELATION_FNS])
def test_relation_upstream_gradient_not_one(name, fn):
    """The fused relation ops write their gradient for an assumed upstream gradient; any other
    upstream (loss used twice, a per-group weighting through B groups) must be rescaled correctly."""
    s0, t0 = torch.randn(3, 9, 5, dtype=torch.float64), torch.randn(3, 9, 7, dtype=torch.float64)
    got = {}
    for backend in ("native", "reference"):
        kdfast.set_backend(backend)
        s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
        loss = fn(s, t)
        got[backend] = torch.autograd.grad(loss * 2.5 + loss ** 2 - 3 * fn(s[:1], t[:1]), [s, t])
    for a, b in zip(got["native"], got["reference"]):
        assert relerr(a, b) < 1e-10


def test_rkd_loss_zero_weights():
    """A weight of 0 switches its term off, value and gradient: against the reference's other term
    alone (float64)."""
    s = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(8, 6, dtype=torch.float64)
    for dw, aw, other in ((0.0, 2.0, lambda: 2.0 * ref.rkd_angle_loss(s, t)),
                          (3.0, 0.0, lambda: 3.0 * ref.rkd_distance_loss(s, t)),
                          (0.0, 0.0, lambda: (s * 0).sum())):
        loss = kdfast.rkd_loss(s, t, distance_weight=dw, angle_weight=aw)
        want = other()
        torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=0)
        (g,) = torch.autograd.grad(loss, s)
        (w,) = torch.autograd.grad(want, s)
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-14)


def _autocast_features():
    torch.manual_seed(5)
    lin_s, lin_t = torch.nn.Linear(16, 24), torch.nn.Linear(16, 32)
    return lin_s, lin_t, torch.randn(10, 16)


AUTOCAST_LOSSES = {
    "kd_loss": lambda a, b, m: kdfast.kd_loss(a, b[:, :24], mask=m, reduction="mean"),
    "softmax_kl_div": lambda a, b, m: kdfast.softmax_kl_div(a, b[:, :24].float(), temperature=2.0),
    "logit_mse": lambda a, b, m: kdfast.logit_mse(a, b[:, :24]),
    "feature_l2": lambda a, b, m: kdfast.feature_l2([a], [b[:, :24]]),
    "cosine_loss": lambda a, b, m: kdfast.cosine_loss(a, b[:, :24]),
}
AUTOCAST_RELATION = {
    "rkd_distance_loss": lambda a, b, m: kdfast.rkd_distance_loss(a, b),
    "rkd_angle_loss": lambda a, b, m: kdfast.rkd_angle_loss(a, b),
    "rkd_loss": lambda a, b, m: kdfast.rkd_loss(a, b),
    "pairwise_distances": lambda a, b, m: kdfast.pairwise_distances(a).pow(2).mean(),  # mean(psi) alone is constant
}


def _check_autocast(name, fn, backend):
    """Under torch.autocast("cpu", bfloat16) a Linear produces bf16 features / logits: the loss is
    float32 (as F.mse_loss / F.kl_div are under autocast), gradients reach the Linear, and the value
    equals the loss of the same bf16 values outside autocast (computed in fp32 either way)."""
    kdfast.set_backend(backend)
    lin_s, lin_t, x = _autocast_features()
    mask = torch.rand(10) > 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = lin_s(x) + 3.0, lin_t(x).detach()
        assert a.dtype == b.dtype == torch.bfloat16
        torch_dtype = F.mse_loss(a, b[:, :24]).dtype
        loss = fn(a, b, mask)
    assert loss.dtype == torch_dtype == torch.float32, f"{name}: {loss.dtype}"
    loss.backward()
    g = lin_s.weight.grad
    assert g is not None and g.dtype == torch.float32 and bool(torch.isfinite(g).all()), name
    assert g.abs().sum() > 0, f"{name}: no gradient reached the Linear"
    outside = fn(a.detach(), b, mask)
    assert relerr(loss, outside) < 1e-5, f"{name}: {loss.item()!r} under autocast, {outside.item()!r} outside"


@pytest.mark.parametrize("backend", ["auto", "native", "reference"])  # (auto: small squared errors take ATen)
@pytest.mark.parametrize("name", list(AUTOCAST_LOSSES))
def test_autocast_losses_run_in_float32(name, backend):
    """(softmax-KL with an fp32 teacher and native backend: also test_softmax_kl.py.)"""
    _check_autocast(name, AUTOCAST_LOSSES[name], backend)


_AUTOCAST_JOBS = {}
_AUTOCAST_SNIPPET = """
import sys
sys.path.insert(0, "tests")
import test_hardening as h
h._check_autocast(sys.argv[1], h.AUTOCAST_RELATION[sys.argv[1]], "native")
print("ok")
"""


@pytest.mark.parametrize("name", list(AUTOCAST_RELATION))
def test_autocast_relation_native_in_subprocess(name):
    from conftest import start_python
    if not _AUTOCAST_JOBS:  # start all of them at once: their interpreter start-ups overlap
        for n in AUTOCAST_RELATION:
            _AUTOCAST_JOBS[n] = start_python(["-c", _AUTOCAST_SNIPPET.replace("sys.argv[1]", repr(n))])
    job = _AUTOCAST_JOBS[name]
    try:
        proc = job.result(timeout=120)
    finally:
        job.kill()
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), \
        f"rc={proc.returncode}\n{proc.stderr[-1500:]}"


@pytest.mark.parametrize("name", ["rkd_distance_loss", "rkd_angle_loss", "rkd_loss"])
def test_autocast_relation_reference(name):
    _check_autocast(name, AUTOCAST_RELATION[name], "reference")


# ============================================================================= modules

def test_feature_l2_multi_layer_projection_round_trips():
    """A two-layer FeatureL2Loss with projections on channel dim 1 of NCHW maps: pickle, deepcopy and
    state_dict (also nested inside a model) keep its weights; copies are independent."""
    torch.manual_seed(9)
    module = knn.FeatureL2Loss(student_channels=[4, 6], teacher_channels=[8, 6], channel_dim=1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    s = [torch.randn(2, 4, 3, 3), torch.randn(2, 6, 5, 5)]
    t = [torch.randn(2, 8, 3, 3), torch.randn(2, 6, 5, 5)]
    expected = module(s, t)
    for clone in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        torch.testing.assert_close(clone(s, t), expected, rtol=0, atol=0)
        with torch.no_grad():
            next(clone.parameters()).add_(1.0)
        torch.testing.assert_close(module(s, t), expected, rtol=0, atol=0)  # the original is untouched
    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(3, 3), "hint": module})
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = torch.nn.ModuleDict({"backbone": torch.nn.Linear(3, 3),
                                 "hint": knn.FeatureL2Loss([4, 6], [8, 6], channel_dim=1)})
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh["hint"](s, t), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError):  # a differently shaped module refuses the weights
        knn.FeatureL2Loss([4, 6], [8, 12], channel_dim=1).load_state_dict(module.state_dict())


def test_feature_l2_projection_trains_with_the_student():
    """The projection's weights train together with a student network (one optimizer), and the hint
    loss falls; the module is used the usual way, as a submodule of the training objective."""
    torch.manual_seed(10)
    x = torch.randn(64, 12)
    teacher = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh())
    student = torch.nn.Linear(12, 6)
    hint = knn.FeatureL2Loss(student_channels=6, teacher_channels=16)
    proj_before = hint.projections[0].weight.detach().clone()
    opt = torch.optim.Adam(list(student.parameters()) + list(hint.parameters()), lr=0.02)
    with torch.no_grad():
        ft = teacher(x)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = hint(student(x), ft)
        loss.backward()
        assert hint.projections[0].weight.grad is not None and student.weight.grad is not None
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], f"{losses[0]:.4f} -> {losses[-1]:.4f}"
    assert not torch.equal(hint.projections[0].weight, proj_before)


def test_modules_round_trip_after_use_and_on_float64():
    """Every kdfast.nn module still pickles / deepcopies after a forward-backward (no graph or
    cached tensor kept on the module) and works on float64 after .double()."""
    torch.manual_seed(11)
    logits = (torch.randn(4, 30, dtype=torch.float64), torch.randn(4, 30, dtype=torch.float64))
    feats = (torch.randn(6, 16, dtype=torch.float64), torch.randn(6, 16, dtype=torch.float64))
    modules = [(knn.KDLoss(2.0), logits), (knn.SoftmaxKLDivLoss(), logits), (knn.LogitMSELoss(), logits),
               (knn.FeatureL2Loss(16, 16), feats), (knn.FeatureL2Loss(16, 8), (feats[0], feats[1][:, :8])),
               (knn.CosineLoss(), feats), (knn.RKDDistanceLoss(), feats), (knn.RKDAngleLoss(), feats),
               (knn.RKDLoss(), feats)]
    for module, (s, t) in modules:
        module = module.double()
        sl = s.clone().requires_grad_()
        out = module(sl, t)
        assert out.dtype == torch.float64
        out.backward()
        assert sl.grad is not None
        assert not any(isinstance(v, torch.Tensor) and v.requires_grad for v in vars(module).values())
        for clone in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
            torch.testing.assert_close(clone(s, t), out.detach(), rtol=0, atol=0)


# ============================================================================= every validation raise

TRACED_MODULES = ["_validation.py", "functional.py", "reference.py", "nn.py", "_backend.py", "_ops.py"]
# The tests whose job is bad input: test_errors.py and the cases below that it does not reach.
RAISE_TESTS = ["tests/test_errors.py", "tests/test_hardening.py::test_bad_inputs_beyond_test_errors",
               "tests/ops/test_divergences.py::test_bad_mix_raises",
               "tests/ops/test_divergences.py::test_shared_argument_errors",
               "tests/ops/test_divergences.py::test_reference_unknown_divergence",
               "tests/ops/test_sparse_kl.py::test_errors_name_the_argument",
               "tests/ops/test_sparse_kl.py::test_bad_options",
               "tests/ops/test_sparse_kl.py::test_bad_ids_in_a_later_row_are_found"]


def _raise_sites():
    """{(file, line): source} for every `raise` statement in TRACED_MODULES (re-raises without an
    exception excluded); line is the statement's first, the line coverage.py records for it. A
    raise that shares its line with another statement (`if x: raise ...`) is refused: coverage
    would count that line as run whenever the other statement runs."""
    sites = {}
    for name in TRACED_MODULES:
        path = os.path.join(KDFAST_DIR, name)
        with open(path) as f:
            src = f.read()
        lines = src.splitlines()
        nodes = list(ast.walk(ast.parse(src)))
        stmt_lines = collections.Counter(n.lineno for n in nodes if isinstance(n, ast.stmt))
        for node in nodes:
            if isinstance(node, ast.Raise) and node.exc is not None:
                text = lines[node.lineno - 1].strip()
                assert stmt_lines[node.lineno] == 1, f"{name}:{node.lineno}: give the raise its own line: {text}"
                sites[(path, node.lineno)] = text
    return sites


def test_bad_inputs_beyond_test_errors(monkeypatch):
    """Bad inputs test_errors.py does not reach, each with the error it must raise (the raise-coverage
    check below runs this test with test_errors.py)."""
    from kdfast import _backend, _ops

    x, y = torch.randn(4, 10), torch.randn(4, 10)
    pts = torch.randn(5, 3)
    calls = [
        (lambda: kdfast.rkd_loss(torch.randn(0, 5, 3), torch.randn(0, 5, 3)), ValueError, "student"),
        (lambda: kdfast.rkd_angle_loss(torch.randn(0, 5, 3), torch.randn(0, 5, 4)), ValueError, "student"),
        (lambda: knn.FeatureL2Loss(4, 4)([x[:, :4], x[:, :4]], [y[:, :4], y[:, :4]]), ValueError,
         "feature pairs"),
        (lambda: kdfast.pairwise_distances(pts, eps="1e-12"), TypeError, "eps"),
        (lambda: kdfast.rkd_distance_loss(pts, pts, eps=math.inf), ValueError, "eps"),
        (lambda: kdfast.cosine_loss(torch.tensor(1.0), torch.tensor(2.0)), ValueError, "dim"),
        (lambda: kdfast.cosine_loss(x, y, eps="small"), TypeError, "eps"),
        (lambda: kdfast.reference.feature_l2(x, y, reduction="batchmean"), ValueError, "reduction"),
        (lambda: _ops.select_cpu_isa("sse9"), ValueError, "ISA"),
        (lambda: kdfast.set_backend(None), ValueError, "backend"),
    ]
    for fn, exc, match in calls:
        with pytest.raises(exc, match=match):
            fn()
    # the extension missing (a pure-Python install): "native" is refused with an actionable message;
    # a loss under "native" raises it too
    monkeypatch.setattr(_ops, "LOADED", False)
    monkeypatch.setattr(_ops, "LOAD_ERROR", ImportError("no module kdfast._C"))
    with pytest.raises(RuntimeError, match="(?s)extension is not loaded.*pip install"):
        kdfast.set_backend("native")
    monkeypatch.setattr(_backend, "_backend", "native")
    with pytest.raises(RuntimeError, match="extension is not loaded"):
        kdfast.kd_loss(x, y)
    monkeypatch.setattr(_backend, "_backend", "auto")
    monkeypatch.setattr(_backend, "_warned_missing", False)
    with pytest.warns(RuntimeWarning, match="reference backend"):
        out = kdfast.kd_loss(x, y)
    assert torch.isfinite(out)
    monkeypatch.undo()
    # backend "native" on a device without kernels
    kdfast.set_backend("native")
    with pytest.raises(RuntimeError, match="(?s)native.*no kernel for device meta"):
        kdfast.rkd_loss(torch.empty(5, 3, device="meta"), torch.empty(5, 3, device="meta"))
    kdfast.set_backend("auto")


def test_every_validation_raise_is_triggered(tmp_path):
    """Every `raise` in kdfast's Python layer (_validation, functional, reference, nn, _backend,
    _ops) is executed by a bad-input test: RAISE_TESTS run under coverage.py in a fresh interpreter,
    and each raise statement must be among the lines it executed. A new raise without a test fails
    this, listing it."""
    data_file = tmp_path / "coverage.data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KDFAST_", "COVERAGE_"))}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "coverage", "run", f"--data-file={data_file}",
                           f"--include={KDFAST_DIR}{os.sep}*", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *RAISE_TESTS], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) > 100, \
        f"too few bad-input tests ran: the check would be vacuous\n{proc.stdout[-1000:]}"
    data = coverage.CoverageData(basename=str(data_file))
    data.read()
    executed = {os.path.realpath(f): set(data.lines(f)) for f in data.measured_files()}
    assert {os.path.realpath(os.path.join(KDFAST_DIR, n)) for n in TRACED_MODULES} <= set(executed), \
        f"coverage measured {sorted(executed)}, not the kdfast modules under test"
    missed = [f"{os.path.basename(path)}:{line}: {text}" for (path, line), text in sorted(_raise_sites().items())
              if line not in executed[os.path.realpath(path)]]
    assert not missed, "raise statements no test triggers:\n" + "\n".join(missed)


@needs_cuda
def test_cuda_device_mismatch_every_direction():
    """CUDA with CPU in every argument position and both backends (the CPU-side equivalents with
    the meta device are in test_errors.py)."""
    xc, yc = torch.randn(4, 10, device="cuda"), torch.randn(4, 10, device="cuda")
    x, y = xc.cpu(), yc.cpu()
    for backend in ("auto", "reference"):
        kdfast.set_backend(backend)
        with pytest.raises(ValueError, match=r"(?s)student_logits.*teacher_logits"):
            kdfast.softmax_kl_div(x, yc)
        with pytest.raises(ValueError, match="mask"):
            kdfast.kd_loss(x, y, mask=torch.ones(4, dtype=torch.bool, device="cuda"))
        with pytest.raises(ValueError, match="mask"):
            kdfast.kd_loss(xc, yc, mask=torch.ones(4, dtype=torch.bool))
        with pytest.raises(ValueError, match=r"(?s)student.*teacher"):
            kdfast.rkd_angle_loss(torch.randn(5, 3), torch.randn(5, 3, device="cuda"))
        with pytest.raises(ValueError, match=r"(?s)student_feats.*teacher_feats"):
            kdfast.cosine_loss(xc, y)
        with pytest.raises(ValueError, match=r"(?s)student_logits.*teacher_logits"):
            kdfast.logit_mse(x, yc)



# ============================================================================= zero upstream gradients

@pytest.mark.parametrize("second", [False, True], ids=["first_backward", "retain_graph_again"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["softmax_kl_div", "generalized_jsd", "cosine_loss", "sparse_kl_div"])
def test_zero_upstream_on_nonfinite_row_gives_pytorchs_nan(name, dtype, second):
    """reduction="none" with an upstream gradient of 0 on a row holding NaN or -inf: PyTorch's
    gradient there is 0 times the row's, NaN. Rows skipped as masked (weight 0) must not be
    confused with them: float16 and a second backward recompute at upstream * weight, where they
    once came back 0 (fuzz seed 7 case 2612)."""
    check_zero_upstream_rows(name, dtype, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_zero_upstream_on_nonfinite_row_op_autograd(dtype):
    """The same through the op's own registered autograd (torch.ops.kdfast.feature_match), with a
    masked row (weight 0) holding NaN that must stay 0."""
    s, t, _ = zero_upstream_case("cosine_loss", dtype)
    s[0, 0] = math.nan
    x = s.requires_grad_()
    weight = torch.tensor([0.0, 1.0, 1.0, 1.0])
    loss, _, _ = torch.ops.kdfast.feature_match(x, t, True, 1e-8, weight, False, False)
    (loss * torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=loss.dtype)).sum().backward()
    assert not x.grad[0].isnan().any() and (x.grad[0] == 0).all()  # masked
    assert x.grad[1].isnan().all()  # 0 * NaN
    assert x.grad[2].isnan().all() and not x.grad[3].isnan().any()
