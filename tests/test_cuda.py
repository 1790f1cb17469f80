"""The CUDA kernels against float64 references computed on the CPU: values and gradients of the fused
softmax-KL across dtypes, shapes, strides, misaligned slices, masks, reductions, -inf and huge logits,
teacher gradients, every kernel path (cluster, rows, chunks), opcheck, torch.compile, rows x V >= 2^31,
and bad input. These skip without a CUDA device.

The test_emu_* cases run the very same kernel sources on the CPU, compiled with g++ against the CUDA
emulation in csrc/cuda/emu/ (threads, barriers, warp shuffles, shared memory, clusters): they check the
kernels' logic on machines without a GPU. They need g++ and the CUDA headers and run when
KDFAST_CUDA_EMU=1 (the CUDA job of .ci/run sets it)."""
import ctypes
import glob
import math
import os
import re
import shutil
import subprocess

import pytest
import torch

import kdfast
from kdfast import reference as ref

from conftest import (DTYPE_IDS, GRAD_TOL, HALF, FusedOpCalls, assert_kl_deterministic, check_kl, check_scale_rows,
                      assert_close_scaled, collinear_set, compare_compiled, decisive_mass_rows, extreme_logit_rows,
                      check_zero_upstream_rows, far_point_set, kl_floors, overflow_as, point_share, relerr,
                      same_bits)

CUDA = torch.cuda.is_available() and kdfast.native_available("cuda")
EMU = os.environ.get("KDFAST_CUDA_EMU", "0") == "1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = "cuda"
NINF = float("-inf")
REDUCTIONS = ("none", "sum", "mean", "batchmean")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Kernel paths, forced through the extension's environment knobs. The kernels read them once:
# reload_knobs() reads them again after a test changes them.
PATHS = {
    "auto": {},
    "cluster1": {"KDFAST_CUDA_KL": "cluster", "KDFAST_CUDA_KL_CLUSTER": "1"},
    "cluster4_separate": {"KDFAST_CUDA_KL": "cluster", "KDFAST_CUDA_KL_CLUSTER": "4",
                          "KDFAST_CUDA_KL_CACHE": "separate"},
    "cluster16_nocache": {"KDFAST_CUDA_KL": "cluster", "KDFAST_CUDA_KL_CLUSTER": "16",
                          "KDFAST_CUDA_KL_CACHE": "none"},
    "rows": {"KDFAST_CUDA_KL": "rows"},
    "chunks": {"KDFAST_CUDA_KL": "chunks", "KDFAST_CUDA_KL_CHUNK": "64"},
}
_KNOBS = ("KDFAST_CUDA_KL", "KDFAST_CUDA_KL_CLUSTER", "KDFAST_CUDA_KL_CACHE", "KDFAST_CUDA_KL_CHUNK",
          "KDFAST_CUDA_KL_LOG")


def reload_knobs():
    """The CUDA softmax-KL reads its knobs once per process; read them again from os.environ."""
    if CUDA:
        torch.ops.kdfast._cuda_softmax_kl_reload_knobs()


@pytest.fixture(autouse=True)
def _native_backend(request, monkeypatch):
    if "emu" not in request.fixturenames and not CUDA:
        pytest.skip("no CUDA device, or kdfast was built without CUDA kernels")
    for k in _KNOBS:
        monkeypatch.delenv(k, raising=False)
    reload_knobs()
    if CUDA:
        kdfast.set_backend("native")


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    for k, v in PATHS[request.param].items():
        monkeypatch.setenv(k, v)
    reload_knobs()
    return request.param


def logits(*shape, dtype=torch.float32, scale=3.0):
    """CPU logits, exactly representable in `dtype` (the reference sees the very same values)."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def dtype_params(dtypes=FLOAT_DTYPES):
    return pytest.mark.parametrize("dtype", dtypes, ids=[DTYPE_IDS[d] for d in dtypes])


def check_cuda(student, teacher, **kw):
    """conftest.check_kl with the loss on CUDA: kdfast there against kdfast.reference in float64 on
    the CPU, on the same values."""
    return check_kl(student, teacher, device=DEV, **kw)


# ----------------------------------------------------------------------------- values and gradients

SHAPES = [
    (4, 1),        # V = 1
    (3, 7),        # shorter than one 16-byte vector of any dtype
    (5, 33),       # odd V: rows alternate in their 16-byte alignment
    (6, 1000),
    (3, 5003),
    (2, 70001),    # few long rows: several CTAs per row / several chunks
    (9, 32768),
    (0, 17),       # no rows
    (2, 3, 37),    # 3-D leading shape
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@dtype_params((torch.float32, torch.float16, torch.bfloat16, torch.float64))
def test_matches_reference(shape, dtype, path):
    check_cuda(logits(*shape, dtype=dtype), logits(*shape, dtype=dtype), temperature=2.0,
               reduction="batchmean", grad_teacher=True)


@pytest.mark.parametrize("shape", [(4, 1000), (3, 70001)], ids=["1000", "70001"])
@dtype_params()
def test_student_gradient_only(shape, dtype, path):
    """The usual case (teacher frozen): the cluster path may cache exponentials in place."""
    check_cuda(logits(*shape, dtype=dtype), logits(*shape, dtype=dtype), kd=True, temperature=4.0)


@dtype_params()
def test_teacher_gradient_only(dtype, path):
    check_cuda(logits(7, 1300, dtype=dtype), logits(7, 1300, dtype=dtype), grad_student=False,
               grad_teacher=True, temperature=3.0)


@dtype_params()
def test_forward_only(dtype, path):
    check_cuda(logits(5, 3001, dtype=dtype), logits(5, 3001, dtype=dtype), grad_student=False,
               reduction="none")


@pytest.mark.parametrize("temperature", [0.05, 1.0, 20.0])
@dtype_params((torch.float32, torch.bfloat16))
def test_temperatures(temperature, dtype):
    check_cuda(logits(8, 1000, dtype=dtype), logits(8, 1000, dtype=dtype), kd=True, temperature=temperature,
               reduction="sum", grad_teacher=True)


@pytest.mark.parametrize("kd", [False, True], ids=["softmax_kl_div", "kd_loss"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask_kind", ["none", "random", "all_false"])
def test_reductions_and_masks(kd, reduction, mask_kind):
    lead, V = (3, 5), 257
    mask = {"none": None, "random": torch.rand(lead) > 0.4, "all_false": torch.zeros(lead, dtype=torch.bool)}[mask_kind]
    check_cuda(logits(*lead, V), logits(*lead, V), kd=kd, temperature=2.0, reduction=reduction, mask=mask,
               grad_teacher=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_upstream_gradient_not_one(reduction, path):
    """An upstream gradient other than the one the forward assumed: rows are rescaled in place on
    the device (scale_rows_)."""
    lead = (4, 3)
    mask = torch.rand(lead) > 0.3
    upstream = torch.randn(lead, dtype=torch.float64) if reduction == "none" else 0.3
    check_cuda(logits(*lead, 450, dtype=torch.bfloat16), logits(*lead, 450, dtype=torch.bfloat16), kd=True,
               temperature=2.5, reduction=reduction, mask=mask, grad_teacher=True, upstream=upstream)


def test_backward_twice_with_retain_graph():
    s, t = logits(4, 700).to(DEV), logits(4, 700).to(DEV)
    s1 = s.clone().requires_grad_()
    out = kdfast.kd_loss(s1, t, reduction="none")
    loss = (out * torch.arange(1.0, 5.0, device=DEV)).sum()
    loss.backward(retain_graph=True)
    once = s1.grad.clone()
    loss.backward()
    torch.testing.assert_close(s1.grad, 2 * once, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- strides and alignment

def _offset(x, k=1):
    """The same values at storage offset k (k elements into a fresh buffer): misaligned for k odd."""
    buf = torch.cat([x.new_zeros(k), x.reshape(-1)])
    return buf[k:].view(x.shape)


def _wide(x, extra=5):
    """The same values in rows of stride V + extra."""
    return torch.cat([x, x.new_zeros(*x.shape[:-1], extra)], -1)[..., :x.shape[-1]]


LAYOUTS = {
    "offset1_both": lambda s, t: (_offset(s), _offset(t)),            # same offset: vector path
    "offset1_teacher": lambda s, t: (s, _offset(t)),                  # different offsets: scalar path
    "offset3_student": lambda s, t: (_offset(s, 3), t),
    "row_stride": lambda s, t: (_wide(s), _wide(t, 3)),
    "transposed_lead": lambda s, t: (s.transpose(0, 1), t.transpose(0, 1)),
    "expanded_teacher": lambda s, t: (s, t[:1].expand_as(t)),          # row stride 0
}


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("V", [37, 4099, 70001])
@dtype_params()
def test_layouts(name, V, dtype, path):
    shape = (4, 3, V) if name == "transposed_lead" else (6, V)
    check_cuda(logits(*shape, dtype=dtype), logits(*shape, dtype=dtype), layout=LAYOUTS[name],
               temperature=1.3, reduction="sum", grad_teacher=True, upstream=0.7)


@pytest.mark.parametrize("ds,dt", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)],
                         ids=["bf16_fp32", "fp16_bf16"])
def test_mixed_dtypes(ds, dt):
    _, gs, gt = check_cuda(logits(5, 300, dtype=ds), logits(5, 300, dtype=dt), temperature=2.0,
                           reduction="mean", grad_teacher=True)
    assert gs.dtype == ds and gt.dtype == dt


# ----------------------------------------------------------------------------- special values

def _neg_inf_case(kind, V):
    s, t = logits(3, V), logits(3, V)
    if kind == "teacher":
        t[:, 1::3] = NINF
    elif kind == "same":
        s[:, 2::5] = NINF
        t[:, 2::5] = NINF
    elif kind == "different":                      # KL = +inf
        s[:, 1::3] = NINF
        t[:, 2::3] = NINF
    elif kind == "first_half_both":                # whole leading slices/chunks all -inf
        s[:, :V // 2] = NINF
        t[:, :V // 2] = NINF
    elif kind == "teacher_only_last":
        t[:, :-3] = NINF
    elif kind == "mixed_rows":
        s[1, 0], t[1, 0] = NINF, 5.0
        t[2, V // 2:] = NINF
    return s, t


NEG_INF_KINDS = ["teacher", "same", "different", "first_half_both", "teacher_only_last", "mixed_rows"]


@pytest.mark.parametrize("kind", NEG_INF_KINDS)
@pytest.mark.parametrize("V", [37, 70001])
@dtype_params((torch.float32, torch.bfloat16))
def test_neg_inf_logits(kind, V, dtype, path):
    s, t = _neg_inf_case(kind, V)
    out, gs, _ = check_cuda(s.to(dtype), t.to(dtype), temperature=1.5, reduction="none", grad_teacher=True)
    expect_inf = {"different": [0, 1, 2], "mixed_rows": [1]}.get(kind, [])
    for r in range(3):
        assert (out[r] == math.inf) if r in expect_inf else torch.isfinite(out[r])
    assert torch.isfinite(gs).all()


@pytest.mark.parametrize("temperature", [0.05, 1.0, 100.0])
@dtype_params()
def test_huge_logits(temperature, dtype, path):
    s = (torch.randn(6, 3000) * 1e4).clamp(-1e4, 1e4)
    t = (torch.randn(6, 3000) * 1e4).clamp(-1e4, 1e4)
    s[0], t[0] = 1e4, -1e4
    s[1, ::2], t[1, 1::2] = 1e4, 1e4
    s[1, 1::2], t[1, ::2] = -1e4, -1e4
    out, gs, _ = check_cuda(s.to(dtype), t.to(dtype), temperature=temperature, reduction="none",
                            grad_teacher=True)
    assert torch.isfinite(out).all() and torch.isfinite(gs).all()
    assert (out > 1e3 / temperature).any()


@pytest.mark.parametrize("where", ["student", "teacher", "student_at_masked", "teacher_beside_masked"])
@pytest.mark.parametrize("V", [33, 70001])
def test_nan_propagates(where, V, path):
    """A NaN logit: NaN loss and NaN gradients throughout its row on both sides (also beside -inf
    logits, where the p_t = 0 guard writes 0 and the maxima skip NaN), other rows untouched."""
    s, t = logits(3, V), logits(3, V)
    if where == "student_at_masked":
        t[1, 3], s[1, 3] = -math.inf, math.nan
    elif where == "teacher_beside_masked":
        t[1, : V // 2] = -math.inf
        t[1, 5] = math.nan
    else:
        (s if where == "student" else t)[1, V // 2] = math.nan
    s, t = s.to(DEV).requires_grad_(), t.to(DEV).requires_grad_()
    rows = kdfast.softmax_kl_div(s, t, reduction="none")
    assert rows[1].isnan()
    assert torch.isfinite(rows[[0, 2]]).all()
    assert kdfast.kd_loss(s, t).isnan()
    rows.sum().backward()
    for g in (s.grad, t.grad):
        assert g[1].isnan().all() and torch.isfinite(g[[0, 2]]).all()


def test_row_weight_zero_skips_rows(path):
    """The raw op: kl 0 and zero gradients where row_weight is 0, even over NaN logits."""
    s, t = torch.randn(4, 5000, device=DEV), torch.randn(4, 5000, device=DEV)
    s[1, 7] = math.nan
    w = torch.tensor([1.0, 0.0, 2.5, -0.5], device=DEV)
    kl, gs, gt = torch.ops.kdfast.softmax_kl(s, t, 0.5, 0, 0.0, w, True, True)
    assert kl[1] == 0 and (gs[1] == 0).all() and (gt[1] == 0).all()
    sd, td = s.double().cpu().requires_grad_(), t.double().cpu().requires_grad_()
    rows = ref.softmax_kl_div(sd, td, temperature=2.0, reduction="none")
    keep = [0, 2, 3]
    assert relerr(kl[keep].cpu(), rows.detach()[keep]) < 1e-5
    (rows[keep] * w[keep].double().cpu()).sum().backward()
    assert relerr(gs[keep].cpu(), sd.grad[keep]) < 1e-5
    assert relerr(gt[keep].cpu(), td.grad[keep]) < 1e-5


# ----------------------------------------------------------------------------- determinism, paths

@pytest.mark.parametrize("shape", [(64, 1000), (3, 70001)], ids=["1000", "70001"])
@dtype_params((torch.float32, torch.bfloat16))
def test_deterministic(shape, dtype, path):
    assert_kl_deterministic(logits(*shape, dtype=dtype).to(DEV), logits(*shape, dtype=dtype).to(DEV))


def test_paths_agree():
    """The cluster, rows and chunks paths give the same answers (to rounding)."""
    s, t = logits(6, 70001).to(DEV), logits(6, 70001).to(DEV)
    got = {}
    for name, knobs in PATHS.items():
        for k in _KNOBS:
            os.environ.pop(k, None)
        os.environ.update(knobs)
        reload_knobs()
        try:
            s1 = s.clone().requires_grad_()
            out = kdfast.kd_loss(s1, t, reduction="none")
            out.sum().backward()
            got[name] = (out.detach(), s1.grad)
        finally:
            for k in _KNOBS:
                os.environ.pop(k, None)
            reload_knobs()
    base = got["auto"]
    for name, (o, g) in got.items():
        assert relerr(o, base[0]) < 1e-5, name
        assert relerr(g, base[1]) < 1e-5, name


def test_default_plan_is_cluster_on_hopper(capfd, monkeypatch):
    """On sm_90 the default path for the benchmark shapes is the cluster kernel."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("clusters need sm_90")
    monkeypatch.setenv("KDFAST_CUDA_KL_LOG", "1")
    reload_knobs()
    for dtype in (torch.bfloat16, torch.float32):
        s = torch.randn(16, 131072, device=DEV, dtype=dtype, requires_grad=True)
        kdfast.kd_loss(s, torch.randn(16, 131072, device=DEV, dtype=dtype)).backward()
        kdfast.generalized_jsd(s, torch.randn(16, 131072, device=DEV, dtype=dtype)).backward()
    torch.cuda.synchronize()
    err = capfd.readouterr().err
    assert err.count("path=cluster") >= 4 and err.count("divergence=2 path=cluster") >= 2, err


# ----------------------------------------------------------------------------- rows x V >= 2^31

def _free_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.parametrize("path_name", ["auto", "rows", "chunks"])
def test_rows_times_vocab_at_least_2_pow_31(path_name, monkeypatch):
    """16384 x 131072 bf16 = 2^31 elements: offsets past 2^31 must not wrap (64-bit indexing)."""
    R, V = 16384, 131072
    need = 3 * R * V * 2 + (2 << 30)  # student, teacher, gradient, headroom
    if _free_bytes() < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    for k, v in PATHS.get(path_name, {"KDFAST_CUDA_KL": path_name}).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("KDFAST_CUDA_KL_CHUNK", raising=False)
    reload_knobs()
    g = torch.Generator(device=DEV).manual_seed(0)
    s = (torch.randn(R, V, device=DEV, generator=g) * 2).to(torch.bfloat16).requires_grad_()
    t = (torch.randn(R, V, device=DEV, generator=g) * 2).to(torch.bfloat16)
    rows = kdfast.softmax_kl_div(s, t, temperature=2.0, reduction="none")
    (rows * 0.25).sum().backward()
    check = [0, 1, R // 2, R - 2, R - 1]  # the last rows live past 2^31 elements
    for r in check:
        sd = s.detach()[r].double().cpu().requires_grad_()
        want = ref.softmax_kl_div(sd, t[r].double().cpu(), temperature=2.0, reduction="none")
        (want * 0.25).backward()
        assert relerr(rows[r].detach().cpu(), want.detach()) < 1e-5, r
        assert relerr(s.grad[r].cpu(), sd.grad.to(torch.bfloat16)) < 8e-3, r
    assert torch.isfinite(rows).all()
    del s, t, rows
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- ops: opcheck, compile

def _op_args(rows, V, dtype, gs, gt, device=DEV, divergence=0, mix=0.0):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(rows, dtype=acc, device=device) + 0.1
    if rows > 1:
        w[1] = 0
    return (torch.randn(rows, V, dtype=dtype, device=device), torch.randn(rows, V, dtype=dtype, device=device),
            0.5, divergence, mix, w, gs, gt)


@pytest.mark.parametrize("case", [((3, 17), torch.float32, (False, False)), ((3, 17), torch.float32, (True, True)),
                                  ((1, 1), torch.float64, (True, False)), ((0, 8), torch.float32, (True, True)),
                                  ((5, 3000), torch.bfloat16, (True, False)), ((2, 70001), torch.float32, (True, True))],
                         ids=["3x17-fp32-none", "3x17-fp32-st", "1x1-fp64-s", "0x8-fp32-st", "5x3000-bf16-s",
                              "2x70001-fp32-st"])
def test_opcheck_softmax_kl(case):
    shape, dtype, flags = case
    torch.library.opcheck(torch.ops.kdfast.softmax_kl.default, _op_args(*shape, dtype, *flags))


@dtype_params((torch.float32, torch.float16, torch.bfloat16, torch.float64))
def test_opcheck_scale_rows(dtype):
    check_scale_rows(dtype, DEV, 3003)


@pytest.mark.parametrize("divergence,mix", [(0, 0.0), (1, 0.0), (2, 0.3), (3, 0.1), (4, 0.2), (5, 0.0)])
def test_op_matches_cpu_op(divergence, mix):
    """The CUDA op and the CPU op agree on the raw outputs (a row of weight 0 included), for every
    divergence."""
    args = _op_args(6, 5000, torch.float32, True, True, device="cpu", divergence=divergence, mix=mix)
    cpu = torch.ops.kdfast.softmax_kl(*args)
    dev = torch.ops.kdfast.softmax_kl(*[a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args])
    for a, b in zip(dev, cpu):
        assert relerr(a.cpu(), b) < 1e-5


def test_compile_kd_loss_fullgraph():
    def f(s, t):
        return kdfast.kd_loss(s, t, temperature=2.0)
    compare_compiled(f, [logits(8, 1000).to(DEV).requires_grad_(), logits(8, 1000).to(DEV)], grads_of=[0],
                     rtol=1e-5, atol=1e-9)


def test_compile_mask_teacher_grad_bf16():
    def f(s, t, m):
        return 0.5 * kdfast.softmax_kl_div(s, t, temperature=3.0, reduction="mean", mask=m)
    mask = torch.rand(2, 4, device=DEV) > 0.3
    mask[0, 0] = True
    s = logits(2, 4, 500, dtype=torch.bfloat16).to(DEV).requires_grad_()
    t = logits(2, 4, 500, dtype=torch.bfloat16).to(DEV).requires_grad_()
    compare_compiled(f, [s, t, mask], grads_of=[0, 1], rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- the divergence family

# kdfast's functions of the family (DESIGN.md section 5) with their arguments: id -> (name, kwargs)
DIV_FUNCS = {
    "jsd0.5": ("generalized_jsd", {"beta": 0.5}), "jsd0.1": ("generalized_jsd", {"beta": 0.1}),
    "jsd0.9": ("generalized_jsd", {"beta": 0.9}), "jsd0": ("generalized_jsd", {"beta": 0.0}),
    "jsd1": ("generalized_jsd", {"beta": 1.0}), "reverse_kl": ("reverse_kl_div", {}),
    "skew0.1": ("skew_kl_div", {"alpha": 0.1}), "skew1.0": ("skew_kl_div", {"alpha": 1.0}),
    "skew_rev0.1": ("skew_kl_div", {"alpha": 0.1, "reverse": True}), "tvd": ("tv_distance", {}),
}
DIV_PATHS = {"auto": {}, "rows": {"KDFAST_CUDA_KL": "rows"},
             "chunks": {"KDFAST_CUDA_KL": "chunks", "KDFAST_CUDA_KL_CHUNK": "4096"},
             "cluster16": {"KDFAST_CUDA_KL": "cluster", "KDFAST_CUDA_KL_CLUSTER": "16"}}


@pytest.fixture(params=list(DIV_PATHS))
def div_path(request, monkeypatch):
    for k, v in DIV_PATHS[request.param].items():
        monkeypatch.setenv(k, v)
    reload_knobs()
    return request.param


def check_divergence_cuda(fn, s, t, *, temperature=2.0, reduction="none", mask=None, upstream_seed=0):
    """kdfast's function `fn` (a DIV_FUNCS id) on CUDA against kdfast.reference's in float64 on the
    CPU, on the same values: the loss, and both gradients of sum(out * u) for a random u. -inf logits
    are -1e4 in the reference's backward (autograd through -inf gives NaN where the derivative is a
    number; the probability of -1e4 is exactly 0 in float64 here, and the values are compared with
    the -inf inputs themselves)."""
    name, kw = DIV_FUNCS[fn]
    kw = dict(kw, temperature=temperature, reduction=reduction, mask=mask)
    sd, td = (x.detach().clone().to(DEV).requires_grad_() for x in (s, t))
    out = getattr(kdfast, name)(sd, td, **dict(kw, mask=None if mask is None else mask.to(DEV)))
    g = torch.Generator().manual_seed(upstream_seed)
    u = torch.rand(out.shape, generator=g, dtype=torch.float64) + 0.5
    (out * u.to(DEV, out.dtype)).sum().backward()
    rf = getattr(ref, name)
    want = rf(s.double(), t.double(), **kw)
    s64, t64 = (x.double().masked_fill(x.double() == NINF, -1e4).requires_grad_() for x in (s, t))
    want_g = rf(s64, t64, **kw)
    torch.testing.assert_close(want_g.detach(), want, rtol=0, atol=0, equal_nan=True)
    (want_g * u).sum().backward()
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    vtol = 1e-10 if acc == torch.float64 else 2e-5
    # the gradients' size, ||u (P + Q) / T||: the floor of their errors (one that is 0 exactly, as at
    # ties, comes out as rounding of that size)
    p, q = (torch.softmax(x.detach().nan_to_num(0.0) / temperature, -1) for x in (t64, s64))
    floor = ((p + q) * (u / temperature).reshape(*u.shape, *[1] * (p.dim() - u.dim()))).norm().item()
    got = out.detach().cpu().double()
    assert torch.equal(got.isnan(), want.isnan())
    fin = ~want.isnan()
    assert (got[fin] >= 0).all()
    assert (got[fin] - want[fin]).norm() <= vtol * max(want[fin].norm().item(), 1e-3), (got, want)
    for leaf, ref_leaf in ((sd, s64), (td, t64)):
        gw = ref_leaf.grad if ref_leaf.grad is not None else torch.zeros_like(ref_leaf)
        if s.dtype in HALF:
            gw = gw.to(s.dtype).double()
        gtol = GRAD_TOL[s.dtype] if s.dtype != torch.float32 else 2e-5
        gg = leaf.grad.cpu().double()
        ok = ~gw.isnan()
        assert torch.equal(gg.isnan(), ~ok)
        scale = max(gw[ok].norm().item(), floor)
        assert (gg[ok] - gw[ok]).norm() <= gtol * scale, (leaf.grad, gw)
    return out, sd.grad, td.grad


@pytest.mark.parametrize("shape", [(4, 1), (5, 33), (6, 1000), (2, 3, 37)], ids=lambda s: "x".join(map(str, s)))
@dtype_params((torch.float32, torch.float16, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("fn", list(DIV_FUNCS))
def test_divergences_match_reference(fn, dtype, shape):
    check_divergence_cuda(fn, logits(*shape, dtype=dtype), logits(*shape, dtype=dtype))


@dtype_params((torch.float32, torch.bfloat16))
@pytest.mark.parametrize("fn", ["jsd0.5", "jsd0.1", "reverse_kl", "skew0.1", "skew_rev0.1", "tvd"])
def test_divergences_long_rows(fn, dtype, div_path):
    """Few long rows: the default plan (clusters on sm_90), clusters of 16, one block per row,
    chunks."""
    check_divergence_cuda(fn, logits(3, 70001, dtype=dtype), logits(3, 70001, dtype=dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("fn", ["jsd0.5", "reverse_kl", "skew_rev0.1", "tvd"])
def test_divergences_reductions_and_masks(fn, reduction):
    mask = torch.rand(3, 5) > 0.4
    mask[0, 0] = True
    check_divergence_cuda(fn, logits(3, 5, 257, dtype=torch.bfloat16), logits(3, 5, 257, dtype=torch.bfloat16),
                          reduction=reduction, mask=mask, temperature=1.5)


@pytest.mark.parametrize("kind", ["teacher", "same", "student", "first_half_both", "teacher_only_last"])
@pytest.mark.parametrize("V", [37, 70001])
@pytest.mark.parametrize("fn", ["jsd0.5", "jsd0.9", "skew0.1", "skew_rev0.1", "tvd"])
def test_divergences_neg_inf_logits(fn, V, kind):
    """Masked vocabulary (-inf in the teacher only, in both, in the student only): finite values and
    gradients that match the reference (JSD, skew KL and TVD stay finite where KL would not)."""
    s, t = logits(3, V), logits(3, V)
    if kind == "teacher":
        t[:, 1::3] = NINF
    elif kind == "same":
        s[:, 2::5], t[:, 2::5] = NINF, NINF
    elif kind == "student":
        s[:, 1::3] = NINF
    elif kind == "first_half_both":
        s[:, :V // 2], t[:, :V // 2] = NINF, NINF
    else:
        t[:, :-3] = NINF
    out, gs, gt = check_divergence_cuda(fn, s, t, temperature=1.5)
    assert torch.isfinite(out).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("fn", ["jsd0.5", "skew0.1", "skew_rev0.1", "tvd"])
@dtype_params((torch.float32, torch.bfloat16))
def test_divergences_huge_logits(fn, dtype, div_path):
    s, t = -logits(4, 3000).abs() * 1e30, -logits(4, 3000).abs() * 1e30
    s[:, ::2], t[:, ::3] = 1e30, 1e30  # ties at the top: P and Q uniform over them
    s[1], t[1] = s[1] * 1e-27, t[1] * 1e-27
    check_divergence_cuda(fn, s.to(dtype), t.to(dtype), temperature=0.5)


@pytest.mark.parametrize("V", [33, 70001])
@pytest.mark.parametrize("fn", ["jsd0.5", "skew0.1", "skew_rev0.1", "tvd"])
def test_divergences_nan_propagates(fn, V, div_path):
    s, t = logits(3, V), logits(3, V)
    s[1, V // 2] = math.nan
    t[2, 0], t[2, 3] = NINF, math.nan
    name, kw = DIV_FUNCS[fn]
    s, t = s.to(DEV).requires_grad_(), t.to(DEV).requires_grad_()
    rows = getattr(kdfast, name)(s, t, reduction="none", **kw)
    assert rows[1:].isnan().all() and torch.isfinite(rows[0])
    rows.sum().backward()
    for g in (s.grad, t.grad):
        assert g[1:].isnan().all() and torch.isfinite(g[0]).all()


@pytest.mark.parametrize("divergence,mix", [(2, 0.5), (2, 0.0), (2, 1.0), (3, 0.1), (4, 0.1), (5, 0.0)],
                         ids=["jsd", "jsd0", "jsd1", "skew", "skew_rev", "tvd"])
@pytest.mark.parametrize("case", [((3, 17), torch.float32, (True, True)), ((5, 3000), torch.bfloat16, (False, True)),
                                  ((2, 70001), torch.float64, (True, False))],
                         ids=["3x17-fp32-st", "5x3000-bf16-t", "2x70001-fp64-s"])
def test_opcheck_softmax_kl_divergences(case, divergence, mix):
    shape, dtype, flags = case
    torch.library.opcheck(torch.ops.kdfast.softmax_kl.default,
                          _op_args(*shape, dtype, *flags, divergence=divergence, mix=mix))


def test_compile_generalized_jsd_fullgraph():
    def f(s, t):
        return kdfast.generalized_jsd(s, t, beta=0.3, temperature=2.0)
    compare_compiled(f, [logits(8, 1000).to(DEV).requires_grad_(), logits(8, 1000).to(DEV).requires_grad_()],
                     grads_of=[0, 1], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("second", [False, True], ids=["first_backward", "retain_graph_again"])
@dtype_params((torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("name", ["softmax_kl_div", "generalized_jsd", "cosine_loss", "sparse_kl_div"])
def test_zero_upstream_on_nonfinite_row(name, dtype, second):
    """An upstream gradient of 0 on a row holding NaN or -inf gives PyTorch's 0 x the row's gradient
    on the GPU too (float16 recomputes in backward there, and every dtype on a second backward),
    decided on the device (tests/test_hardening.py has the CPU's)."""
    check_zero_upstream_rows(name, dtype, second, device=DEV)


# ----------------------------------------------------------------------------- relation ops

def _points(B, n, D, dtype=torch.float32, dup=True):
    x = torch.randn(B, n, D, dtype=torch.float64) + 3.0  # off the origin: the ops centre
    if dup:
        x[0, 3] = x[0, 1]  # duplicate points: a zero-length side
    return x.to(dtype)


# (distance weight, angle weight, squared) of the fused RKD op: each term alone, and both
RKD_TERMS = {"distance": (1.0, 0.0, False), "distance_sq": (1.0, 0.0, True), "angle": (0.0, 1.0, False),
             "both": (25.0, 50.0, False)}
# (dtype, far:near ratio, bound on the angle gradient's error in point shares): _check_wide_span_groups
WIDE_SPAN_CASES = [(torch.float32, 1e8, 1e-4), (torch.float64, 1e6, 1e-8)]


@pytest.mark.parametrize("terms", list(RKD_TERMS))
@pytest.mark.parametrize("shape", [(1, 5, 3, 4), (2, 70, 5, 7), (1, 300, 16, 8)], ids=["5", "2x70", "300"])
@dtype_params((torch.float32, torch.float64))
def test_relation_ops_match_cpu(terms, shape, dtype):
    """The CUDA relation op against the CPU op on the same inputs (values and both gradients),
    with a group of weight 0 (no gradient) and duplicate points."""
    B, n, Ds, Dt = shape
    s, t = _points(B, n, Ds, dtype), _points(B, n, Dt, dtype)
    w = torch.full((B,), 0.7, dtype=dtype)
    if B > 1:
        w[1] = 0
    dw, aw, squared = RKD_TERMS[terms]
    cpu = torch.ops.kdfast.rkd(s, t, dw, aw, 1.0, squared, 1e-12, w, True, True)
    dev = torch.ops.kdfast.rkd(s.to(DEV), t.to(DEV), dw, aw, 1.0, squared, 1e-12, w.to(DEV), True, True)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for a, b, name in zip(dev, cpu, ("loss", "grad_student", "grad_teacher")):
        assert a.device.type == "cuda" and a.dtype == b.dtype and a.shape == b.shape, name
        assert relerr(a.cpu(), b) < tol, name
    if B > 1:
        assert (dev[1][1] == 0).all() and (dev[2][1] == 0).all()


@pytest.mark.parametrize("dtype,ratio,bound", WIDE_SPAN_CASES)
@pytest.mark.parametrize("D", [1, 3])
def test_relation_wide_span_groups(D, dtype, ratio, bound):
    """The wide-span groups on the GPU (see _check_wide_span_groups)."""
    def on_device(op):
        return lambda *a: tuple(x.cpu() for x in op(*(x.to(DEV) if isinstance(x, torch.Tensor) else x for x in a)))
    pw = on_device(lambda *a: (torch.ops.kdfast.pairwise_distances_backward(*a),))
    _check_wide_span_groups(on_device(torch.ops.kdfast.rkd), lambda *a: pw(*a)[0], D, dtype, ratio, bound)


@pytest.mark.parametrize("flags", [(True, False), (False, True), (False, False)], ids=["s", "t", "none"])
@pytest.mark.parametrize("terms", ["both", "angle"])
def test_relation_op_one_side_matches_cpu(terms, flags):
    """The fused RKD op with one gradient or none: what it computes matches the CPU op, and a
    gradient not asked for is an empty tensor."""
    s, t = _points(2, 40, 6, torch.float64), _points(2, 40, 3, torch.float64)
    w = torch.tensor([0.5, 0.0], dtype=torch.float64)
    dw, aw, squared = RKD_TERMS[terms]
    cpu = torch.ops.kdfast.rkd(s, t, dw, aw, 1.0, squared, 1e-12, w, *flags)
    dev = torch.ops.kdfast.rkd(s.to(DEV), t.to(DEV), dw, aw, 1.0, squared, 1e-12, w.to(DEV), *flags)
    for a, b, want in zip(dev, cpu, (True,) + flags):
        assert a.shape == b.shape and (a.numel() > 0) == want
        if want:
            assert relerr(a.cpu(), b) < 1e-10


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_pairwise_distances_match_cpu(squared, normalize):
    x = _points(2, 90, 12)
    cpu = torch.ops.kdfast.pairwise_distances(x, squared, normalize, 1e-12)
    dev = torch.ops.kdfast.pairwise_distances(x.to(DEV), squared, normalize, 1e-12)
    assert relerr(dev.cpu(), cpu) < 1e-5
    g = torch.randn(2, 90, 90)
    cpu_b = torch.ops.kdfast.pairwise_distances_backward(g, x, squared, normalize, 1e-12)
    dev_b = torch.ops.kdfast.pairwise_distances_backward(g.to(DEV), x.to(DEV), squared, normalize, 1e-12)
    assert relerr(dev_b.cpu(), cpu_b) < 1e-4


@pytest.mark.parametrize("fn", ["rkd_distance_loss", "rkd_angle_loss", "rkd_loss", "pairwise_distances"])
def test_relation_losses_against_reference(fn):
    s, t = _points(2, 40, 8, torch.float64), _points(2, 40, 6, torch.float64)
    f = getattr(kdfast, fn)
    rf = getattr(ref, fn)
    args = (s,) if fn == "pairwise_distances" else (s, t)
    xs = [a.to(DEV).requires_grad_() for a in args]
    xr = [a.clone().requires_grad_() for a in args]
    out, want = f(*xs), rf(*xr)
    up = torch.randn(want.shape, dtype=torch.float64)
    (out * up.to(DEV)).sum().backward()
    (want * up).sum().backward()
    assert relerr(out.detach().cpu(), want.detach()) < 1e-9
    for a, b in zip(xs, xr):
        assert relerr(a.grad.cpu(), b.grad) < 1e-8


def test_relation_ops_no_groups():
    s, t = torch.randn(0, 5, 3, device=DEV), torch.randn(0, 5, 4, device=DEV)
    w = torch.ones(0, device=DEV)
    for dw, aw, squared in RKD_TERMS.values():
        out = torch.ops.kdfast.rkd(s, t, dw, aw, 1.0, squared, 1e-12, w, True, True)
        assert out[0].shape == (0,) and out[1].shape == s.shape and out[2].shape == t.shape
    assert torch.ops.kdfast.pairwise_distances(s, False, True, 1e-12).shape == (0, 5, 5)
    for fn in (kdfast.rkd_loss, kdfast.rkd_distance_loss, kdfast.rkd_angle_loss):
        try:  # as on the CPU: the mean over no groups (NaN), or a ValueError naming the argument
            out = fn(s, t)
        except (ValueError, TypeError) as e:
            assert "student" in str(e)
        else:
            assert out.shape == () and out.isnan()


def test_opcheck_relation_ops():
    s, t = _points(2, 33, 5), _points(2, 33, 7)
    w = torch.tensor([0.5, 0.0], device=DEV)
    s, t = s.to(DEV), t.to(DEV)
    for flags in ((True, True), (False, False)):
        for dw, aw, squared in RKD_TERMS.values():
            torch.library.opcheck(torch.ops.kdfast.rkd.default, (s, t, dw, aw, 1.0, squared, 1e-12, w, *flags))
    torch.library.opcheck(torch.ops.kdfast.pairwise_distances.default, (s, False, True, 1e-12))
    torch.library.opcheck(torch.ops.kdfast.pairwise_distances_backward.default,
                          (torch.randn(2, 33, 33, device=DEV), s, False, True, 1e-12))


def test_rkd_loss_memory_is_quadratic():
    """rkd_loss forward and backward at N = 2048 stay within a few N x N matrices (no N^3 or N^2 D)."""
    N, D = 2048, 256
    s = torch.randn(N, D, device=DEV, requires_grad=True)
    t = torch.randn(N, D, device=DEV)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kdfast.rkd_loss(s, t).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 40 * N * N * 4, f"peak {peak / 2**20:.0f} MiB"
    assert torch.isfinite(s.grad).all()


# ----------------------------------------------------------------------------- bad input

# ----------------------------------------------------------------------------- feature matching

def feature_rows_reference(s, t, cosine, eps, w):
    """(loss per row, w * d loss/ds, w * d loss/dt) in float64 on the CPU, by autograd through the
    PyTorch formulation (F.cosine_similarity clamps each norm at eps)."""
    s64 = s.detach().cpu().double().requires_grad_()
    t64 = t.detach().cpu().double().requires_grad_()
    if cosine:
        rows = 1 - torch.nn.functional.cosine_similarity(s64, t64, dim=-1, eps=eps)
    else:
        rows = ((s64 - t64) ** 2).sum(-1)
    gs, gt = torch.autograd.grad((rows * w.cpu().double()).sum(), [s64, t64])
    return rows.detach(), gs, gt


def feature_inputs(R, D, dtype, case="plain", device="cpu"):
    """(student, teacher) of shape (R, D): plain, misaligned (offset 1), teacher broadcast (row
    stride 0) or special (a zero row, a row beyond float32's squared range, a tiny row)."""
    g = torch.Generator().manual_seed(R * 1000 + D)
    base_s = torch.randn(R * D + 1, generator=g, dtype=torch.float64)
    base_t = torch.randn(R * D + 1, generator=g, dtype=torch.float64)
    if case == "misaligned":
        s, t = base_s[1:].view(R, D), base_t[1:].view(R, D)
    elif case == "broadcast":
        s, t = base_s[:R * D].view(R, D), base_t[:D].view(1, D).expand(R, D)
    else:
        s, t = base_s[:R * D].view(R, D).clone(), base_t[:R * D].view(R, D).clone()
    if case == "special":
        s[0] = 0                       # zero student row: its norm is clamped at eps
        s[1], t[1] = s[1] * 1e20, t[1] * 3e19  # |x|^2 beyond float32: the sums redo in double
        t[2] = t[2] * 1e-12            # teacher norm below eps
    s, t = s.to(dtype), t.to(dtype)
    return s.to(device), t.to(device)


FEATURE_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def check_feature_rows(got, s, t, cosine, eps, w, skip_loss_rows=()):
    want = feature_rows_reference(s, t, cosine, eps, w)
    tol = FEATURE_TOL[s.dtype]
    for a, b, name in zip(got, want, ("loss", "grad_student", "grad_teacher")):
        if a is None:
            continue
        a = a.detach().cpu().double()
        if name == "loss":
            keep = [r for r in range(a.shape[0]) if r not in skip_loss_rows]
            a, b = a[keep], b[keep]
        assert torch.isfinite(a).all(), name
        assert relerr(a, b) < max(tol, 1e-6 if name == "loss" else tol), (name, relerr(a, b))


@pytest.mark.parametrize("cosine", [False, True], ids=["sq_error", "cosine"])
@pytest.mark.parametrize("D", [1, 33, 768, 4097, 9001])
@pytest.mark.parametrize("case", ["plain", "misaligned", "broadcast"])
@dtype_params((torch.float32, torch.float64, torch.bfloat16, torch.float16))
def test_feature_match_op(cosine, D, case, dtype):
    """The CUDA feature_match op against float64 autograd through the PyTorch formulation: every
    vector width, rows of several chunks, offsets and a broadcast teacher; a row of weight 0."""
    if cosine and D == 1:
        pytest.skip("1-element rows have cosine +-1 and gradient 0: relative errors mean nothing")
    s, t = feature_inputs(5, D, dtype, case, DEV)
    w = torch.tensor([0.5, 1.0, 0.0, 2.0, 1e-3], device=DEV, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    loss, gs, gt = torch.ops.kdfast.feature_match(s, t, cosine, 1e-8, w, True, True)
    assert loss[2] == 0 and (gs[2] == 0).all() and (gt[2] == 0).all()
    check_feature_rows((loss, gs, gt), s, t, cosine, 1e-8, w, skip_loss_rows=(2,))


@dtype_params((torch.float32, torch.bfloat16))
def test_feature_match_special_rows(dtype):
    s, t = feature_inputs(4, 300, dtype, "special", DEV)
    w = torch.ones(4, device=DEV)
    got = torch.ops.kdfast.feature_match(s, t, True, 1e-8, w, True, True)
    check_feature_rows(got, s, t, True, 1e-8, w)


@pytest.mark.parametrize("fn", ["logit_mse", "feature_l2", "cosine_loss"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_feature_losses_against_reference(fn, reduction):
    """The public feature losses on CUDA call the fused op and match the reference on the CPU in
    float64, values and both gradients, for a strided (sliced) student."""
    s = torch.randn(6, 3, 50, dtype=torch.float64, device=DEV)[:, :, 1:].requires_grad_()
    t = torch.randn(6, 3, 49, dtype=torch.float64, device=DEV).requires_grad_()
    s_cpu, t_cpu = s.detach().cpu().requires_grad_(), t.detach().cpu().requires_grad_()
    kw = {"dim": 1} if fn == "cosine_loss" else {}
    with FusedOpCalls() as calls:
        out = getattr(kdfast, fn)(s, t, reduction=reduction, **kw)
    assert any("kdfast.feature_match" in op for op in calls.ops)
    want = getattr(ref, fn)(s_cpu, t_cpu, reduction=reduction, **kw)
    assert relerr(out.cpu(), want.detach()) < 1e-10
    for a, b in zip(torch.autograd.grad(out, [s, t]), torch.autograd.grad(want, [s_cpu, t_cpu])):
        assert relerr(a.cpu(), b) < 1e-10


def test_opcheck_feature_match():
    s, t = feature_inputs(3, 37, torch.float32, "misaligned", DEV)
    w = torch.tensor([0.5, 0.0, 2.0], device=DEV)
    for cosine in (False, True):
        for flags in ((True, True), (False, False), (True, False)):
            torch.library.opcheck(torch.ops.kdfast.feature_match.default, (s, t, cosine, 1e-8, w, *flags))


def test_compile_cosine_loss_fullgraph():
    def f(s, t):
        return kdfast.cosine_loss(s, t, dim=1) + kdfast.logit_mse(s, t)
    compare_compiled(f, [torch.randn(8, 300, device=DEV).requires_grad_(), torch.randn(8, 300, device=DEV)],
                     grads_of=[0], rtol=1e-5, atol=1e-9)


def test_devices_must_match():
    s, t = logits(3, 10).to(DEV), logits(3, 10)
    with pytest.raises(ValueError, match="teacher_logits"):
        kdfast.softmax_kl_div(s, t)
    with pytest.raises(ValueError, match="teacher_logits"):
        kdfast.kd_loss(t, s)
    with pytest.raises(ValueError, match="mask"):
        kdfast.kd_loss(s, s, mask=torch.ones(3, dtype=torch.bool))


def test_raw_op_rejects_mixed_devices():
    s, t = torch.randn(3, 10, device=DEV), torch.randn(3, 10, device=DEV)
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.kdfast.softmax_kl(s, t, 1.0, 0, 0.0, torch.ones(3), True, False)


def test_native_available_cuda():
    assert kdfast.native_available("cuda")
    info = kdfast.build_info()
    assert info["cuda"] is True and info["cuda_archs"]


# ============================================================================= CPU emulation
#
# The kernels of csrc/cuda/*.cu compiled with g++ against csrc/cuda/emu/ and called through the same
# host functions the CUDA glue calls (ctypes). The relation ops' glue (csrc/cuda/rkd_ops.cpp) runs
# itself, on CPU tensors: see emu_glue.

def _cuda_include():
    """The CUDA toolkit's include folder (for cuda_fp16.h and the runtime API types), or None."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        try:
            with open(real, errors="ignore") as f:
                cands += [m.group(1) for m in re.finditer(r"(/[^\s\"']+)/bin/nvcc", f.read(4096))]
        except OSError:
            pass
        cands.append(os.path.dirname(os.path.dirname(real)))
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and os.path.exists(os.path.join(c, "include", "cuda_fp16.h")):
            return os.path.join(c, "include")
    return None


class Emu:
    P, I, D, Ci = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    SIGS = {
        "emu_softmax_kl": [Ci, P, P, I, I, I, I, D, P, P, P, P],
        "emu_softmax_kl_div": [Ci, P, P, I, I, I, I, D, Ci, D, P, P, P, P],
        "emu_softmax_kl_reload_knobs": [],
        "emu_scale_rows": [Ci, P, I, I, P, I],
        "emu_sparse_kl": [Ci, P, P, P, Ci, I, I, I, I, I, I, D, Ci, P, P, P, P, P],
        "emu_feature_match": [Ci, P, P, I, I, I, I, Ci, D, P, P, P, P],
    }

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.path = path
        for name, args in self.SIGS.items():
            getattr(self.lib, name).argtypes = args

    def __getattr__(self, name):
        fn = getattr(self.lib, name)

        def call(*args):  # `args` keeps temporaries alive until the call returns
            rc = fn(*[a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args])
            if name.endswith(("_blocks", "_tiles")):
                return rc
            assert rc == 0, f"{name} returned {rc}"
        return call


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if not EMU:
        pytest.skip("set KDFAST_CUDA_EMU=1 to run the CUDA kernels in the CPU emulation")
    inc, cxx = _cuda_include(), shutil.which("g++")
    if inc is None or cxx is None:
        pytest.skip("the CUDA emulation needs g++ and the CUDA toolkit's headers")
    out = str(tmp_path_factory.mktemp("emu") / "libkdfast_emu.so")
    cuda = os.path.join(REPO, "csrc", "cuda")
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-fPIC", "-shared", "-Wl,-Bsymbolic", "-DKDFAST_CUDA_EMULATE",
           "-I" + os.path.join(REPO, "csrc"), "-I" + inc,
           "-x", "c++", *sorted(glob.glob(os.path.join(cuda, "*.cu"))),
           "-x", "none", os.path.join(cuda, "emu", "emu.cpp"), "-o", out]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return Emu(out)


_KDT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
EMU_PATHS = {k: dict(v) for k, v in PATHS.items()}
EMU_PATHS["chunks"]["KDFAST_CUDA_KL_CHUNK"] = "512"  # a few chunks per row (each block is 256 threads)


def _emu_softmax_kl(emu, s, t, inv_t, w, gs=True, gt=True):
    R, V = s.shape
    kl = torch.full((R,), math.nan, dtype=torch.float64)  # the op's loss rows are float64 for every dtype
    G = torch.full((R, V), math.nan, dtype=s.dtype) if gs else None
    H = torch.full((R, V), math.nan, dtype=s.dtype) if gt else None
    emu.emu_softmax_kl_reload_knobs()  # the knobs as the test set them (the kernels read them once)
    emu.emu_softmax_kl(_KDT[s.dtype], s, t, R, V, s.stride(0), t.stride(0), inv_t, w, kl, G, H)
    return kl, G, H


def _emu_case(case, dtype):
    """(student, teacher) views for an emulated softmax-KL case."""
    R, V = {"tiny": (3, 7), "offset1": (4, 1001), "teacher_offset": (2, 5003), "broadcast": (3, 2000),
            "special": (4, 3000)}[case]
    s, t = logits(R * V + 3), logits(R * V + 3)
    if case == "offset1":
        s, t = s[1:1 + R * V].view(R, V), t[1:1 + R * V].view(R, V)
    elif case == "teacher_offset":
        s, t = s[:R * V].view(R, V), t[3:].view(R, V)
    elif case == "broadcast":
        s, t = s[:R * V].view(R, V), t[:V].view(1, V).expand(R, V)
    else:
        s, t = s[:R * V].view(R, V), t[:R * V].view(R, V)
    if case == "special":
        s, t = s.clone(), t.clone()
        t[0, 1::3] = NINF                 # masked teacher vocabulary
        s[0, 1::6] = NINF                 # ... and student -inf only where p_t = 0: finite
        s[1, 5] = NINF                    # student -inf where p_t > 0: KL = +inf
        s[2, :V // 2], t[2, :V // 2] = NINF, NINF  # leading half of the row -inf on both sides
        s[3] = s[3] * 3000                # huge logits
    return s.to(dtype), t.to(dtype)


@pytest.mark.parametrize("case", ["tiny", "offset1", "teacher_offset", "broadcast", "special"])
@dtype_params((torch.float32, torch.bfloat16, torch.float16, torch.float64))
@pytest.mark.parametrize("path_name", list(EMU_PATHS))
def test_emu_softmax_kl(emu, path_name, dtype, case, monkeypatch):
    if path_name in ("cluster16_nocache", "chunks") and dtype in (torch.float16, torch.float64):
        pytest.skip("slow in emulation: fp32 and bf16 cover this path")
    for k, v in EMU_PATHS[path_name].items():
        monkeypatch.setenv(k, v)
    s, t = _emu_case(case, dtype)
    R = s.shape[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(R) + 0.5).to(acc)
    if R > 2 and case != "special":
        w[1] = 0  # a skipped row
    kl, gs, gt = _emu_softmax_kl(emu, s, t, 0.7, w)
    sd, td = s.double().requires_grad_(), t.double().requires_grad_()
    rows = ref.softmax_kl_div(sd, td, temperature=1 / 0.7, reduction="none")
    fin = torch.isfinite(rows.detach()) & (w != 0)
    # a row with KL = +inf still has a finite student gradient (p_s - p_t); its teacher's is not compared
    (torch.where(w != 0, rows, 0.0) * w.double()).sum().backward()
    want_kl = torch.where(w != 0, rows.detach(), 0.0)
    assert torch.equal(torch.isfinite(kl), torch.isfinite(want_kl)), (kl, want_kl)
    assert torch.equal(kl[~torch.isfinite(want_kl)], want_kl[~torch.isfinite(want_kl)].to(acc))
    vtol = 1e-10 if dtype == torch.float64 else 2e-5
    assert relerr(kl[fin], want_kl[fin]) < vtol
    gtol = GRAD_TOL[dtype] if dtype != torch.float32 else 2e-5
    for got, want, keep in ((gs, sd.grad, torch.ones(R, dtype=torch.bool)), (gt, td.grad, fin | (w == 0))):
        got, want = got[keep], want[keep]
        if dtype in HALF:
            want = want.to(dtype)
        assert torch.isfinite(got).all()
        assert relerr(got, want) < gtol
    assert (gs[w == 0] == 0).all() and (gt[w == 0] == 0).all()


def _emu_check_kl(emu, s, t, inv_t):
    """The emulated kernel against float64 on rows of weight 1, as check_kl does it: norm-wise within
    the conditioning floors, the teacher gradient on rows whose KL is finite."""
    R = s.shape[0]
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    kl, gs, gt = _emu_softmax_kl(emu, s, t, inv_t, torch.ones(R, dtype=acc))
    sd, td = s.double().requires_grad_(), t.double().requires_grad_()
    rows = ref.softmax_kl_div(sd, td, temperature=1 / inv_t, reduction="none")
    rows.sum().backward()
    vfloor, sfloor, tfloor = kl_floors(sd, td, 1 / inv_t)
    # the op's loss rows are float64: a KL beyond FLT_MAX stays finite there
    assert_close_scaled(kl, rows.detach(), vfloor, 1e-10 if acc == torch.float64 else 2e-5, "loss")
    gtol = GRAD_TOL[s.dtype] if s.dtype != torch.float32 else 2e-5
    inf_rows = ~torch.isfinite(vfloor).unsqueeze(-1).expand_as(gs)
    for got, want_g, floor, skip, what in ((gs, sd.grad, sfloor, None, "student gradient"),
                                           (gt, td.grad, tfloor, inf_rows, "teacher gradient")):
        if s.dtype in HALF:
            want_g = want_g.to(s.dtype).double()
        floor = torch.where(inf_rows, 0.0, floor)
        assert_close_scaled(got, overflow_as(want_g, s.dtype), floor, gtol, what, skip=skip)
    return kl


@pytest.mark.parametrize("inv_t", [1.0, 0.25])
@pytest.mark.parametrize("path_name", list(EMU_PATHS))
def test_emu_logits_near_float_max(emu, path_name, inv_t, monkeypatch):
    """Finite logits up to ~FLT_MAX, 6e38 apart: the sums must not overflow where the float64 KL is
    finite (every path, the chunk combine included)."""
    for k, v in EMU_PATHS[path_name].items():
        monkeypatch.setenv(k, v)
    s, t = extreme_logit_rows(3001)
    kl = _emu_check_kl(emu, s, t, inv_t)
    assert (kl[[1, 5]] > 1e36).all()


# Slice and chunk bounds of the emulated paths at V = 3001 (fp32: 4 elements a vector): cluster
# slices of 752 (C = 4) and 188 (C = 16), chunks of 512.
EMU_EDGES = [0, 187, 188, 511, 512, 751, 752, 1023, 1024, 1503, 1504, 2255, 2256, 3000]


@pytest.mark.parametrize("path_name", list(EMU_PATHS))
def test_emu_decisive_element_at_slice_and_chunk_edges(emu, path_name, monkeypatch):
    """The element that decides a row's KL sits first or last in a cluster slice, a chunk or the row:
    one element dropped or repeated at a bound fails by orders of magnitude."""
    for k, v in EMU_PATHS[path_name].items():
        monkeypatch.setenv(k, v)
    s, t = decisive_mass_rows(3001, EMU_EDGES)
    kl = _emu_check_kl(emu, s, t, 1.0)
    assert (kl > 2.0).all()


def test_emu_softmax_kl_nan_and_determinism(emu, monkeypatch):
    monkeypatch.setenv("KDFAST_CUDA_KL", "cluster")
    monkeypatch.setenv("KDFAST_CUDA_KL_CLUSTER", "4")
    s, t = logits(3, 3001), logits(3, 3001)
    s[1, 17] = math.nan
    w = torch.ones(3)
    a = _emu_softmax_kl(emu, s, t, 1.0, w)
    b = _emu_softmax_kl(emu, s, t, 1.0, w)
    assert a[0][1].isnan() and torch.isfinite(a[0][[0, 2]]).all()
    for x, y in zip(a, b):
        assert same_bits(x, y)


@pytest.mark.parametrize("path_name", list(EMU_PATHS))
def test_emu_nan_row_gradients(emu, path_name, monkeypatch):
    """A NaN logit gives NaN gradients throughout its row on both sides, also beside -inf logits
    (where the p_t = 0 guard writes 0) and where the NaN-skipping maxima miss it; other rows finite."""
    for k, v in EMU_PATHS[path_name].items():
        monkeypatch.setenv(k, v)
    s, t = logits(4, 3001), logits(4, 3001)
    s[1, 17] = math.nan                       # plain
    t[2, 3], s[2, 3] = NINF, math.nan         # student NaN where p_t = 0
    t[3, :1500] = NINF                        # teacher NaN beside a masked block
    t[3, 7] = math.nan
    kl, gs, gt = _emu_softmax_kl(emu, s, t, 1.0, torch.ones(4))
    assert kl[1:].isnan().all() and torch.isfinite(kl[0])
    for g in (gs, gt):
        assert g[1:].isnan().all() and torch.isfinite(g[0]).all()


# ----------------------------------------------------------------------------- emulation: divergences

# The divergences of the softmax-KL op other than KL, as the glue (csrc/ops/softmax_kl.cpp) hands them
# to the kernels: kernel divergence id, and whether student and teacher swap roles.
_KERNEL_DIV = {"jsd": (2, False), "skew_kl": (3, False), "skew_reverse_kl": (3, True), "tvd": (5, False)}
EMU_DIVS = {"jsd0.1": ("jsd", 0.1), "jsd0.5": ("jsd", 0.5), "jsd0.9": ("jsd", 0.9), "skew0.1": ("skew_kl", 0.1),
            "skew1.0": ("skew_kl", 1.0), "skew_rev0.1": ("skew_reverse_kl", 0.1), "tvd": ("tvd", 0.0)}
ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Their kernel paths: auto is the cluster path with one CTA a row at these sizes
EMU_DIV_PATHS = {"auto": {}, "rows": EMU_PATHS["rows"], "chunks": EMU_PATHS["chunks"],
                 "cluster4": {"KDFAST_CUDA_KL": "cluster", "KDFAST_CUDA_KL_CLUSTER": "4"},
                 "cluster16": {"KDFAST_CUDA_KL": "cluster", "KDFAST_CUDA_KL_CLUSTER": "16"}}


def _emu_div(emu, s, t, inv_t, name, mix, w, gs=True, gt=True):
    """(loss rows, grad_student, grad_teacher) of the emulated kernels for divergence `name`."""
    kdiv, swap = _KERNEL_DIV[name]
    if swap:
        s, t, gs, gt = t, s, gt, gs
    R, V = s.shape
    loss = torch.full((R,), math.nan, dtype=torch.float64)  # the op's loss rows are float64 for every dtype
    G = torch.full((R, V), math.nan, dtype=s.dtype) if gs else None
    H = torch.full((R, V), math.nan, dtype=s.dtype) if gt else None
    emu.emu_softmax_kl_reload_knobs()
    emu.emu_softmax_kl_div(_KDT[s.dtype], s, t, R, V, s.stride(0), t.stride(0), inv_t, kdiv, mix, w, loss, G, H)
    return (loss, H, G) if swap else (loss, G, H)


def _div_reference(s, t, inv_t, name, mix, w):
    """float64 rows (0 where w is 0) and the gradients of sum(w * rows), by autograd through
    kdfast.reference.divergence_rows on the same values. Autograd through a -inf logit gives NaN
    (inf - inf) across its row where the derivative is a number, so the gradients are taken with
    -inf replaced by -1e4, whose probability is exactly 0 in float64 at these scales as well (the
    values must come out the same: checked)."""
    keep = w != 0
    T = 1 / inv_t
    rows = ref.divergence_rows(s.double(), t.double(), T, name, mix)
    sd, td = (x.double().contiguous().masked_fill(x.double() == NINF, -1e4).requires_grad_() for x in (s, t))
    rows_g = ref.divergence_rows(sd, td, T, name, mix)
    same = rows.isnan() | (rows == rows_g.detach())
    assert same.all(), (rows, rows_g)
    (torch.where(keep, rows_g, 0.0) * w.double()).sum().backward()
    # a row of weight 0 gets zero gradients by contract (autograd gives 0 * NaN over a NaN logit)
    # (skew KL at alpha = 1 is KL(P||P): nothing depends on the student, whose grad stays None)
    gs, gt = (torch.where(keep.unsqueeze(-1), g, 0.0) if g is not None else torch.zeros_like(x)
              for g, x in ((sd.grad, sd), (td.grad, td)))
    return torch.where(keep, rows.detach(), 0.0), gs, gt


def _grad_floor(s, t, inv_t, w):
    """||w (P + Q) / T||: the size of these gradients, a floor for their errors (a gradient that is 0
    exactly, as skew KL's at alpha = 1, comes out as rounding of that size)."""
    p, q = (torch.softmax(x.double().masked_fill(x.double().isnan(), 0.0) * inv_t, -1) for x in (t, s))
    return ((p + q) * (w.double() * inv_t).unsqueeze(-1)).nan_to_num().norm().item()


def _check_div(got, want, dtype, w, vtol=None, gtol=None, gfloor=1e-6):
    """The emulated kernels against the float64 reference: NaN rows alike (NaN gradients throughout),
    values and gradients norm-wise on the other rows, zeros on rows of weight 0, never below 0."""
    (loss, gs, gt), (wl, wgs, wgt) = got, want
    nan = wl.isnan()
    assert torch.equal(loss.isnan(), nan), (loss, wl)
    assert (loss[~nan] >= 0).all()
    fin = ~nan
    vtol = vtol or (1e-10 if dtype == torch.float64 else 2e-5)
    gtol = gtol or (GRAD_TOL[dtype] if dtype != torch.float32 else 2e-5)

    def close(a, b, tol, floor):  # norm-wise, relative to at least `floor` (exact values of 0: V = 1)
        return (a.double() - b.double()).norm() <= tol * max(b.double().norm().item(), floor)
    assert close(loss[fin], wl[fin], vtol, 1e-3), (loss, wl)
    for g, wg in ((gs, wgs), (gt, wgt)):
        if g is None:
            continue
        assert g[nan].isnan().all()
        g, wg = g[fin], wg[fin]
        if dtype in HALF:
            wg = wg.to(dtype)
        assert torch.isfinite(g).all()
        assert close(g, wg, gtol, gfloor), (g, wg)
    assert (loss[w == 0] == 0).all()
    for g in (gs, gt):
        if g is not None:
            assert (g[w == 0] == 0).all()


def _div_rows(V, dtype, seed=0):
    """Rows of width V: plain, weight 0 (with a NaN logit), teacher -inf on a third, -inf in both at
    the same places, student -inf only (finite for these divergences), huge logits (1e30)."""
    torch.manual_seed(seed)
    s, t = logits(6, V), logits(6, V)
    if V >= 3:
        t[2, 1::3] = NINF
        s[3, ::4], t[3, ::4] = NINF, NINF
        s[4, 1::3] = NINF
    s[1, 0] = math.nan
    # huge logits: ties at 1e30 (fp16: its largest) over the rest at about -1e30 (P, Q uniform over
    # the ties)
    big = 6e4 if dtype == torch.float16 else 1e30
    s[5], t[5] = (-s[5].abs() * big).clamp(min=-big), (-t[5].abs() * big).clamp(min=-big)
    s[5, ::2], t[5, ::3] = big, big
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(6) + 0.5).to(acc)
    w[1] = 0
    return s.to(dtype), t.to(dtype), w


@pytest.mark.parametrize("V", [1, 7, 33, 1000, 5003])
@dtype_params(ALL_DTYPES)
@pytest.mark.parametrize("div", list(EMU_DIVS))
def test_emu_divergence(emu, div, dtype, V):
    """JSD, skew KL (both directions) and TVD kernels (one block per row) against float64: values and
    both gradients, rows of weight 0, -inf patterns, huge logits."""
    if dtype in (torch.float16, torch.float64) and V in (7, 1000):
        pytest.skip("slow in emulation: the other widths cover these dtypes")
    name, mix = EMU_DIVS[div]
    s, t, w = _div_rows(V, dtype)
    got = _emu_div(emu, s, t, 0.7, name, mix, w)
    _check_div(got, _div_reference(s, t, 0.7, name, mix, w), dtype, w, gfloor=_grad_floor(s, t, 0.7, w))


@pytest.mark.parametrize("path_name", list(EMU_DIV_PATHS))
@dtype_params((torch.float32, torch.bfloat16))
@pytest.mark.parametrize("div", ["jsd0.5", "skew0.1", "skew_rev0.1", "tvd"])
def test_emu_divergence_paths(emu, div, dtype, path_name, monkeypatch):
    """Every path: clusters of 1, 4 and 16 CTAs a row (slices in shared memory, reductions across
    the cluster), one block per row, and chunks (10 of 512 a row, the partials combined in chunk
    order); with a row whose leading slices or chunks are all -inf on both sides and one whose
    teacher is -inf but for its last ones."""
    if path_name == "cluster16" and (dtype != torch.float32 or div in ("skew0.1", "skew_rev0.1")):
        pytest.skip("slow in emulation: fp32 JSD and TVD cover this path")
    for k, v in EMU_DIV_PATHS[path_name].items():
        monkeypatch.setenv(k, v)
    name, mix = EMU_DIVS[div]
    s, t, w = _div_rows(5003, dtype, seed=1)
    s, t = s.clone(), t.clone()
    s[0, :2600], t[0, :2600] = NINF, NINF
    t[4, :4700] = NINF
    got = _emu_div(emu, s, t, 0.5, name, mix, w)
    _check_div(got, _div_reference(s, t, 0.5, name, mix, w), dtype, w, gfloor=_grad_floor(s, t, 0.5, w))


def _layout(kind, R, V, dtype):
    base_s, base_t = logits(R * V + 3), logits(R * V + 3)
    if kind == "broadcast_teacher":  # row stride 0
        s, t = base_s[:R * V].view(R, V), base_t[:V].view(1, V).expand(R, V)
    elif kind == "offset1_both":     # misaligned, alike: the 16-byte walk
        s, t = base_s[1:1 + R * V].view(R, V), base_t[1:1 + R * V].view(R, V)
    else:                            # teacher_offset: different alignments, the scalar walk
        s, t = base_s[:R * V].view(R, V), base_t[3:].view(R, V)
    return s.to(dtype), t.to(dtype)


@pytest.mark.parametrize("path_name", ["auto", "rows", "chunks", "cluster4"])
@pytest.mark.parametrize("kind", ["broadcast_teacher", "offset1_both", "teacher_offset"])
@dtype_params((torch.float32, torch.bfloat16))
@pytest.mark.parametrize("div", ["jsd0.9", "skew_rev0.1", "tvd"])
def test_emu_divergence_layouts(emu, div, dtype, kind, path_name, monkeypatch):
    for k, v in EMU_DIV_PATHS[path_name].items():
        monkeypatch.setenv(k, v)
    name, mix = EMU_DIVS[div]
    s, t = _layout(kind, 3, 2003, dtype)
    w = torch.tensor([1.0, 0.5, 2.0])
    got = _emu_div(emu, s, t, 1.0, name, mix, w)
    _check_div(got, _div_reference(s, t, 1.0, name, mix, w), dtype, w, gfloor=_grad_floor(s, t, 1.0, w))


@pytest.mark.parametrize("path_name", ["auto", "rows", "chunks", "cluster4"])
@pytest.mark.parametrize("div", list(EMU_DIVS))
def test_emu_divergence_nan(emu, div, path_name, monkeypatch):
    """A NaN logit: NaN loss and NaN gradients throughout its row (also beside -inf logits, where a
    gradient is otherwise 0), the other rows finite and right; bitwise the same on a second run."""
    for k, v in EMU_DIV_PATHS[path_name].items():
        monkeypatch.setenv(k, v)
    name, mix = EMU_DIVS[div]
    s, t = logits(4, 3001), logits(4, 3001)
    s[1, 17] = math.nan
    t[2, 3], s[2, 3] = NINF, math.nan
    t[3, :1500] = NINF
    t[3, 7] = math.nan
    w = torch.ones(4)
    got = _emu_div(emu, s, t, 1.0, name, mix, w)
    loss, gs, gt = got
    assert loss[1:].isnan().all() and torch.isfinite(loss[0])
    for g in (gs, gt):
        assert g[1:].isnan().all() and torch.isfinite(g[0]).all()
    # row 0 against the reference (which at skew alpha = 1 never reads the student, NaN or not)
    want = _div_reference(s[:1], t[:1], 1.0, name, mix, w[:1])
    _check_div([x[:1] for x in got], want, torch.float32, w[:1], gfloor=_grad_floor(s[:1], t[:1], 1.0, w[:1]))
    for x, y in zip(got, _emu_div(emu, s, t, 1.0, name, mix, w)):
        assert same_bits(x, y)


@pytest.mark.parametrize("flags", [(True, False), (False, True), (False, False)], ids=["s", "t", "none"])
@pytest.mark.parametrize("div", ["jsd0.5", "skew_rev0.1"])
def test_emu_divergence_one_side(emu, div, flags):
    """A gradient not asked for is not written; the rest is unchanged."""
    name, mix = EMU_DIVS[div]
    s, t, w = _div_rows(1000, torch.float32, seed=2)
    loss, gs, gt = _emu_div(emu, s, t, 0.7, name, mix, w, *flags)
    assert (gs is not None) == flags[0] and (gt is not None) == flags[1]
    _check_div((loss, gs, gt), _div_reference(s, t, 0.7, name, mix, w), torch.float32, w,
               gfloor=_grad_floor(s, t, 0.7, w))


@dtype_params((torch.float32, torch.bfloat16, torch.float16, torch.float64))
def test_emu_scale_rows(emu, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    base = torch.randn(5 * 3003 + 1).to(dtype)
    g = base[1:].view(5, 3003)  # contiguous at storage offset 1: misaligned
    before = g.clone()
    ratio = torch.tensor([1.0, 0.5, -2.0, 1.0, 0.0], dtype=acc)
    emu.emu_scale_rows(_KDT[dtype], g, 5, 3003, ratio, 1)
    torch.testing.assert_close(g, (before.double() * ratio.double().unsqueeze(1)).to(dtype))
    assert same_bits(g[0], before[0]) and same_bits(g[3], before[3])
    # stride 0: one factor for every row (backward of a sum hands over an expanded scalar)
    before = g.clone()
    emu.emu_scale_rows(_KDT[dtype], g, 5, 3003, torch.tensor([-3.0], dtype=acc), 0)
    torch.testing.assert_close(g, (before.double() * -3.0).to(dtype))


def test_emu_scale_rows_many_long_rows(emu):
    """Enough rows to fill the device: one block per row walks all of its 16384-element chunks."""
    R, V = 600, 2 * 16384 + 5
    g = torch.randn(R, V)
    ratio = torch.rand(R) + 0.5
    ratio[::7] = 1.0
    want = g.double() * ratio.double().unsqueeze(1)
    emu.emu_scale_rows(_KDT[torch.float32], g, R, V, ratio, 1)
    torch.testing.assert_close(g, want.float())


# ---- the per-shard ops of kdfast.distributed: their CUDA glue (csrc/cuda/softmax_kl_shard_ops.cpp) on CPU tensors

@pytest.fixture(scope="module")
def emu_shard(emu, tmp_path_factory):
    """The per-shard ops' CUDA glue, csrc/cuda/softmax_kl_shard_ops.cpp itself, built with g++ as a torch
    extension (csrc/cuda/emu/softmax_kl_shard_ops_emu.cpp) linked to the emulated kernels of `emu`:
    softmax_kl_shard_stats, _sums and _grads as the CUDA ops compute them, on CPU tensors."""
    return _emu_glue_extension(emu, tmp_path_factory, "kdfast_emu_shard_ops", "softmax_kl_shard_ops_emu.cpp")


# The divergences as kdfast.distributed hands them to the ops: (reference name, mix, kernel kind, swap).
SHARD_DIVS = {"kl": ("kl", 0.0, 0, False), "reverse_kl": ("reverse_kl", 0.0, 0, True),
              "jsd0.5": ("jsd", 0.5, 2, False), "jsd0.9": ("jsd", 0.9, 2, False),
              "skew0.1": ("skew_kl", 0.1, 3, False), "skew1.0": ("skew_kl", 1.0, 3, False),
              "skew_rev0.1": ("skew_reverse_kl", 0.1, 3, True), "tvd": ("tvd", 0.0, 5, False)}
SHARD_DIVS_FEW = ("kl", "jsd0.9", "skew_rev0.1", "tvd")
# Uneven slices of a row's vocabulary (ranks in order): empty, width 1, widths that are no multiple of
# any vector width, slices starting at every offset within 16 bytes, and one long enough for chunks.
SHARD_WIDTHS = (0, 1, 7, 33, 6, 1001, 1)


def _shard_run(ops, s, t, widths, inv_t, kind, mix, coef):
    """kdfast.distributed's passes over the slices of (s, t) of the given widths, one rank each, with the
    collectives done in place (the statistics stacked and merged, the term sums added): the loss rows, the
    whole rows' gradients (the slices' put side by side) and the slices' statistics. ops: a namespace with
    the three ops (torch.ops.kdfast or the emulated CUDA glue)."""
    from kdfast import distributed as kdd
    edges = [0]
    for w in widths:
        edges.append(edges[-1] + w)
    sl = [(s[:, a:b], t[:, a:b]) for a, b in zip(edges, edges[1:])]
    kl = kind == 0
    stats = [ops.softmax_kl_shard_stats(x, y, inv_t, kl) for x, y in sl]
    state = kdd._merge_stats(torch.stack(stats), inv_t)
    st = state if kl else state[:4].contiguous()
    if kl:
        sums, value = torch.empty(0, dtype=state.dtype), state[4] + torch.log(state[2]) - torch.log(state[3])
    else:
        sums = sum(ops.softmax_kl_shard_sums(x, y, inv_t, kind, mix, st) for x, y in sl)
        value = torch.clamp(sums[0], min=0)
    grads = []
    for x, y in sl:
        # freed NaN blocks of the gradients' size first: an element a kernel fails to write then shows
        # (the allocator would otherwise hand back a block holding an earlier run's right answer)
        poison = [torch.full(x.shape, math.nan, dtype=x.dtype) for _ in range(4)]
        del poison
        grads.append(ops.softmax_kl_shard_grads(x, y, inv_t, kind, mix, st, sums, coef, True, True))
    return value, torch.cat([g[0] for g in grads], 1), torch.cat([g[1] for g in grads], 1), stats


def _shard_case(div, dtype, layout="rows", seed=3):
    """Rows over sum(SHARD_WIDTHS) entries as _div_rows makes them (NaN left out: see
    test_emu_shard_nan), the leading slices of row 0 without mass on both sides, and coef 0 on row 1.
    Layout: "rows", slices of whole rows (row stride the full width: not contiguous); "teacher_offset",
    the teacher at another offset within 16 bytes than the student (the scalar walk)."""
    name, mix, kind, swap = SHARD_DIVS[div]
    V = sum(SHARD_WIDTHS)
    s, t, coef = _div_rows(V, dtype, seed=seed)
    s[1, 0] = 0.5
    s[0, :41], t[0, :41] = NINF, NINF
    if kind == 0:  # KL: a student -inf under teacher mass is an infinite divergence; -inf on both sides instead
        s[2], t[4] = t[2], s[4]
    if layout == "teacher_offset":
        base = torch.empty(6 * V + 3, dtype=dtype)
        base[3:].view(6, V).copy_(t)
        t = base[3:].view(6, V)
    return s, t, coef


def _normwise_close(a, b, tol, floor=1e-6):
    return (a.double() - b.double()).norm() <= tol * max(b.double().norm().item(), floor)


@pytest.mark.parametrize("path_name", ["auto", "chunks"])
@dtype_params(ALL_DTYPES)
@pytest.mark.parametrize("div", list(SHARD_DIVS))
def test_emu_shard_ops(emu_shard, div, dtype, path_name, monkeypatch):
    """The CUDA per-shard ops (glue and kernels) run as kdfast.distributed runs them on uneven slices
    (one of width 0, one of 1, widths no multiple of the vector width, rows not contiguous, slices of a
    row without mass, -inf patterns, huge logits, a row of coef 0): the full-vocabulary loss and
    gradients against float64 autograd, and the same against the CPU ops; the slices' maxima exactly
    as the CPU's. chunks: the gradient pass in (row, chunk) blocks of 512."""
    if (dtype in (torch.float16, torch.float64) or path_name == "chunks") and div not in SHARD_DIVS_FEW:
        pytest.skip("slow in emulation: fp32 and bf16 cover every divergence")
    if path_name == "chunks" and dtype != torch.float32:
        pytest.skip("slow in emulation: fp32 covers this path")
    for k, v in EMU_PATHS[path_name].items():
        monkeypatch.setenv(k, v)
    name, mix, kind, swap = SHARD_DIVS[div]
    s, t, coef = _shard_case(div, dtype, seed=3 if path_name == "auto" else 4)
    x, y = (t, s) if swap else (s, t)
    got = _shard_run(emu_shard, x, y, SHARD_WIDTHS, 0.7, kind, mix, coef)
    cpu = _shard_run(torch.ops.kdfast, x, y, SHARD_WIDTHS, 0.7, kind, mix, coef)
    for g, c in zip(got[3], cpu[3]):  # the maxima are exact; the sums as the CPU's within rounding
        assert g.dtype == c.dtype and g.shape == c.shape
        assert torch.equal(g[:2], c[:2]), (g[:2], c[:2])
        torch.testing.assert_close(g[2:], c[2:], rtol=1e-10 if dtype == torch.float64 else 2e-5, atol=0)
    value, gx, gy = got[:3]
    gs, gt = (gy, gx) if swap else (gx, gy)
    want = _div_reference(s, t, 0.7, name, mix, coef)
    # (the reference zeroes coef-0 rows' values; the ops give every row its value)
    keep = coef != 0
    _check_div((torch.where(keep, value, 0.0), gs, gt), want, dtype, coef, gfloor=_grad_floor(s, t, 0.7, coef))
    assert torch.isfinite(value[~keep]).all()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    gtol = GRAD_TOL[dtype] if dtype != torch.float32 else 2e-5
    assert _normwise_close(value, cpu[0], tol, 1e-3), (value, cpu[0])
    for g, c in zip(got[1:3], cpu[1:3]):
        assert _normwise_close(g, c, gtol, _grad_floor(s, t, 0.7, coef)), (g, c)


@pytest.mark.parametrize("div", ["kl", "jsd0.5", "skew_rev0.1", "tvd"])
def test_emu_shard_ops_teacher_offset(emu_shard, div):
    """Student and teacher slices at different offsets within 16 bytes (the scalar walk) give what
    aligned copies give."""
    name, mix, kind, swap = SHARD_DIVS[div]
    s, t, coef = _shard_case(div, torch.float32, layout="teacher_offset")
    assert t.storage_offset() % 4 != s.storage_offset() % 4
    got = _shard_run(emu_shard, s, t, SHARD_WIDTHS, 1.3, kind, mix, coef)
    want = _shard_run(emu_shard, s, t.contiguous(), SHARD_WIDTHS, 1.3, kind, mix, coef)
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("div", ["kl", "jsd0.5", "tvd"])
@dtype_params((torch.float32, torch.float64))
def test_emu_shard_ops_no_rows(emu_shard, div, dtype):
    """0 rows: outputs of the CPU ops' shapes and dtypes, nothing launched."""
    name, mix, kind, swap = SHARD_DIVS[div]
    s = torch.empty(0, 9, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    st = emu_shard.softmax_kl_shard_stats(s, s, 1.0, kind == 0)
    assert st.shape == (5 if kind == 0 else 4, 0) and st.dtype == acc
    sums = torch.empty(0, dtype=acc)
    if kind != 0:
        sums = emu_shard.softmax_kl_shard_sums(s, s, 1.0, kind, mix, st)
        assert sums.shape == (3, 0) and sums.dtype == acc
    gs, gt = emu_shard.softmax_kl_shard_grads(s, s, 1.0, kind, mix, st, sums, torch.empty(0, dtype=acc), True, True)
    assert gs.shape == (0, 9) and gt.shape == (0, 9) and gs.dtype == dtype


@pytest.mark.parametrize("div", ["kl", "jsd0.5", "skew0.1", "tvd"])
def test_emu_shard_nan(emu_shard, div):
    """A NaN logit in one slice makes its row's loss NaN on every slice's gradients' row (the NaN reaches
    the merged sums); the other rows are finite and as the CPU ops give them."""
    name, mix, kind, swap = SHARD_DIVS[div]
    s, t, coef = _shard_case(div, torch.float32)
    s[3, 45] = math.nan  # in the slice of width 6
    got = _shard_run(emu_shard, s, t, SHARD_WIDTHS, 1.0, kind, mix, coef)
    cpu = _shard_run(torch.ops.kdfast, s, t, SHARD_WIDTHS, 1.0, kind, mix, coef)
    assert got[0][3].isnan() and cpu[0][3].isnan()
    ok = torch.arange(6) != 3
    for g, c in zip(got[:3], cpu[:3]):
        assert g[3].isnan().any()
        assert torch.isfinite(g[ok]).all()
        assert _normwise_close(g[ok], c[ok], 2e-5)


def test_emu_shard_ops_bad_input(emu_shard):
    """The CUDA glue runs the shared checks, naming the argument."""
    s = torch.randn(3, 5)
    st = emu_shard.softmax_kl_shard_stats(s, s, 1.0, True)
    with pytest.raises(RuntimeError, match="softmax_kl_shard_sums: divergence"):
        emu_shard.softmax_kl_shard_sums(s, s, 1.0, 1, 0.0, st[:4].contiguous())
    with pytest.raises(RuntimeError, match="softmax_kl_shard_sums: KL needs no term sums"):
        emu_shard.softmax_kl_shard_sums(s, s, 1.0, 0, 0.0, st)
    with pytest.raises(RuntimeError, match="softmax_kl_shard_grads: coef"):
        emu_shard.softmax_kl_shard_grads(s, s, 1.0, 0, 0.0, st, torch.empty(0), torch.ones(2), True, False)
    with pytest.raises(RuntimeError, match="softmax_kl_shard_stats: inv_temperature"):
        emu_shard.softmax_kl_shard_stats(s, s, 0.0, False)
    with pytest.raises(RuntimeError, match="softmax_kl_shard_stats: expected CUDA tensors"):
        emu_shard.softmax_kl_shard_stats(s.to("meta"), s.to("meta"), 1.0, False)


# ---- the relation ops: their CUDA glue itself (csrc/cuda/rkd_ops.cpp) on CPU tensors

@pytest.fixture(scope="module")
def emu_glue(emu, tmp_path_factory):
    """The relation ops' CUDA glue, csrc/cuda/rkd_ops.cpp itself, built with g++ as a torch extension
    (csrc/cuda/emu/rkd_ops_emu.cpp) linked to the emulated kernels of `emu`: rkd, pairwise_distances and
    pairwise_distances_backward, as the CUDA ops compute them, on CPU tensors."""
    return _emu_glue_extension(emu, tmp_path_factory, "kdfast_emu_rkd_ops", "rkd_ops_emu.cpp")


def _emu_glue_extension(emu, tmp_path_factory, name, source):
    """A CUDA op's glue built for the emulation (csrc/cuda/emu/<source>) with g++ as a torch extension,
    linked to the emulated kernels of `emu`."""
    from torch.utils import cpp_extension
    lib_dir, lib = os.path.split(emu.path)
    return cpp_extension.load(
        name=name, sources=[os.path.join(REPO, "csrc", "cuda", "emu", source)],
        extra_cflags=["-O1", "-DKDFAST_CUDA_EMULATE", "-I" + os.path.join(REPO, "csrc"), "-I" + _cuda_include()],
        extra_ldflags=["-L" + lib_dir, "-l:" + lib, "-Wl,-rpath," + lib_dir],
        build_directory=str(tmp_path_factory.mktemp(name)))


def _rkd_reference(s, t, dw, aw, squared, eps=1e-12, delta=1.0):
    """Per-group float64 RKD loss of (B, N, D) points (a term of weight 0 left out, as the op does)."""
    return torch.stack([ref.rkd_loss(s[b], t[b], distance_weight=dw, angle_weight=aw, delta=delta, squared=squared,
                                     eps=eps) for b in range(s.shape[0])])


EMU_RKD_SHAPES = {"5": (1, 5, 3, 4), "2x70": (2, 70, 5, 7), "130": (1, 130, 16, 8)}
# every term combination at the small shapes; at N = 130 (slow in emulation) each term alone
EMU_RKD_CASES = [(terms, shape) for terms in RKD_TERMS for shape in EMU_RKD_SHAPES
                 if shape != "130" or terms in ("distance", "angle")]


@pytest.mark.parametrize("terms,shape", EMU_RKD_CASES, ids=["-".join(c) for c in EMU_RKD_CASES])
@dtype_params((torch.float32, torch.float64))
def test_emu_rkd(emu_glue, terms, shape, dtype):
    """The CUDA rkd op (glue and kernels) against float64 autograd: values and both gradients, with
    duplicate points (a zero-length side) and a group of weight 0 (no gradient)."""
    B, n, Ds, Dt = EMU_RKD_SHAPES[shape]
    s, t = _points(B, n, Ds, torch.float64), _points(B, n, Dt, torch.float64)
    w = torch.full((B,), 0.7, dtype=dtype)
    if B > 1:
        w[1] = 0
    dw, aw, squared = RKD_TERMS[terms]
    loss, gs, gt = emu_glue.rkd(s.to(dtype), t.to(dtype), dw, aw, 1.0, squared, 1e-12, w, True, True)
    assert loss.dtype == dtype and gs.dtype == dtype and gt.dtype == dtype
    sd, td = s.clone().requires_grad_(), t.clone().requires_grad_()
    per_group = _rkd_reference(sd, td, dw, aw, squared)
    (per_group * w.double()).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert relerr(loss, per_group.detach()) < tol
    assert relerr(gs, sd.grad) < tol and relerr(gt, td.grad) < tol
    if B > 1:
        assert (gs[1] == 0).all() and (gt[1] == 0).all()


@pytest.mark.parametrize("flags", [(True, False), (False, True), (False, False)], ids=["s", "t", "none"])
@pytest.mark.parametrize("weights", [(0.8, 1.7), (0.0, 0.0)], ids=["both", "none"])
def test_emu_rkd_one_side(emu_glue, weights, flags):
    """One gradient or none: the loss and the gradient asked for as with both, an empty tensor for
    the other; with both weights 0, zero losses and gradients (nothing computed)."""
    s, t = _points(2, 12, 6, torch.float64), _points(2, 12, 3, torch.float64)
    w = torch.tensor([0.5, 2.0], dtype=torch.float64)
    both = emu_glue.rkd(s, t, *weights, 1.0, False, 1e-12, w, True, True)
    got = emu_glue.rkd(s, t, *weights, 1.0, False, 1e-12, w, *flags)
    for a, b, want in zip(got, both, (True,) + flags):
        assert (a.numel() > 0) == want
        if want:
            assert a.shape == b.shape and relerr(a, b) < 1e-12
    if weights == (0.0, 0.0):
        assert all((x == 0).all() for x in both)


def _emu_rkd_vs_float64(emu_glue, kind, s, t, eps, tol_value, tol_grad, scale=1.0):
    """The emulated term on fp32 (1, N, D) points against the float64 reference on the same points
    divided by scale (the loss is scale-invariant; the gradients scale by 1 / scale)."""
    dw, aw, squared = RKD_TERMS[kind]
    loss, gs, gt = emu_glue.rkd(s, t, dw, aw, 1.0, squared, eps, torch.ones(1), True, True)
    sd = (s.double() / scale).requires_grad_()
    td = (t.double() / scale).requires_grad_()
    want = _rkd_reference(sd, td, dw, aw, squared, eps=eps)
    want.backward()
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert relerr(loss, want.detach()) < tol_value
    assert relerr(gs.double() * scale, sd.grad) < tol_grad and relerr(gt.double() * scale, td.grad) < tol_grad


@pytest.mark.parametrize("kind", ["distance", "angle"])
@pytest.mark.parametrize("ratio", [1e3, 1e4, 1e6])
def test_emu_rkd_far_point(emu_glue, kind, ratio):
    """One point far from a tight cluster (fp32): the CUDA op within 1e-4 of float64."""
    s = far_point_set(ratio, D=8, seed=1).unsqueeze(0)
    t = far_point_set(ratio * 0.37, D=5, seed=101).unsqueeze(0)
    _emu_rkd_vs_float64(emu_glue, kind, s, t, 1e-12, 1e-4, 1e-3)


def _check_wide_span_groups(rkd, pairwise_backward, D, dtype, ratio, bound):
    """Collinear points beyond the issue's 1e6 far:near ratio (fp32) and float64 ones at 1e6, in a
    batch beside an ordinary group: the wide-span groups take D2's low parts and the product back to
    points from differences on the device (decided there, per group), so the student's angle
    gradient stays within `bound` of one point's share of float64's, as on the CPU
    (tests/ops/test_rkd.py test_wide_span_groups_take_low_parts); and pairwise_distances' backward
    through the same product. Without them the error was ~eps_64 x ratio^2 of that share (0.36 at
    1e8). rkd and pairwise_backward: the op's arguments as torch.ops.kdfast takes them, CPU tensors
    in and out."""
    for seed in range(2):
        s = torch.stack([collinear_set(ratio, D, seed), far_point_set(3.0, n=9, D=D, seed=seed)]).to(dtype)
        t = torch.stack([far_point_set(ratio * 0.37, n=9, D=5, seed=seed + 100),
                         far_point_set(2.0, n=9, D=5, seed=seed)]).to(dtype)
        w = torch.ones(2, dtype=dtype)
        loss, gs, _ = rkd(s, t, 0.0, 1.0, 1.0, False, 1e-12, w, True, True)
        sd, td = s.to(torch.float64, copy=True).requires_grad_(), t.to(torch.float64, copy=True).requires_grad_()
        want = _rkd_reference(sd, td, 0.0, 1.0, False)
        want.sum().backward()
        assert relerr(loss, want.detach()) < (1e-4 if dtype == torch.float32 else 1e-10)
        for b in range(2):
            err = (gs[b].double() - sd.grad[b]).abs().max().item() / point_share(s[b], 1.0)
            assert err < bound, (seed, b, err)
        g = torch.randn(2, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        got = pairwise_backward(g.to(dtype), s, False, True, 0.0)
        xd = s.to(torch.float64, copy=True).requires_grad_()
        ref.pairwise_distances(xd, normalize=True, eps=0.0).backward(g)
        for b in range(2):
            assert (got[b].double() - xd.grad[b]).abs().max().item() < bound * point_share(s[b], g.abs().max())


@pytest.mark.parametrize("dtype,ratio,bound", WIDE_SPAN_CASES)
@pytest.mark.parametrize("D", [1, 3])
def test_emu_rkd_wide_span_groups(emu_glue, D, dtype, ratio, bound):
    """The wide-span groups in the CUDA glue and kernels, emulated (see _check_wide_span_groups)."""
    _check_wide_span_groups(emu_glue.rkd, emu_glue.pairwise_distances_backward, D, dtype, ratio, bound)


@pytest.mark.parametrize("kind", ["distance", "angle"])
@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_emu_rkd_scale(emu_glue, kind, scale):
    """fp32 points at 1e20 and 1e-20 (eps = 0): finite, equal to the unscaled loss."""
    g = torch.Generator().manual_seed(7)
    s0, t0 = torch.randn(1, 9, 6, generator=g), torch.randn(1, 9, 4, generator=g)
    s, t = (s0.double() * scale).float(), (t0.double() * scale).float()
    _emu_rkd_vs_float64(emu_glue, kind, s, t, 0.0, 1e-5, 1e-4, scale=scale)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@dtype_params((torch.float32, torch.float64))
def test_emu_pairwise_distances(emu_glue, squared, normalize, dtype):
    """The CUDA pairwise_distances and its backward against float64 autograd, on points at 1e3 (their
    scale is taken out and put back) with a duplicate point."""
    x = (torch.randn(2, 37, 6, dtype=torch.float64) * 1e3).to(dtype).double()
    x[1, 5] = x[1, 9]
    out = emu_glue.pairwise_distances(x.to(dtype), squared, normalize, 1e-12)
    xd = x.clone().requires_grad_()
    want = ref.pairwise_distances(xd, squared=squared, normalize=normalize, eps=1e-12)
    tol = 1e-10 if dtype == torch.float64 else 2e-6
    assert out.dtype == dtype and relerr(out, want.detach()) < tol
    up = torch.randn(2, 37, 37, dtype=torch.float64)
    (want * up).sum().backward()
    gx = emu_glue.pairwise_distances_backward(up.to(dtype), x.to(dtype), squared, normalize, 1e-12)
    assert gx.dtype == dtype and relerr(gx, xd.grad) < (1e-9 if dtype == torch.float64 else 2e-5)


def _emu_feature_match(emu, s, t, cosine, eps, w, gs=True, gt=True):
    R, D = s.shape
    loss = torch.full((R,), math.nan, dtype=w.dtype)
    G = torch.full((R, D), math.nan, dtype=s.dtype) if gs else None
    H = torch.full((R, D), math.nan, dtype=s.dtype) if gt else None
    emu.emu_feature_match(_KDT[s.dtype], s, t, R, D, s.stride(0), t.stride(0), int(cosine), eps, w, loss, G, H)
    return loss, G, H


@pytest.mark.parametrize("cosine", [False, True], ids=["sq_error", "cosine"])
@pytest.mark.parametrize("R,D,case", [(3, 17, "plain"), (4, 33, "misaligned"), (3, 4096 + 37, "plain"),
                                      (3, 2 * 4096 + 9, "misaligned"), (4, 40, "broadcast"), (4, 300, "special"),
                                      (4, 3 * 8192 + 100, "special")],
                         ids=["17", "33_offset1", "4133", "8201_offset1", "broadcast", "special", "special_long"])
@dtype_params((torch.float32, torch.bfloat16, torch.float16, torch.float64))
def test_emu_feature_match(emu, cosine, R, D, case, dtype):
    """The CUDA feature kernels in emulation against float64 autograd through the PyTorch formulation:
    scalar and vector walks, rows of several squared-error chunks (partial sums) and of several
    cosine chunks (two launches), a broadcast teacher, a weight-0 row; special rows: zero norm,
    |x|^2 beyond float32 (sums redone in double), a norm below eps."""
    if case == "special" and (not cosine or dtype in HALF):
        pytest.skip("the special rows are about the cosine's norms in float32 / float64")
    s, t = feature_inputs(R, D, dtype, case)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.tensor([0.5, 1.0, 2.0, 0.0][:R], dtype=acc)
    got = _emu_feature_match(emu, s, t, cosine, 1e-8, w)
    zero = [r for r in range(R) if w[r] == 0]
    for r in zero:
        assert got[0][r] == 0 and (got[1][r] == 0).all() and (got[2][r] == 0).all()
    check_feature_rows(got, s, t, cosine, 1e-8, w, skip_loss_rows=zero)
    # the student gradient alone matches the one computed with both
    alone = _emu_feature_match(emu, s, t, cosine, 1e-8, w, gt=False)
    assert same_bits(alone[1], got[1]) and same_bits(alone[0], got[0])


@dtype_params((torch.float32, torch.bfloat16, torch.float64))
def test_emu_cosine_one_element_rows_exact(emu, dtype):
    """A one-element row's cosine is the constant sign(s t): loss 0 or 2 and gradients exactly 0 (not
    the rounding residue of s / |s| - t / |t|), as on the CPU; a side clamped at eps keeps its gradient."""
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(9, 1, generator=g, dtype=torch.float64) * 7).to(dtype)
    t = (torch.randn(9, 1, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    s[8, 0] = 1e-9  # below eps: clamped norm, a real gradient
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    loss, gs, gt = _emu_feature_match(emu, s, t, True, 1e-8, torch.ones(9, dtype=acc))
    sign = torch.sign(s.double() * t.double()).squeeze(1)
    assert torch.equal(loss[:8].double(), (1 - sign)[:8])
    assert (gs[:8] == 0).all() and (gt == 0).all(), (gs, gt)  # t's norm is unclamped in every row
    assert gs[8, 0] != 0
    cpu = torch.ops.kdfast.feature_match(s, t, True, 1e-8, torch.ones(9, dtype=acc), True, True)
    assert all(same_bits(a, b) for a, b in zip(cpu, (loss, gs, gt))), "the CPU kernel agrees bit for bit"
    check_feature_rows((loss, gs, gt), s, t, True, 1e-8, torch.ones(9, dtype=acc), skip_loss_rows=())


# ----------------------------------------------------------------------------- top-k KL (emulation)

def _emu_sparse_kl(emu, s, lp, idx, inv_t, tail, w, gs=True, gt=True):
    """The CUDA sparse_kl kernel in emulation: (loss rows, grad_student, grad_teacher, status)."""
    R, V = s.shape
    K = lp.shape[1]
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    loss = torch.full((R,), math.nan, dtype=torch.float64)  # the op's loss rows are float64 for every dtype
    G = torch.full((R, V), math.nan, dtype=s.dtype) if gs else None
    H = torch.full((R, K), math.nan, dtype=acc) if gt else None
    status = torch.tensor([2 ** 63 - 1], dtype=torch.int64)
    emu.emu_sparse_kl(_KDT[s.dtype], s, lp, idx, int(idx.dtype == torch.int32), R, V, K, s.stride(0), lp.stride(0),
                      idx.stride(0), inv_t, tail, w, loss, G, H, status)
    return loss, G, H, int(status)


def _topk(R, V, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(R, V, dtype=torch.float64, generator=g) * 3
    return t.log_softmax(-1).topk(K, -1)


@pytest.mark.parametrize("tail", [0, 1], ids=["renormalize", "bucket"])
@pytest.mark.parametrize("R,V,K", [(3, 7, 1), (3, 37, 37), (2, 3001, 64), (4, 700, 300)],
                         ids=["K1", "KeqV", "3001_K64", "700_K300"])
@dtype_params((torch.float32, torch.float64, torch.bfloat16))
def test_emu_sparse_kl(emu, tail, R, V, K, dtype):
    """The CUDA top-k KL in emulation against the float64 reference: loss rows, row-weighted
    gradients of the student and of the teacher log-probs, a weight-0 row, int32 ids, a strided
    student, T = 1 / 0.7."""
    name = ("renormalize", "bucket")[tail]
    lp, idx = _topk(R, V, K)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    base = (torch.randn(R, V + 5, dtype=torch.float64) * 3).to(dtype)
    s = base[:, 2:2 + V]  # row stride V + 5
    w = torch.tensor([0.5, 0.0, 2.0, -1.0][:R], dtype=acc)
    loss, gs, gt, status = _emu_sparse_kl(emu, s, lp.to(acc), idx.int(), 0.7, tail, w)
    assert status == 2 ** 63 - 1
    s64, lp64 = s.double().requires_grad_(), lp.clone().requires_grad_()
    rows = ref.sparse_kl_div(s64, lp64, idx, temperature=1 / 0.7, tail=name, reduction="none")
    (rows * w.double()).sum().backward()
    live = w != 0
    assert loss[~live].eq(0).all() and gs[~live].eq(0).all() and gt[~live].eq(0).all()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert relerr(loss[live], rows.detach()[live]) <= tol
    g_want = s64.grad.to(dtype).double() if dtype in HALF else s64.grad
    assert relerr(gs.double()[live], g_want[live]) <= (1e-10 if dtype == torch.float64 else GRAD_TOL[dtype])
    assert relerr(gt.double()[live], lp64.grad[live]) <= (1e-10 if dtype == torch.float64 else 2e-5)
    alone = _emu_sparse_kl(emu, s, lp.to(acc), idx, 0.7, tail, w, gt=False)  # int64 ids, student gradient only
    assert same_bits(alone[1], gs) and same_bits(alone[0], loss)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_emu_sparse_kl_row_beyond_float_max(emu, tail):
    """A row whose KL exceeds FLT_MAX (fp32 logits ~2.5e38 apart, T = 0.5) is finite in the op's
    float64 rows and equal to float64, as on the CPU (it was inf)."""
    s = torch.tensor([[2.5e38, 0.0], [0.0, 0.0]])
    lp, idx = torch.tensor([[0.0, 5.0], [0.0, 5.0]], dtype=torch.float64).log_softmax(-1).float().topk(2, -1)
    loss, _, _, _ = _emu_sparse_kl(emu, s, lp, idx, 2.0, ("renormalize", "bucket").index(tail), torch.ones(2),
                                   gs=False, gt=False)
    want = ref.sparse_kl_div(s.double(), lp.double(), idx, tail=tail, temperature=0.5, reduction="none")
    assert loss[0] > torch.finfo(torch.float32).max and relerr(loss, want) < 1e-6, (loss, want)
    cpu = torch.ops.kdfast.sparse_kl(s, lp, idx, 2.0, int(tail == "bucket"), torch.ones(2), False, False)[0]
    assert relerr(cpu, want) < 1e-6, (cpu, want)


def test_emu_sparse_kl_bad_ids(emu):
    """Out of range, negative and repeated ids lower the status word to the first bad entry, coded
    as the CPU kernel codes it (2 (row K + k) + repeated); a weight-0 row is not read."""
    R, V, K = 4, 50, 5
    lp, idx = _topk(R, V, K)
    s, w = torch.randn(R, V), torch.ones(R)
    for row, k, value, repeated in [(2, 3, 50, 0), (1, 0, -1, 0), (3, 4, None, 1)]:
        bad = idx.clone()
        bad[row, k] = bad[row, 1] if value is None else value
        got = _emu_sparse_kl(emu, s, lp.float(), bad, 1.0, 1, w)[3]
        assert got == 2 * (row * K + k) + repeated
        with pytest.raises(ValueError, match=r"teacher_topk_indices\[%d, %d\]" % (row, k)):
            torch.ops.kdfast.sparse_kl(s, lp.float(), bad, 1.0, 1, w, True, True)  # the CPU op, same code
        skip = w.clone()
        skip[row] = 0
        assert _emu_sparse_kl(emu, s, lp.float(), bad, 1.0, 1, skip)[3] == 2 ** 63 - 1


def test_emu_sparse_kl_matches_cpu_op(emu):
    """The CUDA kernel in emulation and the CPU kernel agree (float32, both tails, a NaN row)."""
    R, V, K = 3, 2000, 64
    lp, idx = _topk(R, V, K)
    s = torch.randn(R, V) * 3
    s[1, 17] = math.nan
    w = torch.tensor([1.0, 1.0, 0.5])
    for tail in (0, 1):
        got = _emu_sparse_kl(emu, s, lp.float(), idx, 1.0, tail, w)
        cpu = torch.ops.kdfast.sparse_kl(s, lp.float(), idx, 1.0, tail, w, True, True)
        assert got[0][1].isnan() and cpu[0][1].isnan() and got[1][1].isnan().all() and cpu[1][1].isnan().all()
        keep = torch.tensor([True, False, True])
        assert relerr(got[0][keep], cpu[0][keep]) <= 1e-5
        assert relerr(got[1][keep], cpu[1][keep]) <= 1e-5
        assert relerr(got[2][keep], cpu[2][keep]) <= 1e-5

