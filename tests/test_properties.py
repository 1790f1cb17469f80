"""Property-based agreement (hypothesis): the native kernels and the pure-PyTorch reference, each run
in the input dtype, against kdfast.reference evaluated in float64 on the very same values.

* softmax-KL / KD: random leading shapes (0 to 3 dims, including 0 rows), V from 1 to 70,000 (mostly
  small, sometimes large), temperatures 0.05..100, logit scales, -inf logits (masked vocabulary),
  masks, every reduction, upstream gradients, which inputs require grad, all four float dtypes (and
  sometimes a teacher of another dtype), and
  random layouts for student and teacher independently: transposed / permuted, sliced with a step
  along the rows or the vocabulary, a narrowed vocabulary, an odd storage offset, and a teacher
  broadcast with .expand (stride 0). The comparison is conftest.check_kl (per-dtype norm-wise
  tolerances relative to the conditioning of the float64 answer).
* relation ops (rkd_distance_loss, rkd_angle_loss, rkd_loss, pairwise_distances): N in 2..64,
  student width and teacher width independently in 1..40, B in {none, 1, 2, 3}, exact duplicate
  points, points far from the origin (offset 100, unit spread), random deltas / weights / flags,
  and the same kinds of random layouts (transposed, stepped, offset, expanded with stride 0).

* invariances of the native kernels in float64: per-row logit shifts, kd = T^2 kl, "none" sums to
  "sum", masked rows add exactly 0; rotation / scale / translation of the points and permutations.

Profiles: "ci" (default; fixed example budget, derandomized so CI is reproducible, no example
database; about 30 s here) and "thorough" (KDFAST_HYPOTHESIS_PROFILE=thorough: 7.5-10 times the
examples, random, about 4 minutes).
Example data comes from a torch.Generator seeded by a drawn integer, so a failure prints everything
needed to replay it.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import kdfast
from kdfast import reference as ref

from conftest import (DTYPE_IDS, GRAD_TOL, HALF, assert_close_scaled, check_kl, kl_floors, needs_native,
                      row_value_weights)

pytestmark = needs_native

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=10, deadline=None, derandomize=True, database=None,
                          print_blob=True, suppress_health_check=_SUPPRESS)
settings.register_profile("thorough", max_examples=100, deadline=None, print_blob=True,
                          suppress_health_check=_SUPPRESS)
PROFILE = os.environ.get("KDFAST_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "thorough"):
    raise ValueError(f"KDFAST_HYPOTHESIS_PROFILE must be 'ci' or 'thorough', got {PROFILE!r}")


def budget(ci, thorough=None):
    """Per-test example counts: `ci` under the CI profile, `thorough` (default 10x) otherwise. The
    profile is applied per test (no global settings.load_profile), so other suites are unaffected."""
    n = ci if PROFILE == "ci" else (thorough or 10 * ci)
    return settings(settings.get_profile(PROFILE), max_examples=n)


class use_backend:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.before = kdfast.get_backend()
        kdfast.set_backend(self.name)

    def __exit__(self, *exc):
        kdfast.set_backend(self.before)


# ============================================================================= softmax-KL

KL_LAYOUTS = ("contiguous", "transposed", "row_step", "col_step", "narrow", "offset")


def _embed(logical, kind, gen, params):
    """A leaf tensor and a view function with view(leaf) == logical (values), laid out as `kind`.
    Works on float64 `logical`; the view function is dtype-agnostic (check_kl reuses it on float64
    copies)."""
    shape = tuple(logical.shape)
    lead, V = shape[:-1], shape[-1]

    def filler(*sh):
        return torch.randn(*sh, generator=gen, dtype=torch.float64)

    if kind == "transposed":  # vocabulary first: last-dim stride != 1 (a general permutation for 3-D)
        leaf = logical.movedim(-1, 0).contiguous()
        return leaf, lambda x: x.movedim(0, -1)
    if kind == "row_step" and len(lead) >= 1:
        step = params["step"]
        leaf = filler(lead[0] * step + 1, *lead[1:], V)
        leaf[1::step][:lead[0]] = logical
        return leaf, lambda x, n=lead[0], k=step: x[1::k][:n]
    if kind == "col_step":
        step, off = params["step"], params["off"] % params["step"]
        leaf = filler(*lead, V * step)
        leaf[..., off::step] = logical
        return leaf, lambda x, k=step, o=off: x[..., o::k]
    if kind == "narrow":
        a, extra = params["off"], params["extra"]
        leaf = filler(*lead, V + a + extra)
        leaf[..., a:a + V] = logical
        return leaf, lambda x, a=a: x[..., a:a + V]
    if kind == "offset":  # storage offset that breaks any vector alignment
        off = params["off"]
        n = logical.numel()
        leaf = filler(n + off + 2)
        leaf[off:off + n] = logical.reshape(-1)
        return leaf, lambda x, o=off, n=n: x[o:o + n].view(shape)
    return logical.clone(), lambda x: x


@st.composite
def kl_cases(draw):
    c = {}
    c["dtype"] = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16,
                                       torch.float16]))
    c["dtype_t"] = draw(st.sampled_from([c["dtype"]] * 4 + [torch.float32, torch.float64, torch.bfloat16,
                                                             torch.float16]))  # mostly the same
    vkind = draw(st.sampled_from(["one", "small", "small", "small", "medium", "medium", "large"]))
    c["V"] = {"one": 1, "small": lambda: draw(st.integers(2, 64)),
              "medium": lambda: draw(st.integers(65, 4096)),
              "large": lambda: draw(st.integers(4097, 70000))}[vkind]
    if callable(c["V"]):
        c["V"] = c["V"]()
    V = c["V"]
    max_dim = 6 if V <= 4096 else 3
    nlead = draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3] if V <= 4096 else [0, 1, 1, 2]))
    c["lead"] = tuple(draw(st.integers(0, max_dim)) for _ in range(nlead))
    c["temperature"] = draw(st.one_of(st.sampled_from([1.0, 0.05, 100.0, 4.0]),
                                      st.floats(math.log(0.05), math.log(100.0)).map(math.exp)))
    c["scale"] = draw(st.sampled_from([0.1, 1.0, 3.0, 3.0, 10.0]))
    c["kd"] = draw(st.booleans())
    c["reduction"] = draw(st.sampled_from(["none", "sum", "mean", "batchmean"]))
    c["mask"] = draw(st.sampled_from([None, None, 0.5, 0.0, 1.0, "transposed"]))
    c["grads"] = draw(st.sampled_from(["student", "student", "both", "teacher", "none"]))
    c["upstream"] = draw(st.sampled_from([None, 0.7, -2.0, "tensor"]))
    c["ninf"] = draw(st.sampled_from([None, None, None, "shared", "teacher", "student"]))
    c["layout_s"] = draw(st.sampled_from(KL_LAYOUTS))
    c["layout_t"] = draw(st.sampled_from(KL_LAYOUTS + ("expand", "expand")))
    c["params_s"] = dict(step=draw(st.integers(2, 3)), off=draw(st.integers(1, 7)), extra=draw(st.integers(0, 3)))
    c["params_t"] = dict(step=draw(st.integers(2, 3)), off=draw(st.integers(1, 7)), extra=draw(st.integers(0, 3)))
    c["seed"] = draw(st.integers(0, 2**31 - 1))
    return c


def _kl_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    lead, V, dtype = c["lead"], c["V"], c["dtype"]
    s = torch.randn(*lead, V, generator=gen, dtype=torch.float64) * c["scale"]
    if c["layout_t"] == "expand":  # one teacher row broadcast to every row (stride 0)
        t_row = torch.randn(*([1] * len(lead)), V, generator=gen, dtype=torch.float64) * c["scale"]
        t = t_row.expand(*lead, V)
    else:
        t = torch.randn(*lead, V, generator=gen, dtype=torch.float64) * c["scale"]
    if c["ninf"] is not None and V > 1:
        # a masked vocabulary: some columns -inf (column 0 always stays finite)
        cols = torch.rand(V, generator=gen) < 0.3
        cols[0] = False
        if c["ninf"] == "shared":
            s = s.masked_fill(cols, -math.inf)
        if c["ninf"] == "student":
            # student -inf where the teacher puts its largest probability (>= 1/V, representable in
            # every dtype): that row's KL is +inf. (Where p_t is tiny but positive the answer would
            # depend on whether p_t underflows in the dtype: not a property of the kernel.)
            hit = torch.rand(lead, generator=gen) < 0.5
            top = torch.nn.functional.one_hot(t.argmax(-1), V).bool() & hit.unsqueeze(-1)
            s = s.masked_fill(top, -math.inf)
        if c["ninf"] in ("shared", "teacher"):
            if c["layout_t"] == "expand":
                t_row = t_row.masked_fill(cols, -math.inf)
                t = t_row.expand(*lead, V)
            else:
                t = t.masked_fill(cols, -math.inf)
    s_leaf, s_view = _embed(s, c["layout_s"], gen, c["params_s"])
    if c["layout_t"] == "expand":
        t_leaf, t_view = t_row.clone(), (lambda x, sh=(*lead, V): x.expand(sh))
    else:
        t_leaf, t_view = _embed(t, c["layout_t"], gen, c["params_t"])
    mask = None
    if c["mask"] == "transposed" and len(lead) == 2:
        mask = (torch.rand(lead[::-1], generator=gen) > 0.4).t()  # a non-contiguous mask
    elif c["mask"] is not None and c["mask"] != "transposed":
        mask = torch.rand(lead, generator=gen) < float(c["mask"])
    upstream = c["upstream"]
    if upstream == "tensor":
        upstream = (torch.randn(lead, generator=gen, dtype=torch.float64) if c["reduction"] == "none"
                    else 1.5)
    return (s_leaf.to(dtype), t_leaf.to(c["dtype_t"]), lambda a, b: (s_view(a), t_view(b)), mask, upstream)


def _kl_value_floor(s_view, t_view, c, mask):
    vfloor, _, _ = kl_floors(s_view, t_view, c["temperature"])
    w = row_value_weights(tuple(s_view.shape[:-1]), c["reduction"], mask, c["kd"], c["temperature"])
    floor = torch.where(w == 0, 0.0, w * vfloor).abs()
    return floor if c["reduction"] == "none" else floor.sum()


@budget(ci=600, thorough=6000)
@given(c=kl_cases())
def test_softmax_kl_native_and_reference_match_float64(c):
    note(f"case: { {k: (DTYPE_IDS.get(v, v) if isinstance(v, torch.dtype) else v) for k, v in c.items()} }")
    s, t, layout, mask, upstream = _kl_inputs(c)
    rows = math.prod(c["lead"])
    event(f"V {'1' if c['V'] == 1 else '<=64' if c['V'] <= 64 else '<=4096' if c['V'] <= 4096 else '>4096'}")
    event(f"rows {'0' if rows == 0 else '1-9' if rows < 10 else '>=10'}")
    event(f"dtype {DTYPE_IDS[c['dtype']]}" + ("" if c["dtype"] == c["dtype_t"] else " mixed"))
    event(f"layouts {c['layout_s']}/{c['layout_t']}" if "expand" in c["layout_t"] or c["layout_s"] != "contiguous"
          else "layouts contiguous student")
    kw = dict(kd=c["kd"], temperature=c["temperature"], reduction=c["reduction"], mask=mask,
              grad_student=c["grads"] in ("student", "both"), grad_teacher=c["grads"] in ("teacher", "both"),
              upstream=upstream, layout=layout)
    outs = {}
    # (in float64 the reference backend is the float64 oracle of check_kl itself: not compared there)
    all_float64 = s.dtype == t.dtype == torch.float64
    for backend in ("native", "reference") if not all_float64 else ("native",):
        with use_backend(backend):
            try:
                outs[backend] = check_kl(s, t, **kw)
            except AssertionError as e:
                raise AssertionError(f"backend {backend}: {e}") from None
    if all_float64:
        return
    # native against reference directly (both were held to float64 above with tolerance tol, so
    # they must agree to 2 tol on the same scale)
    sv, tv = layout(s.double(), t.double())
    floor = _kl_value_floor(sv, tv, c, mask)
    vdt = torch.promote_types(s.dtype, t.dtype)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(vdt, 3e-5) if s.dtype == t.dtype else 3e-5
    expected = (ref.kd_loss if c["kd"] else ref.softmax_kl_div)(
        sv, tv, temperature=c["temperature"], reduction=c["reduction"], mask=mask)
    both_finite = torch.isfinite(outs["native"][0]) & torch.isfinite(outs["reference"][0])
    assert_close_scaled(torch.where(both_finite, outs["native"][0].double(), expected),
                        torch.where(both_finite, outs["reference"][0].double(), expected),
                        torch.maximum(floor, expected.abs()), 2 * tol, "native vs reference loss")


# ============================================================================= relation ops

REL_LAYOUTS = ("contiguous", "contiguous", "transposed", "step", "offset", "expand")
# Norm-wise relative tolerances against float64 (value, gradient), calibrated on a few thousand
# examples of the strategy below (observed maxima: fp32/half values ~3e-6, fp32 gradients ~1e-3,
# fp64 ~2e-11).
# * Gradients carry an absolute floor of GRAD_FLOOR x their natural size, weight / (sigma sqrt N):
#   where the float64 gradient is (nearly) 0, e.g. every triplet collinear (D = 1, points on the
#   diagonal), the Gram-matrix formulation leaves fp32 noise of that order, which is no error.
# * The reference backend computes distances from the Gram matrix as torchdistill does, so in fp32
#   and below an exact duplicate pair gets a distance of the Gram noise (~3e-4 |x|) instead of
#   sqrt(eps): up to ~5e-3 relative in the loss. Its tolerance is wider where a group has duplicates.
NATIVE_TOL = {torch.float64: (1e-12, 1e-9), torch.float32: (2e-5, 5e-3),
              torch.float16: (2e-5, 5e-3), torch.bfloat16: (2e-5, 5e-3)}
REF_DUP_TOL = (2e-2, 2e-2)
GRAD_FLOOR = 0.1


def _has_duplicates(x):
    g = x.detach().reshape(-1, *x.shape[-2:])
    return any(torch.unique(gi, dim=0).shape[0] < gi.shape[0] for gi in g)


@st.composite
def relation_cases(draw):
    c = {}
    c["fn"] = draw(st.sampled_from(["distance", "angle", "rkd", "pairwise"]))
    c["B"] = draw(st.sampled_from([None, None, 1, 2, 3]))
    c["N"] = draw(st.one_of(st.integers(2, 8), st.integers(2, 64)))
    c["Ds"] = draw(st.one_of(st.integers(1, 4), st.integers(1, 40)))
    c["Dt"] = draw(st.one_of(st.just(c["Ds"]), st.integers(1, 40)))
    c["dtype"] = draw(st.sampled_from([torch.float32, torch.float32, torch.float32, torch.float64,
                                       torch.bfloat16, torch.float16]))
    c["offset"] = draw(st.sampled_from([0.0, 0.0, 100.0, -100.0]))
    c["sigma"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
    c["dups"] = draw(st.sampled_from([0, 0, 1, 2, 3]))
    c["layout_s"] = draw(st.sampled_from(REL_LAYOUTS))
    c["layout_t"] = draw(st.sampled_from(REL_LAYOUTS))
    c["delta"] = draw(st.one_of(st.just(1.0), st.floats(0.05, 10.0)))
    c["squared"] = draw(st.booleans())
    c["normalize"] = draw(st.booleans())
    c["weights"] = draw(st.sampled_from([(25.0, 50.0), (1.0, 0.0), (0.0, 1.0), (2.5, 0.5)]))
    c["grads"] = draw(st.sampled_from(["both", "both", "student", "teacher"]))
    c["seed"] = draw(st.integers(0, 2**31 - 1))
    return c


def _points(c, D, kind, gen):
    """(leaf float64, view fn) for one side. Coordinates lie on a grid of step sigma/8 (so distinct
    points are never closer than sigma/8: fp32's Gram-matrix noise cannot merge them), plus an
    offset far from the origin, with `dups` exact duplicate points."""
    B, N, sigma = c["B"], c["N"], c["sigma"]
    lead = (N,) if B is None else (B, N)

    def grid(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 8).round() * (sigma / 8) + c["offset"]

    if kind == "expand":
        if B is not None and N > 2 and bool(torch.rand((), generator=gen) < 0.5):
            base = grid(1, N, D)  # every group the same points
            shape = (B, N, D)
        else:
            base = grid(*lead, 1)  # points on the diagonal: stride 0 along the features
            shape = (*lead, D)
        return base, lambda x, sh=shape: x.expand(sh)
    pts = grid(*lead, D)
    for _ in range(c["dups"]):
        if N > 2:
            i, j = torch.randint(0, N, (2,), generator=gen).tolist()
            pts[..., j, :] = pts[..., i, :]
    if kind == "transposed":
        leaf = pts.transpose(-1, -2).contiguous()
        return leaf, lambda x: x.transpose(-1, -2)
    if kind == "step":
        leaf = grid(*lead[:-1], 2 * N, 2 * D + 1)
        leaf[..., ::2, 1::2] = pts
        return leaf, lambda x, d=D: x[..., ::2, 1:2 * d + 1:2]
    if kind == "offset":
        n = pts.numel()
        off = int(torch.randint(1, 8, (), generator=gen))
        leaf = grid(n + off)
        leaf[off:] = pts.reshape(-1)
        return leaf, lambda x, o=off, sh=pts.shape: x[o:].view(sh)
    return pts, lambda x: x


def _relation_call(c, s, t):
    if c["fn"] == "distance":
        return kdfast.rkd_distance_loss(s, t, delta=c["delta"], squared=c["squared"])
    if c["fn"] == "angle":
        return kdfast.rkd_angle_loss(s, t, delta=c["delta"])
    if c["fn"] == "rkd":
        dw, aw = c["weights"]
        return kdfast.rkd_loss(s, t, distance_weight=dw, angle_weight=aw, delta=c["delta"])
    return kdfast.pairwise_distances(s, squared=c["squared"], normalize=c["normalize"])


def _relation_run(c, s_leaf, t_leaf, views, upstream):
    pairwise = c["fn"] == "pairwise"  # one input: its gradient is always checked
    want = [c["grads"] in ("both", "student") or pairwise, c["grads"] in ("both", "teacher") and not pairwise]
    s_leaf = s_leaf.detach().clone().requires_grad_(want[0])
    t_leaf = t_leaf.detach().clone().requires_grad_(want[1])
    s_keep, t_keep = s_leaf.detach().clone(), t_leaf.detach().clone()
    out = _relation_call(c, views[0](s_leaf), views[1](t_leaf))
    leaves = [x for x, w in zip((s_leaf, t_leaf), want) if w]
    total = out if upstream is None else (out * upstream.to(out.dtype)).sum()
    grads = dict(zip([n for n, w in zip(("student", "teacher"), want) if w], torch.autograd.grad(total, leaves)))
    assert torch.equal(s_leaf.detach(), s_keep) and torch.equal(t_leaf.detach(), t_keep), "inputs modified"
    return out.detach(), grads


def _rel_close(actual, expected, tol, floor, what):
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert bool(torch.isfinite(a).all()), f"{what}: non-finite values {a}"
    err, scale = (a - e).norm().item(), max(e.norm().item(), floor)
    assert err <= tol * scale, f"{what}: error {err:.3e} > {tol:g} x {scale:.3e}"


@budget(ci=600, thorough=6000)
@given(c=relation_cases())
def test_relation_ops_native_and_reference_match_float64(c):
    note(f"case: { {k: (DTYPE_IDS.get(v, v) if isinstance(v, torch.dtype) else v) for k, v in c.items()} }")
    gen = torch.Generator().manual_seed(c["seed"])
    s64, s_view = _points(c, c["Ds"], c["layout_s"], gen)
    t64, t_view = _points(c, c["Dt"], c["layout_t"], gen)
    dtype = c["dtype"]
    s_in, t_in = s64.to(dtype), t64.to(dtype)
    views = (s_view, t_view)
    upstream = None
    if c["fn"] == "pairwise":
        n_out = (c["N"], c["N"]) if c["B"] is None else (c["B"], c["N"], c["N"])
        upstream = torch.randn(n_out, generator=gen, dtype=torch.float64)
    # float64 reference on the very same (rounded) values
    with use_backend("reference"):
        want, want_g = _relation_run(c, s_in.double(), t_in.double(), views, upstream)
    dups = _has_duplicates(s_view(s_in)) or _has_duplicates(t_view(t_in))
    event(f"fn {c['fn']}, dtype {DTYPE_IDS[dtype]}")
    event("duplicates" if dups else "no duplicates")
    event("far from origin" if c["offset"] else "near origin")
    event(f"N {'2-8' if c['N'] <= 8 else '9-64'}")
    # The natural size of the answer, for losses that are 0 in exact arithmetic (N = 2, identical
    # relations, D = 1 orderings ...): a weighted Huber mean is O(weight), a gradient
    # O(weight / (sigma sqrt N)); pairwise distances are O(1) per entry.
    weight = {"rkd": sum(c["weights"]), "pairwise": 1.0}.get(c["fn"], 1.0)
    vfloor = 1e-3 * weight * (1.0 if c["fn"] != "pairwise" else c["N"])
    gfloor = GRAD_FLOOR * weight / (c["sigma"] * math.sqrt(c["N"]))
    # (the reference in float64 is `want` itself: only the native kernels are compared there)
    for backend in ("native", "reference") if dtype != torch.float64 else ("native",):
        with use_backend(backend):
            got, got_g = _relation_run(c, s_in, t_in, views, upstream)
        vtol, gtol = NATIVE_TOL[dtype]
        if backend == "reference" and dups and dtype != torch.float64:
            vtol, gtol = REF_DUP_TOL
        what = f"{backend} {c['fn']}"
        assert got.dtype == (torch.float32 if dtype in HALF else dtype), f"{what}: dtype {got.dtype}"
        _rel_close(got, want, vtol, vfloor, f"{what} value")
        for name, g in got_g.items():
            leaf = s_in if name == "student" else t_in
            assert g.dtype == leaf.dtype and g.shape == leaf.shape, \
                f"{what} {name} grad {g.dtype} {tuple(g.shape)}"
            w = want_g[name]
            if dtype in HALF:
                # against the float64 gradient rounded to the dtype (the best it can hold); below
                # the smallest normal a half value only holds its fixed quantum
                tol = gtol + GRAD_TOL[dtype]
                fi = torch.finfo(dtype)
                elem = fi.smallest_normal * fi.eps / tol + gfloor / math.sqrt(w.numel())
                assert_close_scaled(g, w.to(dtype), elem, tol, f"{what} {name} gradient")
            else:
                _rel_close(g, w, gtol, gfloor, f"{what} {name} gradient")


# ============================================================================= invariances (native only)

@budget(ci=200, thorough=2000)
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=2), V=st.integers(1, 3000),
       temperature=st.floats(0.05, 100.0), reduction=st.sampled_from(["none", "sum", "mean", "batchmean"]),
       shift=st.sampled_from([-50.0, 1.0, 1000.0]), seed=st.integers(0, 2**31 - 1))
def test_softmax_kl_invariances(lead, V, temperature, reduction, shift, seed):
    """In float64, on the native kernel: adding a per-row constant to either logits changes nothing
    (softmax is shift-invariant), kd_loss is the reference's T^2 KL, reduction "none" sums to "sum",
    and a False mask row adds exactly 0 (its per-row value and gradient are 0)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, V, generator=gen, dtype=torch.float64) * 3
    t = torch.randn(*lead, V, generator=gen, dtype=torch.float64) * 3
    cs = torch.randn(*lead, 1, generator=gen, dtype=torch.float64) * shift
    ct = torch.randn(*lead, 1, generator=gen, dtype=torch.float64) * shift
    mask = torch.rand(lead, generator=gen) > 0.3
    with use_backend("native"):
        sl = s.clone().requires_grad_()
        base = kdfast.softmax_kl_div(sl, t, temperature=temperature, reduction=reduction, mask=mask)
        (g_base,) = torch.autograd.grad(base.sum(), sl)
        sl2 = (s + cs).requires_grad_()
        shifted = kdfast.softmax_kl_div(sl2, t + ct, temperature=temperature, reduction=reduction, mask=mask)
        (g_shift,) = torch.autograd.grad(shifted.sum(), sl2)
        # the float64 kernel's rounding grows with |shift| / T (the size of the numbers it subtracts)
        atol = 1e-12 * (1 + abs(shift) / temperature) * (1 + base.abs().max().item())
        torch.testing.assert_close(shifted, base, rtol=1e-10, atol=atol)
        torch.testing.assert_close(g_shift, g_base, rtol=1e-8, atol=atol)
        kd = kdfast.kd_loss(s, t, temperature=temperature, reduction=reduction, mask=mask)
        want = ref.kd_loss(s, t, temperature=temperature, reduction=reduction, mask=mask)
        torch.testing.assert_close(kd, want, rtol=1e-10, atol=atol * temperature ** 2)
        rows = kdfast.softmax_kl_div(s, t, temperature=temperature, reduction="none", mask=mask)
        assert bool((rows[~mask] == 0).all()), "a masked row adds something"
        assert bool((g_base[~mask] == 0).all()), "a masked row has a gradient"
        total = kdfast.softmax_kl_div(s, t, temperature=temperature, reduction="sum", mask=mask)
        torch.testing.assert_close(rows.sum(), total, rtol=1e-12, atol=1e-15)


@budget(ci=200, thorough=2000)
@given(N=st.integers(2, 40), Ds=st.integers(2, 24), Dt=st.integers(2, 24), B=st.sampled_from([None, 2]),
       fn=st.sampled_from(["distance", "angle", "rkd"]), seed=st.integers(0, 2**31 - 1))
def test_relation_invariances(N, Ds, Dt, B, fn, seed):
    """In float64, on the native kernels: the relation losses do not change when the student is
    rotated, scaled and translated (angles; distances through psi), and permuting the points of
    both sides together permutes the gradients the same way (D >= 2: with D = 1 every triplet is
    collinear and the angle gradient is pure rounding noise)."""
    gen = torch.Generator().manual_seed(seed)
    lead = (N,) if B is None else (B, N)
    s = torch.randn(*lead, Ds, generator=gen, dtype=torch.float64)
    t = torch.randn(*lead, Dt, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(Ds, Ds, generator=gen, dtype=torch.float64))
    scale = float(torch.empty((), dtype=torch.float64).uniform_(0.1, 10.0, generator=gen))
    moved = (s @ q) * scale + torch.randn(Ds, generator=gen, dtype=torch.float64) * 50
    perm = torch.randperm(N, generator=gen)
    call = {"distance": lambda a, b: kdfast.rkd_distance_loss(a, b, delta=0.5),
            "angle": lambda a, b: kdfast.rkd_angle_loss(a, b, delta=0.5),
            "rkd": lambda a, b: kdfast.rkd_loss(a, b)}[fn]
    with use_backend("native"):
        sl, tl = s.clone().requires_grad_(), t.clone().requires_grad_()
        base = call(sl, tl)
        gs, gt = torch.autograd.grad(base, [sl, tl])
        torch.testing.assert_close(call(moved, t), base.detach(), rtol=1e-9, atol=1e-13)
        sp, tp = s[..., perm, :].clone().requires_grad_(), t[..., perm, :].clone().requires_grad_()
        permuted = call(sp, tp)
        gsp, gtp = torch.autograd.grad(permuted, [sp, tp])
        torch.testing.assert_close(permuted, base.detach(), rtol=1e-10, atol=1e-14)
        # norm-wise, with a floor at the gradients' natural size (D >= 2 here: with D = 1 every
        # triplet is collinear and the angle gradient is rounding noise, amplified by close points)
        floor = (76.0 if fn == "rkd" else 1.0) / math.sqrt(N)
        _rel_close(gsp, gs[..., perm, :], 1e-8, floor, "permuted student gradient")
        _rel_close(gtp, gt[..., perm, :], 1e-8, floor, "permuted teacher gradient")
