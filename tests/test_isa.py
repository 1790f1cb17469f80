"""The per-ISA CPU kernel builds: each one agrees with float64, each can be forced by
KDFAST_CPU_ISA and reported by build_info, the baseline build holds no AVX/AVX-512 code, and
results do not depend on the thread count."""
import glob
import json
import os
import re
import shutil
import subprocess

import pytest
import torch

import kdfast
from kdfast import _ops

from conftest import (DTYPE_IDS, REPO, check_kl, decisive_mass_rows, extreme_logit_rows, needs_native, relerr,
                      same_bits)

pytestmark = needs_native

ISA_SHAPES = [(3, 7), (5, 33), (4, 1000), (3, 5000), (2, 70001)]


ISA_PARAMS = [pytest.param(dtype, shape, id=f"{DTYPE_IDS[dtype]}-{'x'.join(map(str, shape))}")
              for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
              for shape in ISA_SHAPES
              if dtype in (torch.float32, torch.bfloat16) or shape[-1] <= 5000]  # fp32, bf16 cover the rest


@pytest.mark.parametrize("dtype,shape", ISA_PARAMS)
def test_isa_matches_float64(cpu_isa, dtype, shape):
    s = (torch.randn(*shape, dtype=torch.float64) * 3).to(dtype)
    t = (torch.randn(*shape, dtype=torch.float64) * 3).to(dtype)
    for temperature in (0.5, 4.0):
        check_kl(s, t, kd=True, temperature=temperature, reduction="none", grad_teacher=True,
                 upstream=torch.rand(shape[:-1], dtype=torch.float64))


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("V", [7, 33, 1000, 5003])
def test_isa_sparse_kl_matches_float64(cpu_isa, tail, dtype, V):
    """The top-k KL of each ISA build (vector bodies, row tails, blocks, the bucket's masked sums)."""
    K = min(V, 20)
    t = torch.randn(3, V, dtype=torch.float64) * 3
    lp, idx = t.log_softmax(-1).topk(K, -1)
    s = (torch.randn(3, V, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    lpa = lp.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    up = torch.rand(3, dtype=torch.float64)
    out = kdfast.sparse_kl_div(s, lpa, idx, temperature=1.5, tail=tail, reduction="none")
    out.backward(up.to(out.dtype))
    s64, lp64 = s.detach().double().requires_grad_(), lpa.detach().double().requires_grad_()
    want = kdfast.reference.sparse_kl_div(s64, lp64, idx, temperature=1.5, tail=tail, reduction="none")
    want.backward(up)
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 8e-3}[dtype]
    assert relerr(out.detach(), want.detach()) <= max(tol, 3e-5 if dtype == torch.bfloat16 else tol)
    g = s64.grad.to(dtype).double() if dtype == torch.bfloat16 else s64.grad
    assert relerr(s.grad.double(), g) <= tol
    assert relerr(lpa.grad.double(), lp64.grad) <= (1e-10 if dtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
def test_isa_special_values(cpu_isa, dtype):
    """-inf (masked vocabulary), +-1e4 and a mask on every path, against float64."""
    s = torch.randn(4, 4100) * 3
    t = torch.randn(4, 4100) * 3
    t[0, 1::3] = float("-inf")
    s[1, :2048], t[1, :2048] = float("-inf"), float("-inf")
    s[2], t[2] = s[2].sign() * 1e4, t[2].sign() * 1e4
    t[3, :-5] = float("-inf")
    mask = torch.tensor([True, True, True, False])
    check_kl(s.to(dtype), t.to(dtype), temperature=0.7, reduction="none", mask=mask, grad_teacher=True)


TAIL_WIDTHS = [1, 15, 16, 17, 31, 33, 63, 100, 1000, 2049, 65536 + 33]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("V", TAIL_WIDTHS)
def test_isa_row_tails(cpu_isa, dtype, V):
    """Rows whose length is no multiple of the vector step (the tail takes a padded vector step), on
    the row path and, for the last width, the split path with a ragged last chunk; -inf in the tail."""
    rows = 2 if V > 65536 else 5
    s = (torch.randn(rows, V, dtype=torch.float64) * 3).to(dtype)
    t = (torch.randn(rows, V, dtype=torch.float64) * 3).to(dtype)
    if V > 1:  # (a row of -inf alone has no distribution)
        t[0, -1] = float("-inf")
    check_kl(s, t, kd=True, temperature=2.0, reduction="none", grad_teacher=True,
             upstream=torch.rand(rows, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("scale,temperature", [(60.0, 1.0), (20.0, 0.1)])
def test_isa_wide_logits(cpu_isa, dtype, scale, temperature):
    """Logits spanning far more than exp's range (most probabilities below float's smallest normal,
    where the kernels flush to 0) still match float64, on the row and split paths."""
    for rows, V in ((6, 3000), (2, 70001)):
        s = (torch.randn(rows, V, dtype=torch.float64) * scale).to(dtype)
        t = (torch.randn(rows, V, dtype=torch.float64) * scale).to(dtype)
        check_kl(s, t, temperature=temperature, reduction="sum", grad_teacher=True)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("V", [300, 5000, 70001])  # one block; online-softmax blocks; the split path
def test_isa_logits_near_float_max(cpu_isa, V, temperature):
    """Finite fp32 logits up to ~FLT_MAX, 6e38 apart: finite where float64 is (no overflowing sums,
    no inf * 0 when a running maximum jumps), inf exactly where float64 exceeds FLT_MAX."""
    s, t = extreme_logit_rows(V)
    # (value_tol: see test_softmax_kl.py test_logits_near_float_max)
    out, gs, _ = check_kl(s, t, temperature=temperature, reduction="none", grad_teacher=True, value_tol=1e-4)
    assert torch.isfinite(out[[1, 2, 5]]).all() and torch.isfinite(gs).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("V", [1, 7, 5000, 70001])
def test_isa_equal_distributions_give_exact_zeros(cpu_isa, dtype, V):
    """Where p_s = p_t exactly (V = 1, or a student row equal to the teacher's), the KL and both
    gradients are exactly 0, not rounding residue: on the row, online-block and split paths."""
    s = (torch.randn(3, V, dtype=torch.float64) * 3).to(dtype)
    t = (torch.randn(3, V, dtype=torch.float64) * 3).to(dtype) if V == 1 else s.clone()
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = kdfast.kd_loss(s1, t1, temperature=1.7, reduction="none")
    (out * torch.tensor([1.0, -2.0, 0.5], dtype=out.dtype)).sum().backward()
    assert (out == 0).all(), out
    for g in (s1.grad, t1.grad):
        assert (g == 0).all(), f"max |gradient| {g.abs().max().item():.3g}"


@pytest.mark.parametrize("want", ["both", "student", "teacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("V", [7, 5000, 70001])
def test_isa_tvd_equal_rows_zero_subgradient(cpu_isa, dtype, V, want):
    """TVD's gradient is a sign of P - Q: a student equal to the teacher must give P = Q exactly and
    the zero subgradient (the reference's sign(0) = 0), whichever gradients are asked for (an FMA
    contracted into P - Q made it a full +-1 term when one side was asked alone)."""
    s = (torch.randn(3, V, dtype=torch.float64) * 3).to(dtype)
    s1, t1 = s.clone().requires_grad_(want != "teacher"), s.clone().requires_grad_(want != "student")
    out = kdfast.tv_distance(s1, t1, temperature=1.7, reduction="sum")
    out.backward()
    assert out == 0, out
    for g in (s1.grad, t1.grad):
        assert g is None or (g == 0).all(), f"max |gradient| {g.abs().max().item():.3g}"


# Chunk and block bounds of the CPU kernels: online-softmax blocks of 2048 on the row path, split
# chunks of 32768 (rows < 16, V >= 65536).
EDGE_POSITIONS = {5000: [0, 2047, 2048, 4095, 4096, 4999],
                  70001: [0, 32767, 32768, 65535, 65536, 70000]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("V", sorted(EDGE_POSITIONS))
def test_isa_decisive_element_at_block_and_chunk_edges(cpu_isa, dtype, V):
    """The element that decides a row's KL sits first or last in a block, a split chunk or the row:
    a kernel that drops or repeats one element at a bound fails by orders of magnitude."""
    s, t = decisive_mass_rows(V, EDGE_POSITIONS[V], dtype)
    out, _, _ = check_kl(s, t, temperature=1.0, reduction="none", grad_teacher=True)
    assert (out > 2.0).all()  # the decisive element carries the KL: without it the row's KL is < 1


STREAMED = [pytest.param(dtype, shape, id=f"{DTYPE_IDS[dtype]}-{name}") for dtype, shape, name in [
    (torch.float32, (64, 32768), "rows"), (torch.float32, (64, 32771), "misaligned_rows"),
    (torch.float32, (8, 262144), "split"), (torch.float32, (8, 262147), "misaligned_split"),
    (torch.bfloat16, (16, 262147), "misaligned_rows"), (torch.bfloat16, (8, 524288), "split"),
    (torch.float16, (128, 32784), "rows")]]


@pytest.mark.parametrize("dtype,shape", STREAMED)
def test_isa_streamed_gradients(cpu_isa, dtype, shape):
    """Gradients of 8 MB and more are written with non-temporal stores where a row (row path) or
    chunk (split path) starts vector-aligned, plainly where not: both gradients, every ISA build,
    against float64."""
    s = (torch.randn(*shape, dtype=torch.float64) * 3).to(dtype)
    t = (torch.randn(*shape, dtype=torch.float64) * 3).to(dtype)
    check_kl(s, t, kd=True, temperature=2.0, reduction="none", grad_teacher=True,
             upstream=torch.rand(shape[:-1], dtype=torch.float64))


def test_kernels_leave_subnormals_on():
    """The KL kernels flush subnormals to zero only while they run: afterwards torch, on this
    thread and on the worker threads, still makes them (the kernels restore the FP control word)."""
    s = (torch.randn(64, 40000) * 60).requires_grad_()
    kdfast.kd_loss(s, torch.randn(64, 40000) * 60, temperature=1.0).backward()
    tiny = torch.full((1 << 20,), 1e-38) * 1e-3  # 1e-41: subnormal, 0 if flushed
    assert bool((tiny > 0).all())
    assert float(torch.tensor(1e-38) * torch.tensor(1e-3)) > 0


def test_isa_paths_agree_with_each_other():
    """Every path gives the float64 values to fp32 rounding, and so the baseline's. (Each path is a
    few 1e-6 off float64 in the row values: A / Z_t - log Z_t + log Z_s cancels, with fp32 sums.)"""
    isas = _ops.available_cpu_isas()
    s, t = torch.randn(6, 3001), torch.randn(6, 3001)
    sd = s.double().requires_grad_()
    want = kdfast.reference.kd_loss(sd, t.double(), reduction="none")
    want.sum().backward()
    results = {}
    for isa in isas:
        _ops.select_cpu_isa(isa)
        s1 = s.clone().requires_grad_()
        out = kdfast.kd_loss(s1, t, reduction="none")
        out.sum().backward()
        results[isa] = (out.detach(), s1.grad)
        assert relerr(out, want) < 1e-5 and relerr(s1.grad, sd.grad) < 2e-6, isa
    base = results["default"]
    for isa, (out, grad) in results.items():
        assert relerr(out, base[0]) < 2e-5, isa
        assert relerr(grad, base[1]) < 4e-6, isa


def test_select_cpu_isa_api():
    assert "default" in _ops.available_cpu_isas()
    assert set(_ops.available_cpu_isas()) <= set(_ops.compiled_cpu_isas())
    best = _ops.available_cpu_isas()[0]
    assert _ops.select_cpu_isa("auto") == best
    assert kdfast.build_info()["cpu_isa_selected"] == best
    assert _ops.select_cpu_isa("default") == "default"
    assert kdfast.build_info()["cpu_isa_selected"] == "default"
    with pytest.raises(ValueError, match="bogus"):
        _ops.select_cpu_isa("bogus")
    assert kdfast.build_info()["cpu_isa_selected"] == "default", "a bad name must not change the path"


def test_compiled_isas_on_x86():
    info = kdfast.build_info()
    assert "default" in info["cpu_isa_compiled"]
    if os.uname().machine in ("x86_64", "AMD64"):
        assert {"avx2", "avx512"} <= set(info["cpu_isa_compiled"]), \
            "a plain x86-64 source build must include the AVX2 and AVX-512 kernels"


# ----------------------------------------------------------------------------- forced by environment

@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_env_forces_isa(isa, python_jobs):
    if isa not in _ops.compiled_cpu_isas():
        pytest.skip(f"{isa} kernels are not compiled in this build")
    proc = python_jobs[f"isa={isa}"].result()
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    kdfast_warnings = [m for m in res["warnings"] if "kdfast" in m]
    if isa in _ops.available_cpu_isas():
        assert res["selected"] == isa
        assert not kdfast_warnings
    else:  # compiled but this CPU cannot run it: warn and use the best available path
        assert res["selected"] == _ops.available_cpu_isas()[0]
        assert any(isa in m for m in kdfast_warnings)
    assert abs(res["out"] - res["ref"]) <= 1e-5 * abs(res["ref"])
    if isa == "default":
        assert res["backend"] == "auto"  # KDFAST_BACKEND=AUTO, normalised


def test_env_unknown_isa_is_value_error(python_jobs):
    proc = python_jobs["isa=sse9"].result()
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr and "sse9" in proc.stderr and "KDFAST_CPU_ISA" in proc.stderr


# ----------------------------------------------------------------------------- baseline code

def _functions_with(so_path, pattern):
    """{function name: count} of instructions matching `pattern` inside functions whose demangled
    name contains 'kdfast::cpu'."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", so_path], capture_output=True,
                         text=True, check=True).stdout
    header = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    rx = re.compile(pattern)
    current, hits, seen = None, {}, 0
    for line in out.splitlines():
        m = header.match(line)
        if m:
            current = m.group(1)
            seen += "kdfast::cpu" in current
            continue
        if current and "kdfast::cpu" in current and rx.search(line):
            hits[current] = hits.get(current, 0) + 1
    return hits, seen


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump is not installed")
def test_baseline_kernels_use_no_wide_registers():
    libs = glob.glob(os.path.join(REPO, "kdfast", "_C*.so"))
    assert libs, "kdfast/_C*.so not found"
    for so in libs:
        hits, seen = _functions_with(so, r"%zmm|%ymm")
        assert seen > 0, f"no kdfast::cpu functions found in {so}: the check would be vacuous"
        assert not hits, f"AVX/AVX-512 registers in baseline kernels of {so}: {sorted(hits)[:5]}"
    # the same scan does find them where they belong
    avx512 = glob.glob(os.path.join(REPO, "kdfast", "_cpu_avx512*.so"))
    if avx512:
        hits, _ = _functions_with(avx512[0], r"%zmm")
        assert hits, "the AVX-512 kernel build has no zmm instructions"


# ----------------------------------------------------------------------------- threads

def test_build_info_reports_threads():
    for n in (1, 2):
        torch.set_num_threads(n)
        assert kdfast.build_info()["threads"] == n == torch.get_num_threads()
    assert kdfast.build_info()["openmp"] is True


@pytest.mark.parametrize("shape", [(64, 1000), (3, 70001), (2, 600000)],
                         ids=["row_path", "split_path", "split_huge"])
def test_threads_do_not_change_results(shape):
    s, t = torch.randn(*shape), torch.randn(*shape)

    def run():
        s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
        out = kdfast.kd_loss(s1, t1, temperature=2.0, reduction="none")
        (out * 0.25).sum().backward()
        return out.detach(), s1.grad, t1.grad

    results = {}
    for n in (1, 2, 1, 2):
        torch.set_num_threads(n)
        r = run()
        if n in results:  # the same thread count gives identical bits
            assert all(same_bits(a, b) for a, b in zip(r, results[n])), f"{n} threads not deterministic"
        results[n] = r
    for a, b in zip(results[1], results[2]):  # 1 versus 2 threads: equal to rounding
        assert relerr(a, b) < 1e-6
