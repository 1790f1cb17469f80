"""The fused feature-matching op (torch.ops.kdfast.feature_match) behind kdfast.logit_mse,
kdfast.feature_l2 and kdfast.cosine_loss, on the CPU, against float64 references: values and both
gradients across dtypes, dims, reductions, row widths and strides; zero rows; cosine edge cases
(zero rows, norms near eps, huge values, inf / NaN); autograd paths; the raw op (semantics,
opcheck); gradcheck, torch.compile, the backend switch and the nn modules. (CUDA: test_cuda.py.)"""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import _tuning, reference as ref

from conftest import (DTYPE_IDS, DTYPES, GRAD_TOL, HALF, VALUE_TOL, FusedOpCalls, compare_compiled, needs_native,
                      relerr, result_dtype, same_bits)

NAMES = ("logit_mse", "feature_l2", "cosine_loss")
R3 = ("mean", "sum", "none")


def dtype_params(dtypes=DTYPES):
    return pytest.mark.parametrize("dtype", dtypes, ids=[DTYPE_IDS[d] for d in dtypes])


def data(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def make(shape, dtype):
    return [data(*sh, dtype=dtype) for sh in shape] if isinstance(shape, list) else data(*shape, dtype=dtype)


def close(got, want, tol, what, floor=0.0):
    """Same shape and NaN / inf entries; ||got - want|| <= tol * max(||want||, floor) over the rest."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    nan, inf = want.isnan(), want.isinf()
    assert torch.equal(got.isnan(), nan), f"{what}: NaN where the reference has none or the other way round"
    assert torch.equal(got[inf], want[inf]) and not got[~inf].isinf().any(), f"{what}: infinities differ"
    fin = ~nan & ~inf
    err, scale = (got[fin] - want[fin]).norm().item(), max(want[fin].norm().item(), floor)
    assert err <= tol * scale, (f"{what}: error {err:.3e} > {tol:g} x {scale:.3e} "
                                f"(relerr {relerr(got[fin], want[fin]):.3e})")


def backward(out, upstream):
    (out.sum() if upstream is None else (out * upstream).sum()).backward()


def check(name, s, t, *, layout=None, grad_teacher=True, upstream=None, floor=0.0, **kw):
    """kdfast.<name> on leaves s, t (tensors, or lists of tensors: feature_l2 layers) mapped to the
    loss inputs by layout(s, t), against kdfast.reference.<name> on float64 copies of the same
    values: value and dtype, gradients of every leaf in its dtype (half ones against the float64
    gradient rounded to that dtype), inputs untouched. upstream: None (out.sum()), a float, or
    "random" (a random tensor of the output's shape). Returns (out, student grads, teacher grads)."""
    layers = not isinstance(s, torch.Tensor)
    S, T = (list(s), list(t)) if layers else ([s], [t])
    layout = layout or (lambda a, b: (a, b))

    def run(fn, Sl, Tl):
        views = [layout(a, b) for a, b in zip(Sl, Tl)]
        sv, tv = [v[0] for v in views], [v[1] for v in views]
        return (fn(sv, tv, **kw) if layers else fn(sv[0], tv[0], **kw)), sv + tv

    s_leaf = [a.detach().clone().requires_grad_() for a in S]
    t_leaf = [b.detach().clone().requires_grad_(grad_teacher) for b in T]
    keep = [x.detach().clone() for x in s_leaf + t_leaf]
    out, views = run(getattr(kdfast, name), s_leaf, t_leaf)
    in_dtype = functools.reduce(torch.promote_types, [x.dtype for x in views])
    assert out.dtype == result_dtype(in_dtype), f"{name}: loss dtype {out.dtype}"
    if isinstance(upstream, str):
        upstream = torch.randn(out.shape, dtype=torch.float64)
    backward(out, None if upstream is None else upstream.to(out.dtype) if torch.is_tensor(upstream) else upstream)
    for x, k in zip(s_leaf + t_leaf, keep):
        assert same_bits(x.detach(), k), f"{name}: an input was modified"
    sd = [a.detach().double().requires_grad_() for a in S]
    td = [b.detach().double().requires_grad_() for b in T]
    want, _ = run(getattr(ref, name), sd, td)
    backward(want, upstream)
    close(out, want, VALUE_TOL[in_dtype], f"{name} value")
    for leaf, d, who in zip(s_leaf + t_leaf, sd + td, ["student"] * len(S) + ["teacher"] * len(T)):
        if not leaf.requires_grad:
            assert leaf.grad is None
            continue
        g = leaf.grad
        assert g is not None and g.dtype == leaf.dtype and g.shape == leaf.shape, f"{name}: {who} gradient"
        exp = d.grad.to(leaf.dtype) if leaf.dtype in HALF else d.grad
        close(g, exp, GRAD_TOL[leaf.dtype], f"{name} {who} gradient", floor)
    return out, [x.grad for x in s_leaf], [x.grad for x in t_leaf]


# ----------------------------------------------------------------------------- values and gradients

CASES = {  # id: (function, shapes, fixed kwargs, reductions)
    "mse_2d": ("logit_mse", (6, 37), {}, R3),
    "mse_3d": ("logit_mse", (2, 3, 37), {}, R3),
    "l2_layers": ("feature_l2", [(2, 8, 4, 4), (2, 16), (5,)], {}, ("mean", "sum")),
    "l2_tensor": ("feature_l2", (3, 4, 5), {}, ("mean", "sum")),
    "cos_last": ("cosine_loss", (6, 37), {"dim": -1}, R3),
    "cos_dim1_3d": ("cosine_loss", (2, 5, 3), {"dim": 1}, R3),
    "cos_dim1_4d": ("cosine_loss", (2, 6, 3, 4), {"dim": 1}, R3),
    "cos_dim0": ("cosine_loss", (7, 5), {"dim": 0}, R3),
}


# (backend, dtype): the native kernels in every dtype, the reference below float64 (in float64 the
# reference backend is the float64 oracle itself, and comparing the two could not fail)
BACKEND_DTYPES = [(b, d) for b in ("native", "reference") for d in DTYPES if (b, d) != ("reference", torch.float64)]


@pytest.mark.parametrize("case,reduction", [(c, r) for c, v in CASES.items() for r in v[3]],
                         ids=[f"{c}-{r}" for c, v in CASES.items() for r in v[3]])
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=[f"{b}-{DTYPE_IDS[d]}" for b, d in BACKEND_DTYPES])
def test_matches_float64_reference(case, reduction, dtype, backend):
    kdfast.set_backend(backend)
    name, shape, kw, _ = CASES[case]
    check(name, make(shape, dtype), make(shape, dtype), reduction=reduction, **kw)


WIDTHS = (1, 3, 15, 17, 31, 33, 63, 65, 1000, 4097)


@needs_native
@pytest.mark.parametrize("D", WIDTHS)
@pytest.mark.parametrize("name", NAMES)
@dtype_params()
def test_row_widths(name, D, dtype):
    """Widths around the vector sizes (a row of the squared error is the whole tensor below 4096)."""
    kdfast.set_backend("native")
    if name == "cosine_loss":
        s, t = data(5, D, dtype=dtype), data(5, D, dtype=dtype)
        # D = 1: the float64 reference's gradient is rounding residue of terms of size 1 / |s|, 1 / |t|
        floor = float(max((1 / s.double().abs()).norm(), (1 / t.double().abs()).norm())) / 5 if D == 1 else 0.0
        check(name, s, t, reduction="mean", floor=floor)
        if D == 1:  # a one-element row's cosine is the constant sign(s t): its gradients are exactly 0
            s, t = s.requires_grad_(), t.requires_grad_()
            out = kdfast.cosine_loss(s, t, reduction="none")
            assert torch.equal(out.double(), 1 - torch.sign(s.double() * t.double()).squeeze(1))
            out.sum().backward()
            assert (s.grad == 0).all() and (t.grad == 0).all(), (s.grad, t.grad)
    elif name == "logit_mse":
        check(name, data(D, dtype=dtype), data(D, dtype=dtype), reduction="sum")
    else:
        check(name, [data(D, dtype=dtype), data(3, D, dtype=dtype)], [data(D, dtype=dtype), data(3, D, dtype=dtype)])


@needs_native
@pytest.mark.parametrize("shape", [(1, 100003), (20000, 3)], ids=["one_huge_row", "many_tiny_rows"])
@pytest.mark.parametrize("name", NAMES)
@dtype_params()
def test_huge_row_and_tiny_rows(name, shape, dtype):
    kdfast.set_backend("native")
    check(name, data(*shape, dtype=dtype), data(*shape, dtype=dtype),
          reduction="mean" if name != "logit_mse" else "sum", upstream=0.3)


@needs_native
@pytest.mark.parametrize("shape,dtype", [((520, 4096), torch.float32), ((520, 4097), torch.float32),
                                         ((2, 3, 350003), torch.float32), ((1040, 4096), torch.bfloat16),
                                         ((1040, 4097), torch.float16)],
                         ids=["aligned_rows", "misaligned_rows", "split_rows", "bf16_aligned_rows",
                              "fp16_misaligned_rows"])
def test_large_gradients_streamed(shape, dtype, cpu_isa):
    """Squared-error gradients of 8 MB and more are written with non-temporal stores where a slice is
    vector-aligned (rows of 4096 elements, split chunks) and with plain stores where not (4097):
    every ISA build, both gradients, against float64."""
    s, t = data(*shape, dtype=dtype), data(*shape, dtype=dtype)
    check("logit_mse", s, t, reduction="sum", upstream=0.5)


EMPTY = [("logit_mse", (0, 8), {}, R3), ("feature_l2", (0, 8), {}, ("mean", "sum")),
         ("feature_l2", [(0, 8), (3, 4)], {}, ("mean", "sum")), ("cosine_loss", (0, 8), {}, R3),
         ("cosine_loss", (0, 8), {"dim": 0}, R3), ("cosine_loss", (3, 0), {}, R3)]


@pytest.mark.parametrize("name,shape,kw,reduction", [(n, s, k, r) for n, s, k, rs in EMPTY for r in rs],
                         ids=[f"{n}-{str(s).replace(' ', '')}-dim{k.get('dim', -1)}-{r}" for n, s, k, rs in EMPTY
                              for r in rs])
def test_empty_inputs_follow_reference(name, shape, kw, reduction, backend):
    """No rows (mean is NaN as F.mse_loss gives, sum 0), or empty rows (D = 0: cosine 0, loss 1)."""
    check(name, make(shape, torch.float32), make(shape, torch.float32), reduction=reduction, **kw)


# ----------------------------------------------------------------------------- strides and dtypes

def _misaligned(R, D):
    return ((R * D + 1,), (R * D + 3,), lambda s, t: (s[1:].view(R, D), t[3:].view(R, D)))


LAYOUTS = {  # name: (student leaf shape, teacher leaf shape, layout) giving 6 x 37 (or 2 x 3 x 37) views
    "transposed": ((37, 6), (37, 6), lambda s, t: (s.t(), t.t())),
    "row_step": ((12, 37), (12, 37), lambda s, t: (s[::2], t[1::2])),
    "col_step": ((6, 74), (6, 111), lambda s, t: (s[:, ::2], t[:, 1::3])),
    "narrow_rows": ((6, 50), (6, 40), lambda s, t: (s[:, 5:42], t[:, :37])),
    "misaligned": _misaligned(6, 37),
    "misaligned_long": _misaligned(3, 4097),
    "expanded_teacher": ((6, 37), (1, 37), lambda s, t: (s, t.expand(6, 37))),
    "permuted_3d": ((37, 2, 3), (2, 37, 3), lambda s, t: (s.permute(1, 2, 0), t.transpose(1, 2))),
}
NAME_KW = [("logit_mse", {"reduction": "sum"}), ("feature_l2", {"reduction": "mean"}),
           ("cosine_loss", {"reduction": "none"}), ("cosine_loss", {"reduction": "mean"})]
NAME_KW_IDS = ["mse_sum", "l2_mean", "cos_none", "cos_mean"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name,kw", NAME_KW, ids=NAME_KW_IDS)
@dtype_params((torch.float32, torch.bfloat16, torch.float16))
def test_strides(layout, name, kw, dtype, backend):
    s_shape, t_shape, fn = LAYOUTS[layout]
    check(name, data(*s_shape, dtype=dtype), data(*t_shape, dtype=dtype), layout=fn,
          upstream="random" if kw["reduction"] == "none" else 0.7, **kw)


MIXED = [(b, ds, dt) for b in ("native", "reference")
         for ds, dt in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                        (torch.float16, torch.float64))
         if (b, dt) != ("reference", torch.float64)]  # (that one computes in float64: the oracle itself)


@pytest.mark.parametrize("backend,ds,dt", MIXED, ids=[f"{b}-{DTYPE_IDS[s]}-{DTYPE_IDS[t]}" for b, s, t in MIXED])
@pytest.mark.parametrize("name,kw", NAME_KW, ids=NAME_KW_IDS)
def test_mixed_dtypes(ds, dt, name, kw, backend):
    kdfast.set_backend(backend)
    check(name, data(5, 40, dtype=ds), data(5, 40, dtype=dt), **kw)


# ----------------------------------------------------------------------------- cosine edge cases

@pytest.mark.parametrize("eps", [1e-8, 1e-3])
@pytest.mark.parametrize("D", [7, 4097])
@pytest.mark.parametrize("backend,dtype", [bd for bd in BACKEND_DTYPES if bd[1] != torch.float16],
                         ids=[f"{b}-{DTYPE_IDS[d]}" for b, d in BACKEND_DTYPES if d != torch.float16])
def test_cosine_zero_rows_and_norms_near_eps(eps, D, dtype, backend):
    kdfast.set_backend(backend)
    s, t = data(7, D), data(7, D)
    s[0], t[1], s[2], t[2] = 0, 0, 0, 0          # a zero student row, a zero teacher row, both zero
    s[3] *= 0.99 * eps / s[3].norm()            # student norm just below eps
    s[4] *= 1.01 * eps / s[4].norm()            # just above
    t[5] *= 0.99 * eps / t[5].norm()            # teacher norm just below eps
    t[6] *= 1.01 * eps / t[6].norm()
    s, t = s.to(dtype), t.to(dtype)
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = kdfast.cosine_loss(s1, t1, reduction="none", eps=eps)
    u = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)
    (out * u.float()).sum().backward()
    close(out, ref.cosine_loss(s.double(), t.double(), reduction="none", eps=eps), VALUE_TOL[dtype], "loss")
    assert (out[:3] == 1).all(), "a zero row has cosine 0"
    # gradients as F.cosine_similarity's autograd gives them: it clamps the norms in place under
    # no_grad, so below eps the norm's own gradient x / |x| still flows (0 for a zero vector)
    sd, td = s.double().requires_grad_(), t.double().requires_grad_()
    (ref.cosine_loss(sd, td, reduction="none", eps=eps) * u).sum().backward()
    for g, e, who in ((s1.grad, sd.grad, "student"), (t1.grad, td.grad, "teacher")):
        e = e.to(dtype) if dtype in HALF else e
        for r in range(7):  # row by row: rows at eps have gradients ~1 / eps
            close(g[r], e[r], GRAD_TOL[dtype], f"{who} gradient row {r}")


HUGE = [pytest.param(torch.float32, 1e30, id="fp32-1e30"), pytest.param(torch.bfloat16, 1e30, id="bf16-1e30"),
        pytest.param(torch.float32, 1e20, id="fp32-1e20"),
        pytest.param(torch.float64, 1e200, id="fp64-1e200")]


@needs_native
@pytest.mark.parametrize("D", [8, 40000], ids=["row", "split_row"])
@pytest.mark.parametrize("dtype,scale", HUGE)
def test_cosine_huge_values(dtype, scale, D):
    """|x|^2 overflows the input dtype, cosine does not: where the reference (in the input's own
    precision) is finite, the native loss is finite and exact; the gradient (~1 / |x|, a normal
    number) does not underflow."""
    kdfast.set_backend("native")
    s, t = data(3, D, dtype=dtype, scale=scale), data(3, D, dtype=dtype, scale=scale)
    s[2] = data(D, dtype=dtype)  # only the teacher huge in this row
    assert torch.isfinite(ref.cosine_loss(s, t, reduction="none")).all()
    s1 = s.clone().requires_grad_()
    out = kdfast.cosine_loss(s1, t, reduction="none")
    assert torch.isfinite(out).all(), f"non-finite cosine loss for |x| ~ {scale:g}: {out}"
    unit = lambda x: x.double() / x.double().abs().amax(-1, keepdim=True)  # noqa: E731  (exact, no overflow)
    close(out, ref.cosine_loss(unit(s), unit(t), reduction="none"), 1e-5, "loss")
    (g,) = torch.autograd.grad(out.sum(), s1)
    if dtype != torch.float64:
        sd = s.double().requires_grad_()
        (gd,) = torch.autograd.grad(ref.cosine_loss(sd, t.double(), reduction="sum"), sd)
    else:  # the float64 reference overflows at 1e200 too: d/ds L(s / m) = L'(s / m) / m, m constant
        m = s.abs().amax(-1, keepdim=True)
        sd = (s / m).requires_grad_()
        (gd,) = torch.autograd.grad(ref.cosine_loss(sd, unit(t), reduction="sum"), sd)
        gd = gd / m
    for r in range(3):
        close(g[r], gd[r].to(dtype) if dtype in HALF else gd[r], GRAD_TOL[dtype], f"gradient row {r}")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["student", "teacher", "both"])
@pytest.mark.parametrize("D,pos", [(5, 4), (4097, 100), (4097, 4096), (40000, 39999)],
                         ids=["short", "body", "tail", "split_row"])
def test_nonfinite_inputs_propagate(value, where, D, pos, backend):
    s, t = data(3, D), data(3, D)
    if where != "teacher":
        s[1, pos] = value
    if where != "student":
        t[1, pos] = value
    for name, kw in NAME_KW:
        got = getattr(kdfast, name)(s, t, **kw)
        close(got, getattr(ref, name)(s.double(), t.double(), **kw), 1e-5, f"{name} {kw}")
    s1 = s.clone().requires_grad_()
    (g,) = torch.autograd.grad(kdfast.cosine_loss(s1, t, reduction="sum"), s1)
    sd = s.double().requires_grad_()
    (gd,) = torch.autograd.grad(ref.cosine_loss(sd, t.double(), reduction="sum"), sd)
    close(g[[0, 2]], gd[[0, 2]], 1e-5, "gradient of the finite rows")
    assert not torch.isfinite(g[1]).all(), "the non-finite row's gradient is hidden"


@pytest.mark.parametrize("where", ["student", "teacher", "both"])
@pytest.mark.parametrize("D,pos", [(5, 4), (4097, 100), (4097, 4096), (40000, 39999)],
                         ids=["short", "body", "tail", "split_row"])
def test_cosine_nan_row_is_nan_throughout(where, D, pos, cpu_isa):
    """A NaN in a cosine row makes that row's loss and every element of both its gradients NaN (a
    NaN norm must not be clamped to eps or taken for 0); the other rows stay finite and right."""
    s, t = data(3, D), data(3, D)
    if where != "teacher":
        s[1, pos] = math.nan
    if where != "student":
        t[1, pos] = math.nan
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = kdfast.cosine_loss(s1, t1, reduction="none")
    out.sum().backward()
    assert out[1].isnan() and torch.isfinite(out[[0, 2]]).all()
    for g in (s1.grad, t1.grad):
        assert g[1].isnan().all(), f"{int((~g[1].isnan()).sum())} of {D} elements of the NaN row are not NaN"
        assert torch.isfinite(g[[0, 2]]).all()
    sd, td = s.double().requires_grad_(), t.double().requires_grad_()
    ref.cosine_loss(sd, td, reduction="none")[[0, 2]].sum().backward()
    close(s1.grad[[0, 2]], sd.grad[[0, 2]], 1e-5, "student gradient of the finite rows")
    close(t1.grad[[0, 2]], td.grad[[0, 2]], 1e-5, "teacher gradient of the finite rows")


# ----------------------------------------------------------------------------- autograd paths

LOSSES = {  # (loss, number of fused op calls on the native backend)
    "mse_mean": (lambda a, b: kdfast.logit_mse(a, b), 1),
    "mse_sum": (lambda a, b: kdfast.logit_mse(a, b, reduction="sum"), 1),
    "l2_layers": (lambda a, b: kdfast.feature_l2([a, a[:, 1:]], [b, b[:, :-1]], reduction="sum"), 2),
    "cos_mean": (lambda a, b: kdfast.cosine_loss(a, b), 1),
    "cos_sum_dim0": (lambda a, b: kdfast.cosine_loss(a, b, dim=0, reduction="sum"), 1),
    "cos_none": (lambda a, b: kdfast.cosine_loss(a, b, reduction="none"), 1),
}


def test_upstream_gradients_and_backward_twice(backend):
    for name, kw in NAME_KW:  # loss * 3, and a random upstream for reduction="none"
        check(name, data(5, 33), data(5, 33), upstream="random" if kw["reduction"] == "none" else 3.0, **kw)
    s, t = data(5, 33), data(5, 33)
    for key, (fn, _) in LOSSES.items():
        s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
        out = fn(s1, t1)
        loss = (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum() * 3
        loss.backward(retain_graph=True)
        once = s1.grad.clone(), t1.grad.clone()
        loss.backward(retain_graph=True)
        close(s1.grad, 2 * once[0], 1e-6, f"{key}: student gradient after two backwards")
        close(t1.grad, 2 * once[1], 1e-6, f"{key}: teacher gradient after two backwards")
        (g3,) = torch.autograd.grad(loss * -0.5, s1)  # a third pass through the graph, another upstream
        close(g3, -0.5 * once[0], 1e-6, f"{key}: gradient of a third backward")
        assert same_bits(s1.detach(), s) and same_bits(t1.detach(), t)


@pytest.mark.parametrize("grad_teacher", [False, True])
def test_backend_switch_dispatches_fused_op(grad_teacher, backend):
    """Native: every mean / sum reduction is one feature_match call per layer pair, asked for the
    gradients that are wanted; reference: none. Under no_grad: no gradient, the loss still right."""
    s, t = data(4, 9), data(4, 9)
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_(grad_teacher)
    for key, (fn, n) in LOSSES.items():
        with FusedOpCalls() as calls:
            fn(s1, t1).sum().backward()
        want = n if backend == "native" else 0
        fused = [op for op in calls.ops if op.startswith("kdfast.feature_match")]
        assert len(fused) == want and calls.flags == [(True, grad_teacher)] * want, (key, calls.ops)
    with FusedOpCalls() as calls:
        assert kdfast.logit_mse(s1, t1, reduction="none").shape == s.shape
    assert not any(op.startswith("kdfast.") for op in calls.ops), "logit_mse(reduction='none') is elementwise"
    with FusedOpCalls() as calls, torch.no_grad():
        outs = {key: fn(s1, t1) for key, (fn, _) in LOSSES.items()}
    kdfast.set_backend("reference")  # float64 answers from the reference, whichever backend ran above
    for key, out in outs.items():
        assert out.grad_fn is None and not out.requires_grad
        close(out, LOSSES[key][0](s.double(), t.double()), 1e-5, key)
    want = sum(n for _, n in LOSSES.values()) if backend == "native" else 0
    assert calls.flags == [(False, False)] * want, calls.ops


# ----------------------------------------------------------------------------- the raw op

def _op_args(rows, D, dtype, cosine, gs, gt):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(rows, dtype=acc) + 0.1
    if rows > 1:
        w[1] = 0
    return (data(rows, D, dtype=dtype), data(rows, D, dtype=dtype), cosine, 1e-8, w, gs, gt)


FLAGS = [(False, False), (True, False), (False, True), (True, True)]
OPCHECK = ([(3, 17, dt, c, f) for dt in (torch.float32, torch.float64) for c in (False, True) for f in FLAGS]
           + [(R, D, dt, c, (True, True)) for R, D, dt in ((0, 8, torch.float32), (2, 40000, torch.float32),
                                                           (3, 33, torch.bfloat16)) for c in (False, True)])


@needs_native
@pytest.mark.parametrize("rows,D,dtype,cosine,flags", OPCHECK,
                         ids=[f"{R}x{D}-{DTYPE_IDS[dt]}-{'cos' if c else 'sq'}-{int(f[0])}{int(f[1])}"
                              for R, D, dt, c, f in OPCHECK])
def test_opcheck_feature_match(rows, D, dtype, cosine, flags):
    torch.library.opcheck(torch.ops.kdfast.feature_match.default, _op_args(rows, D, dtype, cosine, *flags))


@needs_native
@pytest.mark.parametrize("cosine", [False, True], ids=["sq_error", "cosine"])
@dtype_params((torch.float64, torch.float32, torch.bfloat16))
def test_feature_match_op_semantics(cosine, dtype):
    """Unweighted loss per row (0 where row_weight is 0, whatever the row holds), row_weight *
    dloss/dinput in the input dtype, contiguous; an arbitrary row stride; empty gradients when not asked."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s, t = data(4, 80, dtype=dtype)[:, 3:53], data(4, 50, dtype=dtype)  # student rows strided
    s[1, 7] = math.nan
    w = torch.tensor([1.0, 0.0, 2.5, -0.5], dtype=acc)
    loss, gs, gt = torch.ops.kdfast.feature_match(s, t, cosine, 1e-8, w, True, True)
    assert loss.dtype == acc and loss.shape == (4,)
    sd, td = s.double().nan_to_num(0.0).requires_grad_(), t.double().requires_grad_()  # (row 1 is skipped)
    rows = 1 - F.cosine_similarity(sd, td, dim=-1, eps=1e-8) if cosine else ((sd - td) ** 2).sum(-1)
    (rows[[0, 2, 3]] * w[[0, 2, 3]].double()).sum().backward()
    assert loss[1] == 0 and (gs[1] == 0).all() and (gt[1] == 0).all()
    close(loss[[0, 2, 3]], rows[[0, 2, 3]], VALUE_TOL[dtype], "loss_rows")
    for g, e in ((gs, sd.grad), (gt, td.grad)):
        assert g.dtype == dtype and g.shape == s.shape and g.is_contiguous()
        close(g, e.to(dtype) if dtype in HALF else e, GRAD_TOL[dtype], "gradient")
    loss2, gs0, gt0 = torch.ops.kdfast.feature_match(s, t, cosine, 1e-8, w, False, False)
    assert gs0.numel() == 0 and gt0.numel() == 0 and same_bits(loss2, loss)


# ----------------------------------------------------------------------------- gradcheck, compile

GRADCHECK = {
    "mse_mean": lambda a, b: kdfast.logit_mse(a, b),
    "mse_sum_transposed": lambda a, b: kdfast.logit_mse(a.t(), b.t(), reduction="sum"),
    "l2_layers_mean": lambda a, b: kdfast.feature_l2([a, a[:, 1:]], [b, b[:, :-1]]),
    "l2_sum_3d": lambda a, b: kdfast.feature_l2(a.view(2, 2, 6), b.view(2, 2, 6), reduction="sum"),
    "cos_none": lambda a, b: kdfast.cosine_loss(a, b, reduction="none"),
    "cos_dim0_sum": lambda a, b: kdfast.cosine_loss(a, b, dim=0, reduction="sum"),
    "cos_dim1_3d_mean": lambda a, b: kdfast.cosine_loss(a.view(2, 3, 4), b.view(2, 3, 4), dim=1),
    "cos_expanded_teacher": lambda a, b: kdfast.cosine_loss(a, b[:1].expand_as(a), reduction="sum"),
}


@needs_native
@pytest.mark.parametrize("case", list(GRADCHECK))
def test_gradcheck_native(case):
    kdfast.set_backend("native")
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(GRADCHECK[case], (a, b), check_batched_grad=False)


@needs_native
def test_compile_fullgraph_matches_eager():
    kdfast.set_backend("native")

    def f(s, t, fs, ft):
        rows = kdfast.cosine_loss(s, t, reduction="none")
        return (kdfast.logit_mse(s, t) + kdfast.logit_mse(fs, ft, reduction="sum")
                + kdfast.feature_l2([fs, s], [ft, t], reduction="sum") + kdfast.cosine_loss(fs, ft, dim=1)
                + kdfast.cosine_loss(s, t, dim=0, reduction="sum") + (rows * torch.linspace(-1, 1, 6)).sum())

    compare_compiled(f, [data(6, 37).requires_grad_(), data(6, 37).requires_grad_(),
                         data(2, 5, 3, 4).requires_grad_(), data(2, 5, 3, 4)], grads_of=[0, 1, 2])


# ----------------------------------------------------------------------------- nn modules

MODULES = {  # id: (module, the function and its arguments)
    "LogitMSELoss-sum": (lambda: kdfast.nn.LogitMSELoss(reduction="sum"), "logit_mse", {"reduction": "sum"}),
    "LogitMSELoss": (lambda: kdfast.nn.LogitMSELoss(), "logit_mse", {}),
    "FeatureL2Loss": (lambda: kdfast.nn.FeatureL2Loss(), "feature_l2", {}),
    "FeatureL2Loss-same-width": (lambda: kdfast.nn.FeatureL2Loss(8, 8, reduction="sum", channel_dim=1),
                                 "feature_l2", {"reduction": "sum"}),
    "CosineLoss-dim1": (lambda: kdfast.nn.CosineLoss(dim=1, reduction="none", eps=1e-6), "cosine_loss",
                        {"dim": 1, "reduction": "none", "eps": 1e-6}),
    "CosineLoss": (lambda: kdfast.nn.CosineLoss(), "cosine_loss", {}),
}


@pytest.mark.parametrize("case", list(MODULES))
def test_module_equals_function(case, backend):
    module, name, kw = MODULES[case]
    s, t = data(3, 8, 5), data(3, 8, 5)
    results = []
    for f in (module(), lambda a, b: getattr(kdfast, name)(a, b, **kw)):
        a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
        out = f(a, b)
        (out * torch.linspace(0.5, 1.5, out.numel()).view_as(out)).sum().backward()
        results.append((out, a.grad, b.grad))
    for x, y in zip(*results):
        assert same_bits(x.detach(), y.detach())


def test_feature_l2_module_projection(backend):
    """Projected student layers (non-contiguous after movedim) against the same projection in float64."""
    mod = kdfast.nn.FeatureL2Loss(student_channels=[8, 4], teacher_channels=[12, 4], channel_dim=1)
    S, T = [data(2, 8, 3, 3), data(2, 4)], [data(2, 12, 3, 3), data(2, 4)]
    s = [x.clone().requires_grad_() for x in S]
    out = mod(s, T)
    out.backward()
    W = mod.projections[0].weight.detach().double().requires_grad_()
    sd = [x.double().requires_grad_() for x in S]
    want = ref.feature_l2([(sd[0].movedim(1, -1) @ W.t()).movedim(-1, 1), sd[1]], [x.double() for x in T])
    want.backward()
    close(out, want, 1e-5, "loss")
    close(mod.projections[0].weight.grad, W.grad, 1e-5, "projection gradient")
    for g, e in zip((x.grad for x in s), (x.grad for x in sd)):
        close(g, e, 1e-5, "student gradient")


# ----------------------------------------------------------------------------- grad_scale

@pytest.mark.parametrize("cosine", [False, True], ids=["sq", "cos"])
@pytest.mark.parametrize("shape", [(5, 77), (2, 70001), (256, 8200)], ids=["rows", "split", "streamed"])
@dtype_params((torch.float32, torch.bfloat16, torch.float64))
def test_grad_scale_has_the_bits_of_scale_rows(cpu_isa, cosine, shape, dtype):
    """feature_match(..., grad_scale=f) writes the bits of feature_match(...) then scale_rows_(g, f),
    on the row path, split rows and (squared error) non-temporal stores of large gradients."""
    s, t = data(*shape, dtype=dtype), data(*shape, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(shape[0], dtype=acc)
    w[0] = 0  # a skipped row stays 0
    for f in (0.3, -2.5):
        loss, gs, gt = torch.ops.kdfast.feature_match(s, t, cosine, 1e-8, w, True, True, f)
        loss0, gs0, gt0 = torch.ops.kdfast.feature_match(s, t, cosine, 1e-8, w, True, True)
        for g in (gs0, gt0):
            torch.ops.kdfast.scale_rows_(g, torch.full((shape[0],), f, dtype=acc))
        assert same_bits(loss, loss0) and same_bits(gs, gs0) and same_bits(gt, gt0), f


@pytest.mark.parametrize("loss", ["logit_mse", "cosine_loss", "feature_l2"])
def test_weighted_feature_loss_steps(loss):
    """beta * loss over steps: from the third step with the same beta no pass over the gradient is
    left for backward; any step gives the bits of the same step with no history."""
    kdfast.set_backend("native")  # (auto sends squared errors this small to ATen's mse_loss)
    fn = getattr(kdfast, loss)
    s0, t0 = data(64, 300), data(64, 300)

    def step(beta, fresh=False):
        if fresh:
            kdfast._grad_scale_prediction.PREDICTOR.clear()
        s = s0.clone().requires_grad_()
        with FusedOpCalls() as calls:
            (beta * fn(s, t0)).backward()
        return s.grad, calls.ops

    for history, beta, rescaled in [([3.0, 3.0], 3.0, False), ([3.0, 3.0], 0.5, True), ([], 0.5, True)]:
        kdfast._grad_scale_prediction.PREDICTOR.clear()
        for b in history:
            step(b)
        grad, ops = step(beta)
        assert ("kdfast.scale_rows_.default" in ops) == rescaled, (history, beta, ops)
        assert same_bits(grad, step(beta, fresh=True)[0]), (history, beta)
    sd = s0.double().requires_grad_()
    (0.5 * getattr(ref, loss)(sd, t0.double())).backward()
    close(grad, sd.grad, 1e-5, "gradient")


@needs_native
@pytest.mark.parametrize("loss", ["logit_mse", "feature_l2"])
@dtype_params((torch.float32, torch.bfloat16))
def test_auto_sends_small_squared_errors_to_aten(loss, dtype):
    """Under "auto" a CPU squared error below the size where the fused op's Python autograd costs
    more than it saves runs ATen's mse_loss (the reference); from that size on, and always under
    "native", the fused op. Values and gradients agree either way."""
    below = _tuning.ATEN_MSE_BELOW[torch.empty((), dtype=dtype).element_size()]
    fn, ref_fn = getattr(kdfast, loss), getattr(ref, loss)
    for backend, rows, fused in [("auto", below // 64 - 1, False), ("auto", below // 64, True),
                                 ("native", 3, True)]:
        kdfast.set_backend(backend)
        s0, t = data(rows, 64, dtype=dtype), data(rows, 64, dtype=dtype)
        s = s0.clone().requires_grad_()
        with FusedOpCalls() as calls:
            fn(s, t).backward()
        assert ("kdfast.feature_match.default" in calls.ops) == fused, (backend, rows)
        assert ("aten.mse_loss.default" in calls.ops) == (not fused), (backend, rows)
        sd = s0.double().requires_grad_()
        want = ref_fn(sd, t.double())
        want.backward()
        close(fn(s0, t), want, 1e-5 if dtype == torch.float32 else 1e-3, "value")
        close(s.grad, sd.grad, 1e-5 if dtype == torch.float32 else 1e-2, "gradient")
