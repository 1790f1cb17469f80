"""Shared helpers for the kdfast test suite.

* Tolerances are per dtype and norm-wise: relerr(a, b) = ||a - b|| / ||b||.
* The softmax-KL checks compare against kdfast.reference evaluated on float64 copies of the
  inputs. Where the float64 answer is tiny compared with the numbers it is computed from (nearly
  equal distributions, one-hot rows, T = 100 ...) a plain relative error says nothing about the
  kernel, so those comparisons divide by a *conditioning floor*: the size of the terms that any
  fp32 evaluation has to cancel (see `kl_floors`). For well-conditioned rows the floor is within a
  small factor of ||b|| itself.
* Half-precision gradients are compared with the float64 gradient rounded to that dtype (the best
  answer the dtype can hold); half-precision losses come back in float32 and are held to fp32-like
  tolerances.
* Tests marked @pytest.mark.slow run only with KDFAST_SLOW=1.
"""
import math
import os
import subprocess
import sys
import threading

import pytest
import torch

import kdfast
from kdfast import _ops
from kdfast import reference as ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # the tests share the written-out contender formulations of bench/
    sys.path.insert(0, REPO)
SLOW = os.environ.get("KDFAST_SLOW", "0") == "1"
HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Norm-wise relative tolerances against float64. VALUE: the loss (float32 for half inputs, computed
# from the exact half values, so fp32-like). GRAD: gradients, which come back in the input dtype.
VALUE_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-5, torch.bfloat16: 3e-5}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long or memory-heavy cases, run with KDFAST_SLOW=1")
    # The suite tests the compiled kernels: without them it stops here with the load error instead
    # of skipping the native checks. (The pure-Python install has its own subprocess tests.)
    if not _ops.LOADED:
        raise pytest.UsageError(f"the kdfast test suite needs the compiled extension, which did not load "
                                f"({_ops.LOAD_ERROR!s}); build it first: `make build`")


def pytest_collection_modifyitems(config, items):
    if SLOW:
        return
    skip = pytest.mark.skip(reason="slow test: set KDFAST_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def _restore_global_state():
    """Every test starts from a fixed seed and no remembered upstream factors (see
    kdfast/_grad_scale_prediction.py), and leaves backend, CPU ISA, threads and the prediction
    switch as it found them."""
    backend, isa, threads = kdfast.get_backend(), _ops.selected_cpu_isa(), torch.get_num_threads()
    predict = kdfast.grad_scale_prediction_enabled()
    torch.manual_seed(0)
    kdfast._grad_scale_prediction.PREDICTOR.clear()
    yield
    kdfast.set_backend(backend)
    if kdfast.grad_scale_prediction_enabled() != predict:
        kdfast.set_grad_scale_prediction(predict)
    if isa is not None and _ops.selected_cpu_isa() != isa:
        _ops.select_cpu_isa(isa)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(params=_ops.available_cpu_isas())
def cpu_isa(request):
    """Runs the test once per CPU kernel build this install has and this CPU can execute."""
    chosen = _ops.select_cpu_isa(request.param)
    assert chosen == request.param
    assert kdfast.build_info()["cpu_isa_selected"] == request.param
    return request.param


@pytest.fixture(params=["native", "reference"])
def backend(request):
    """Runs the test under the native kernels and under the pure-PyTorch reference."""
    kdfast.set_backend(request.param)
    return request.param


@pytest.fixture
def native_backend():
    """Backend "native", restored afterwards: the fused kernels on every call. ("auto" hands small
    CPU squared errors to ATen's mse_loss, the very call the reference makes, so a check against the
    reference under "auto" would compare F.mse_loss with itself.)"""
    before = kdfast.get_backend()
    kdfast.set_backend("native")
    yield
    kdfast.set_backend(before)


# For tests of the native kernels: they run under backend "native" (see native_backend).
needs_native = pytest.mark.usefixtures("native_backend")


# ----------------------------------------------------------------------------- numerics

def relerr(a, b):
    """||a - b|| / ||b|| in float64 (0 when both are 0, inf when only b is 0)."""
    a, b = a.detach().double(), b.detach().double()
    num, den = (a - b).norm().item(), b.norm().item()
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def same_bits(a, b):
    """Bitwise equality (NaN == NaN, -0 != +0): the test of determinism and of untouched inputs."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().contiguous().cpu(), b.detach().contiguous().cpu()
    if a.numel() == 0:
        return True
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(width), b.view(width))


def result_dtype(*dtypes):
    dt = dtypes[0]
    for d in dtypes[1:]:
        dt = torch.promote_types(dt, d)
    return torch.float32 if dt in HALF else dt


def assert_close_scaled(actual, expected, floor, tol, what, skip=None):
    """||actual - expected|| <= tol * max(||expected||, ||floor||) over the entries where expected
    is finite; where expected is +-inf or NaN, actual must be the same. Entries in `skip` are not
    compared at all."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    floor = torch.as_tensor(floor, dtype=torch.float64).expand_as(expected)
    fin = torch.isfinite(expected)
    sel = fin if skip is None else fin & ~skip
    if not bool(fin.all()):
        nonfinite = ~fin if skip is None else ~fin & ~skip
        assert torch.equal(actual[nonfinite].isnan(), expected[nonfinite].isnan()), \
            f"{what}: NaN where the reference has inf or a number, or the other way round"
        inf = nonfinite & ~expected.isnan()
        assert torch.equal(actual[inf], expected[inf]), f"{what}: infinities differ from the reference"
    zero = torch.zeros((), dtype=torch.float64)
    diff = torch.where(sel, actual - expected, zero)
    assert bool(torch.isfinite(diff).all()), f"{what}: non-finite values where the reference is finite"
    err = diff.norm().item()
    exp_norm = torch.where(sel, expected, zero).norm().item()
    floor_norm = torch.where(sel & torch.isfinite(floor), floor, zero).norm().item()
    scale = max(exp_norm, floor_norm)
    assert err <= tol * scale or err == 0, (
        f"{what}: error {err:.3e} > {tol:g} x scale {scale:.3e} (relerr {err / max(exp_norm, 1e-300):.3e})")


def rounding_floor(floor, dtype, tol):
    """floor raised to what the dtype's smallest values allow per element: below the smallest normal
    a half value is good to its fixed quantum (the smallest subnormal) only; and the CPU kernels
    flush float32 subnormals to 0 (FlushDenormals), bf16's among them (bf16 has float32's exponent
    range). Apply it to the view's floor before a broadcast's backward sums the view's rounded
    elements, and to the leaf's after."""
    if dtype in (torch.float32, torch.bfloat16):
        floor = torch.clamp(floor, min=torch.finfo(torch.float32).smallest_normal / tol)
    if dtype in HALF:
        fi = torch.finfo(dtype)
        floor = torch.clamp(floor, min=fi.smallest_normal * fi.eps / tol)
    return floor


def kl_floors(s, t, temperature):
    """float64 conditioning floors per row / element for logits s, t of shape (..., V).

    value[r]:  sum_v p_t (|a| + |b|) + |log Z_s| + |log Z_t| + 1   (a, b: max-shifted logits / T)
    student:   (p_s + p_t) / T
    teacher:   p_t (|a| + |b| + value[r]) / T
    These bound the magnitude of what a one-pass fp32 kernel adds and subtracts, so eps * floor is
    the error any fp32 evaluation makes."""
    s, t = s.detach().double(), t.detach().double()
    T = float(temperature)
    a = (s - s.amax(-1, keepdim=True)) / T
    b = (t - t.amax(-1, keepdim=True)) / T
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    lzs, lzt = torch.logsumexp(a, -1), torch.logsumexp(b, -1)
    zero = torch.zeros((), dtype=torch.float64)
    mag = torch.where(pt > 0, pt * (a.abs() + b.abs()), zero)
    value = mag.sum(-1) + lzs.abs() + lzt.abs() + 1
    student = (ps + pt) / T
    teacher = torch.where(pt > 0, pt * (a.abs() + b.abs() + value.unsqueeze(-1)), zero) / T
    return value, student, teacher


# The kdfast functions of the softmax-KL op's divergence family besides softmax_kl_div / kd_loss
# (DESIGN.md section 5); check_kl takes one of them as `loss`.
DIVERGENCE_LOSSES = ("generalized_jsd", "reverse_kl_div", "skew_kl_div", "tv_distance")


def divergence_floors(s, t, temperature, rows):
    """Conditioning floors as kl_floors gives them, for any divergence of the family: every term
    is a probability (P or Q) times a log-ratio (or a sign) of probabilities whose fp32 error is
    eps * (|a| + |b| + |log Z|), where a, b are the max-shifted logits / T (0 where -inf: a side
    with probability 0 enters a ratio at its exact bound). rows: the float64 per-row divergence,
    which locates the rows whose value is +inf (their value floor is inf, as kl_floors has it).

    value[r]:          sum_v (P + Q)(|a| + |b|) + |log Z_s| + |log Z_t| + 1
    student, teacher:  (P + Q)(1 + |a| + |b| + value[r]) / T"""
    s, t = s.detach().double(), t.detach().double()
    T = float(temperature)
    a = (s - s.amax(-1, keepdim=True)) / T
    b = (t - t.amax(-1, keepdim=True)) / T
    pq = torch.softmax(s / T, -1) + torch.softmax(t / T, -1)
    zero = torch.zeros((), dtype=torch.float64)
    a_abs = torch.where(torch.isinf(a), zero, a.abs())
    b_abs = torch.where(torch.isinf(b), zero, b.abs())
    mag = torch.where(pq > 0, pq * (a_abs + b_abs), zero)
    value = mag.sum(-1) + torch.logsumexp(a, -1).abs() + torch.logsumexp(b, -1).abs() + 1
    grad = torch.where(pq > 0, pq * (1 + a_abs + b_abs + value.unsqueeze(-1)), zero) / T
    value = torch.where(rows.detach().double() == math.inf, math.inf, value)
    return value, grad, grad


def row_value_weights(lead_shape, reduction, mask, kd, temperature):
    """d loss / d KL_row for each row of the leading shape (the reduction's factor, mask, T^2)."""
    w = torch.ones(lead_shape, dtype=torch.float64)
    if mask is not None:
        w = w * mask.double()
    if reduction == "batchmean" and len(lead_shape) and lead_shape[0] > 0:
        w = w / lead_shape[0]
    elif reduction == "mean":
        count = int(mask.sum()) if mask is not None else w.numel()
        w = w / max(count, 1)
    if kd:
        w = w * float(temperature) ** 2
    return w


def _backward(out, upstream):
    if upstream is None:
        out.sum().backward()
    elif isinstance(upstream, torch.Tensor):
        (out * upstream.to(out.device, out.dtype)).sum().backward()
    else:
        (out * upstream).sum().backward()


def overflow_as(x, dtype):
    """float64 values beyond dtype's range as dtype rounds them (+-inf): the best answer it can hold."""
    if dtype == torch.float64:
        return x
    return torch.where(x.abs() > torch.finfo(dtype).max, x.to(dtype).double(), x)


def broadcast_overflow(view_grad, adjoint, got):
    """The leaf elements of a broadcast input whose gradient `got` may be inf or NaN where float64's is
    finite: the backward sums the view's elements in float32 at best, and where their magnitudes
    exceed float32's range (or an element is beyond the dtype's), partial sums overflow both ways
    (inf - inf = NaN), as in plain PyTorch. view_grad: float64's gradient of the view; adjoint maps
    a view-shaped tensor to the leaf (sums over the copies)."""
    if got.dtype == torch.float64:
        return torch.zeros(got.shape, dtype=torch.bool)
    over = adjoint(view_grad.abs()) > torch.finfo(torch.float32).max
    return over & ~torch.isfinite(got.cpu().double())


def check_kl(student, teacher, *, kd=False, temperature=1.0, reduction="batchmean", mask=None,
             grad_student=True, grad_teacher=False, upstream=None, layout=None, value_tol=None,
             grad_tol=None, device="cpu", loss=None, options=None):
    """Run kdfast.softmax_kl_div (or kd_loss, or `loss`) on `device` and its float64 reference on
    the CPU on the same values, and compare values, gradients, dtypes and shapes; also check that
    the inputs are left untouched.

    loss: a name of DIVERGENCE_LOSSES (then kd is ignored) with its keyword options, e.g.
    loss="generalized_jsd", options=dict(beta=0.1); compared with divergence_floors.
    student, teacher: CPU leaf data (any float dtype); they are copied to `device`. layout(s, t)
    maps the leaves to the tensors handed to the loss (transposes, slices, expand ...). upstream:
    None (the output is summed), a float (out * g) or a tensor of the output's shape (sum(out * u)).
    Returns (out, grad_student, grad_teacher), on `device`."""
    layout = layout or (lambda s, t: (s, t))
    kw = dict(temperature=temperature, reduction=reduction, mask=mask)
    if loss is not None:
        assert loss in DIVERGENCE_LOSSES, loss
        fn, ref_fn, kd = getattr(kdfast, loss), getattr(ref, loss), False
        kw.update(options or {})
    else:
        fn = kdfast.kd_loss if kd else kdfast.softmax_kl_div
        ref_fn = ref.kd_loss if kd else ref.softmax_kl_div

    dev = torch.device(device)
    s_leaf = student.detach().clone().to(dev).requires_grad_(grad_student)
    t_leaf = teacher.detach().clone().to(dev).requires_grad_(grad_teacher)
    s_keep, t_keep = s_leaf.detach().clone(), t_leaf.detach().clone()
    mask_in = None if mask is None else mask.clone().to(dev)
    s_in, t_in = layout(s_leaf, t_leaf)
    out = fn(s_in, t_in, **dict(kw, mask=mask_in))

    lead = tuple(s_in.shape[:-1])
    assert out.device == s_in.device, f"loss on {out.device}"
    assert out.dtype == result_dtype(s_in.dtype, t_in.dtype), f"loss dtype {out.dtype}"
    assert tuple(out.shape) == (lead if reduction == "none" else ()), f"loss shape {tuple(out.shape)}"
    if grad_student or grad_teacher:
        assert out.grad_fn is not None
        _backward(out, upstream)
    else:
        assert out.grad_fn is None and not out.requires_grad
    assert same_bits(s_leaf.detach(), s_keep), "the student logits were modified"
    assert same_bits(t_leaf.detach(), t_keep), "the teacher logits were modified"
    if mask is not None:
        assert torch.equal(mask_in.cpu(), mask), "the mask was modified"

    # float64 reference on copies of the very same values
    sd = student.detach().double().requires_grad_(True)
    td = teacher.detach().double().requires_grad_(True)
    sdv, tdv = layout(sd, td)
    for view_d, leaf_d in ((sdv, sd), (tdv, td)):
        if view_d is not leaf_d:
            view_d.retain_grad()  # (its gradient on the view locates the rows to skip, below)
    expected = ref_fn(sdv, tdv, **kw)
    _backward(expected, upstream)

    if loss is None:
        vfloor, sfloor, tfloor = kl_floors(sdv, tdv, temperature)
    else:
        rows = ref_fn(sdv.detach(), tdv.detach(), **dict(kw, reduction="none", mask=None))
        vfloor, sfloor, tfloor = divergence_floors(sdv, tdv, temperature, rows)
    wv = row_value_weights(lead, reduction, mask, kd, temperature)
    value_floor = torch.where(wv == 0, 0.0, wv * vfloor).abs()
    if reduction != "none":
        value_floor = value_floor.sum()
    vdt = result_dtype(s_in.dtype, t_in.dtype)
    # Rows that float64 finds +inf through a probability float32 cannot hold (a teacher mass of
    # e^-300 where the student is -inf): in a float32 compute dtype they are finite for any
    # formulation (the reference's own in float32 too), so they are not compared (seed 7 case 7218).
    undetermined = torch.zeros(lead, dtype=torch.bool)
    if vdt != torch.float64:
        rows_kw = dict(kw, reduction="none", mask=None)
        rows64 = ref_fn(sdv.detach(), tdv.detach(), **rows_kw)
        rows32 = ref_fn(sdv.detach().float(), tdv.detach().float(), **rows_kw).double()
        undetermined = torch.isinf(rows64) & torch.isfinite(rows32) & (wv != 0)
    value_skip = None
    if reduction == "none":
        value_skip = undetermined
    elif bool(undetermined.any()):
        value_skip = torch.ones((), dtype=torch.bool)
    assert_close_scaled(out.detach().cpu(), overflow_as(expected, vdt), value_floor, value_tol or VALUE_TOL[vdt],
                        "loss", skip=value_skip)

    # d loss / d KL_row, then the floors mapped back to the leaves through the layout (its adjoint)
    if isinstance(upstream, torch.Tensor):
        wg = wv * upstream.double()
    else:
        wg = wv * (1.0 if upstream is None else float(upstream))
    wg = wg.abs().unsqueeze(-1)

    # A row whose KL is +inf (student -inf where p_t > 0) has no meaningful gradient on the side
    # whose log-probability is -inf (the teacher's for KL, the student's for reverse KL): the
    # reference gives NaN/inf there; those rows of that side are not compared. The other side's
    # gradient is finite and compared.
    inf_rows = ~torch.isfinite(vfloor).unsqueeze(-1)

    def to_leaf(view, leaf, x):
        # Map a view-shaped magnitude to the leaf through the layout's adjoint (sums for expand).
        if view is leaf:
            return x
        return torch.autograd.grad(view, leaf, x, retain_graph=True)[0]

    grads = []
    for want, leaf, leaf_d, view_d, floor, name in (
            (grad_student, s_leaf, sd, sdv, sfloor, "student gradient"),
            (grad_teacher, t_leaf, td, tdv, tfloor, "teacher gradient")):
        if not want:
            assert leaf.grad is None
            grads.append(None)
            continue
        g = leaf.grad
        assert g is not None, f"{name} is missing"
        assert g.device == leaf.device and g.dtype == leaf.dtype and g.shape == leaf.shape, \
            f"{name}: {g.device} {g.dtype} {tuple(g.shape)}"
        exp_g = leaf_d.grad if leaf_d.grad is not None else torch.zeros_like(leaf_d)  # (None: no dependence)
        if leaf.dtype in HALF:
            exp_g = exp_g.to(leaf.dtype).double()  # the best the dtype can hold
        exp_g = overflow_as(exp_g, leaf.dtype)
        tol = grad_tol or GRAD_TOL[leaf.dtype]
        # (an infinite floor belongs to a side skipped below; the other side of such a row keeps its own)
        view_fl = wg * floor
        view_fl = rounding_floor(torch.where(torch.isfinite(view_fl), view_fl, 0.0), leaf.dtype, tol)
        fl = rounding_floor(to_leaf(view_d, leaf_d, view_fl), leaf.dtype, tol)
        view_g = view_d.grad if view_d is not leaf_d else leaf_d.grad
        bad = undetermined.unsqueeze(-1).expand_as(floor)
        if view_g is not None and bool(inf_rows.any()):
            bad = bad | (inf_rows & ~torch.isfinite(view_g).all(-1, keepdim=True))
        skip = to_leaf(view_d, leaf_d, bad.double()) > 0
        if view_g is not None and view_d.numel() > leaf_d.numel():
            skip = skip | broadcast_overflow(view_g, lambda x: to_leaf(view_d, leaf_d, x), g)
        assert_close_scaled(g.cpu(), exp_g, fl, tol, name, skip=skip)
        grads.append(g)
    return out, grads[0], grads[1]


def assert_kl_deterministic(s, t):
    """Two forward+backward calls of kd_loss (with an upstream gradient other than the predicted
    one, so the rescale runs too) give the same bits: losses and both gradients."""
    results = []
    for _ in range(2):
        s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
        out = kdfast.kd_loss(s1, t1, temperature=2.0, reduction="none")
        (out * 0.5).sum().backward()
        results.append((out.detach(), s1.grad, t1.grad))
    for a, b in zip(*results):
        assert same_bits(a, b)


def run_in_threads(fns, repeats=3):
    """Run fns[i]() in thread i, `repeats` times each, all threads at once; return the last results."""
    results, errors = [None] * len(fns), []
    barrier = threading.Barrier(len(fns))

    def worker(i):
        try:
            barrier.wait()
            for _ in range(repeats):
                results[i] = fns[i]()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(fns))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    return results


def compare_compiled(fn, args, grads_of, rtol=1e-6, atol=1e-12):
    """torch.compile(fn, fullgraph=True) against eager fn: the value and the gradients of the
    args at indices grads_of (each side gets its own copies of the args)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    eager_args = [a.detach().clone().requires_grad_(a.requires_grad) if a.is_floating_point() else a for a in args]
    comp_args = [a.detach().clone().requires_grad_(a.requires_grad) if a.is_floating_point() else a for a in args]
    out_e = fn(*eager_args)
    out_c = compiled(*comp_args)
    torch.testing.assert_close(out_c, out_e, rtol=rtol, atol=0)
    out_e.backward()
    out_c.backward()
    for i in grads_of:
        torch.testing.assert_close(comp_args[i].grad, eager_args[i].grad, rtol=rtol, atol=atol)
    torch._dynamo.reset()


class FusedOpCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the (grad_student, grad_teacher) flags of every fused forward-and-gradient op
    (softmax_kl, rkd, feature_match: the last two arguments) called inside the
    block, and the name of every op dispatched (ops)."""

    def __init__(self):
        super().__init__()
        self.flags = []
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        if func.namespace == "kdfast" and func._opname in ("softmax_kl", "rkd", "feature_match"):
            self.flags.append(tuple(args[-2:]))
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- subprocesses

class PythonJob:
    """A fresh interpreter started in the background from the repo root (jobs started together run
    concurrently, which keeps the subprocess tests cheap in wall time)."""

    def __init__(self, args, env=None):
        full_env = dict(os.environ)
        for k in ("KDFAST_BACKEND", "KDFAST_CPU_ISA"):
            full_env.pop(k, None)
        full_env.update(env or {})
        full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=full_env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._done = None

    def result(self, timeout=180):
        if self._done is None:
            out, err = self.proc.communicate(timeout=timeout)
            self._done = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
        return self._done

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def check_scale_rows(dtype, device, V):
    """scale_rows_ against float64: per-row factors (rows with factor 1 untouched, bit for bit), an
    expanded scalar factor (stride 0, what backward of a sum hands over), and opcheck."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.randn(5, V, dtype=dtype, device=device)
    ratio = torch.tensor([1.0, 0.5, -2.0, 1.0, 0.0], dtype=acc, device=device)
    torch.library.opcheck(torch.ops.kdfast.scale_rows_.default, (g.clone(), ratio))
    for r in (ratio, torch.tensor(-3.0, dtype=acc, device=device).expand(5)):
        g2 = g.clone()
        torch.ops.kdfast.scale_rows_(g2, r)
        torch.testing.assert_close(g2, (g.double() * r.double().unsqueeze(1)).to(dtype))
    g2 = g.clone()
    torch.ops.kdfast.scale_rows_(g2, ratio)
    assert same_bits(g2[0], g[0]) and same_bits(g2[3], g[3])  # ratio 1: rows untouched


def start_python(args, env=None):
    """Start `python *args` (e.g. ["-c", code] or ["-m", "kdfast"]) in the background."""
    return PythonJob(args, env)


def run_python(code, env=None, timeout=180):
    """Run `python -c code` in a fresh interpreter from the repo root; returns CompletedProcess."""
    return start_python(["-c", code], env).result(timeout)


# Every subprocess check of the suite, by name: (python arguments, environment). They are all
# started together, in the background, the first time a test asks for one, so that their
# interpreter start-ups overlap.
_FORCE_ISA_SNIPPET = """
import json, warnings, torch
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import kdfast
s, t = torch.randn(3, 100), torch.randn(3, 100)
out = kdfast.kd_loss(s, t).item()
ref = kdfast.reference.kd_loss(s.double(), t.double()).item()
print(json.dumps({"selected": kdfast.build_info()["cpu_isa_selected"], "out": out, "ref": ref,
                  "backend": kdfast.get_backend(), "warnings": [str(x.message) for x in w]}))
"""
_BACKEND_SNIPPET = "import kdfast, json; print(json.dumps(kdfast.get_backend()))"
SUBPROCESS_JOBS = {
    # (KDFAST_BACKEND=AUTO rides along: case-insensitive, and still the native kernels)
    "isa=default": (["-c", _FORCE_ISA_SNIPPET], {"KDFAST_CPU_ISA": "default", "KDFAST_BACKEND": "AUTO"}),
    "isa=avx2": (["-c", _FORCE_ISA_SNIPPET], {"KDFAST_CPU_ISA": "avx2"}),
    "isa=avx512": (["-c", _FORCE_ISA_SNIPPET], {"KDFAST_CPU_ISA": "avx512"}),
    "isa=sse9": (["-c", "import kdfast"], {"KDFAST_CPU_ISA": "sse9"}),
    "backend=reference": (["-c", _BACKEND_SNIPPET], {"KDFAST_BACKEND": "reference"}),
    "backend=fastest": (["-c", _BACKEND_SNIPPET], {"KDFAST_BACKEND": "fastest"}),
    "python -m kdfast": (["-m", "kdfast"], {}),  # no KDFAST_* set: also the default backend
}
_started_jobs = {}


def _start_all_jobs():
    if not _started_jobs:
        for name, (args, env) in SUBPROCESS_JOBS.items():
            _started_jobs[name] = start_python(args, env)
    return _started_jobs


@pytest.fixture(scope="session")
def python_jobs():
    """name -> PythonJob for SUBPROCESS_JOBS; .result() waits for one."""
    jobs = _start_all_jobs()
    yield jobs
    for job in jobs.values():
        job.kill()


def extreme_logit_rows(V, dtype=torch.float32):
    """(student, teacher) of shape (6, V) with finite logits near float32's range: where the float64
    KL and gradients are finite, fp32 kernels must be too. The jumps sit past the first 2048-element
    block where V allows, so that an online softmax's running maxima move by ~FLT_MAX."""
    big = 3e38
    s = torch.randn(6, V, dtype=torch.float64) * 3
    t = torch.randn(6, V, dtype=torch.float64) * 3
    late = V // 2
    s[0, late] = big                      # one student logit near FLT_MAX: KL ~ 3e38 at T = 1
    s[1, -1], t[1, 0] = 1e37, -1e37       # a gap of 1e37, the student's in the row's last element
    t[2, -2], s[2, 0] = big, -big         # the teacher's maximum jumps by ~FLT_MAX late in the row
    s[3] = -big                           # logits 6e38 apart: s - max s overflows in fp32
    s[3, -1], t[3, V // 3] = big, big     # (KL = 6e38 / T: inf at T <= 1, finite at T = 4)
    s[4, ::2], t[4, 1::2] = big, big      # +-FLT_MAX-ish in alternation on both sides
    s[4, 1::2], t[4, ::2] = -big, -big
    t[5, late:] = t[5, late:] - big       # the teacher's mass in the first half, the student's last
    s[5, :late] = s[5, :late] - 1e37
    return s.to(dtype), t.to(dtype)


def decisive_mass_rows(V, positions, dtype=torch.float32):
    """(student, teacher), one row per position p: the teacher's mass almost all at p, the student's
    partly, so that dropping or double-counting element p moves the KL by far more than any
    tolerance. Put p at the first and last elements of rows, blocks and split chunks."""
    s = torch.randn(len(positions), V, dtype=torch.float64)
    t = torch.randn(len(positions), V, dtype=torch.float64)
    for r, p in enumerate(positions):
        t[r, p], s[r, p] = 25.0, 5.0
    return s.to(dtype), t.to(dtype)


# ----------------------------------------------------------------------------- relation point sets

def far_point_set(ratio, n=7, D=8, seed=0, dtype=torch.float32):
    """n - 1 points at spread 0.03 and one at ratio * 0.03 from them (the far-to-near ratio)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64) * 0.03
    u = torch.randn(D, generator=g, dtype=torch.float64)
    x[-1] += ratio * 0.03 * u / u.norm()
    return x.to(dtype)


def collinear_set(ratio, D, seed, n=9):
    """fp32 points on one line (along a unit vector in D dims): n - 1 at spread 0.03 and one at
    ratio * 0.03 from them. In D = 1 every cosine is +-1 and the angle gradient is exactly 0."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g, dtype=torch.float64) * 0.03
    t[-1] += ratio * 0.03
    u = torch.randn(D, generator=g, dtype=torch.float64)
    return (t.unsqueeze(-1) * (u / u.norm())).float()


def point_share(x, weight):
    """weight * 2 / (N * mean distance): the size of one point's share of the gradient."""
    d = torch.cdist(x.double(), x.double())
    return weight * 2.0 / (x.shape[-2] * d[d > 0].mean().item())


# ----------------------------------------------------------------------------- zero upstream gradients

def zero_upstream_case(name, dtype):
    """(student, teacher, extra args) of 4 rows for the zero-upstream checks: row 1 holds NaN, row 2 -inf."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 33, generator=g, dtype=torch.float64)
    t = torch.randn(4, 33, generator=g, dtype=torch.float64)
    s[1, 7] = math.nan
    s[2, 3] = -math.inf  # NaN for the cosine, a finite gradient for the softmax ones
    extra = ()
    if name == "sparse_kl_div":
        t = torch.log_softmax(t[:, :5], -1)
        extra = (torch.arange(5).expand(4, 5),)
    return s.to(dtype), t.to(dtype), extra


def check_zero_upstream_rows(name, dtype, second, device="cpu"):
    """reduction="none" with an upstream gradient of 0 on a row holding NaN or -inf: PyTorch's
    gradient there is 0 times the row's (NaN where that is not finite, 0 where it is), not the 0
    of a masked row. second: the gradient of a second backward (retain_graph), which recomputes."""
    s, t, extra = zero_upstream_case(name, dtype)
    up = torch.tensor([1.0, 0.0, 0.0, -2.0], dtype=torch.float64)
    grads = []
    for mod, cast in ((kdfast, dtype), (ref, torch.float64)):
        dev = device if mod is kdfast else "cpu"
        x = s.to(cast).detach().clone().to(dev).requires_grad_()
        out = getattr(mod, name)(x, t.to(cast).to(dev), *(e.to(dev) for e in extra), reduction="none")
        out = out.sum(-1) if out.dim() > 1 else out
        if second and mod is kdfast:
            (out * up.to(out)).sum().backward(retain_graph=True)
            x.grad = None
        (out * up.to(out)).sum().backward()
        grads.append(x.grad.cpu())
    got, want = grads
    assert want[1].isnan().all()  # the oracle: PyTorch's 0 * NaN
    assert torch.equal(got.isnan(), want.isnan())
    lost = got[1:3][~want[1:3].isnan()]  # (row 2 of the softmax losses: -inf, a finite gradient)
    assert (lost == 0).all(), "a row of upstream 0 with a finite gradient must get 0"
    assert torch.equal(got[[0, 3]].double(), want[[0, 3]].to(dtype).double()) or \
        relerr(got[[0, 3]].double(), want[[0, 3]]) < GRAD_TOL[dtype]
