"""GPU benchmarks for bench/gpu_check.sh: device copy bandwidth, the fused softmax-KL (forward plus
backward) against eager PyTorch, torch.compile and Liger-Kernel, the divergence family's generalized
JSD (against TRL's formula, its torch.compile and LigerJSD) and reverse KL, a sweep of kdfast's CUDA
kernel configurations, rkd_loss at N = 8192, the feature losses, the top-k KL (sparse_kl_div) and the
vocab-parallel KL and JSD's per-shard ops (kdfast.distributed on a world-size-1 NCCL group).
Writes bench/results/gpu-<GPU name>.json (and a copy to
$OUT when set) and prints a short table last.

    python bench/gpu_check.py [--budget SECONDS] [--quick] [--out DIR]
    python bench/gpu_check.py --selftest-cpu      # the same code paths on tiny CPU tensors

Every stage is guarded: an error or an out-of-memory in one case is recorded and the rest go on.
"""
import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import shutil
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import kdfast  # noqa: E402

T = 2.0  # distillation temperature of every softmax-KL case
KL_CASES = [  # (rows, V, dtype): the 8192 x 131072 pair carries the performance bar
    (8192, 131072, torch.bfloat16),
    (8192, 131072, torch.float32),
    (2048, 32000, torch.bfloat16),
    (2048, 32000, torch.float32),
    (256, 128256, torch.bfloat16),
    (256, 128256, torch.float32),
    (256, 1000, torch.float32),  # an image-classification head: launch-bound
]
COMPILE_CASES = {(8192, 131072, torch.bfloat16), (8192, 131072, torch.float32), (2048, 32000, torch.bfloat16)}
# The divergence family (issue 16): generalized JSD at beta = 0.5 and reverse KL, forward plus student
# backward; the 8192 x 131072 bf16 JSD carries the GPU bar (>= 2x LigerJSD, >= 60% of copy bandwidth).
DIV_CASES = [(8192, 131072, torch.bfloat16), (2048, 32000, torch.float32), (256, 128256, torch.bfloat16)]
DIV_COMPILE_CASES = {(8192, 131072, torch.bfloat16)}  # each shape compiles anew: the bar's case only
DIV_RESERVE_S = 110  # of the budget (a third at most), kept from the KL cases for these
CLUSTER_CONFIGS = [  # (path, cluster size, cache)
    ("cluster", 4, "none"), ("cluster", 8, "none"), ("cluster", 8, "inplace"), ("cluster", 16, "none"),
    ("cluster", 16, "separate"), ("cluster", 16, "inplace"),
]
KDFAST_CONFIGS = {  # environment knobs of the CUDA kernel (see csrc/cuda/softmax_kl.cu)
    "auto": {},
    **{f"{path} C={c} cache={cache}": {"KDFAST_CUDA_KL": path, "KDFAST_CUDA_KL_CLUSTER": str(c),
                                       "KDFAST_CUDA_KL_CACHE": cache} for path, c, cache in CLUSTER_CONFIGS},
    "rows (fallback)": {"KDFAST_CUDA_KL": "rows"},
    "chunks (fallback)": {"KDFAST_CUDA_KL": "chunks"},
}
KNOBS = ("KDFAST_CUDA_KL", "KDFAST_CUDA_KL_CLUSTER", "KDFAST_CUDA_KL_CACHE", "KDFAST_CUDA_KL_CHUNK")
DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


class Budget:
    def __init__(self, seconds):
        self.t0 = time.monotonic()
        self.seconds = seconds

    def left(self):
        return self.seconds - (time.monotonic() - self.t0)

    def spent(self):
        return time.monotonic() - self.t0

    def less(self, reserve):
        """A budget of what is left but `reserve` seconds (kept for a later stage)."""
        return Budget(max(self.left() - reserve, 0.0))


def log(msg):
    print(msg, flush=True)


def reload_knobs():
    """The CUDA op reads its knobs once per process: read them again after changing them."""
    op = getattr(torch.ops.kdfast, "_cuda_softmax_kl_reload_knobs", None) if hasattr(torch.ops, "kdfast") else None
    if op is not None:
        op()


@contextlib.contextmanager
def knobs(values):
    old = {k: os.environ.get(k) for k in KNOBS}
    for k in KNOBS:
        os.environ.pop(k, None)
    os.environ.update(values)
    reload_knobs()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reload_knobs()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_ms(fn, device, warmup=2, iters=10, max_seconds=20.0, synced=False):
    """Median milliseconds of fn() (CUDA events on the GPU, wall clock on the CPU).

    On the GPU the iterations are queued back to back (as triton.testing.do_bench does, and as a
    training loop runs): the host launches the next iteration while the GPU still works, so each
    pair of events brackets GPU time, plus host time only where the host cannot keep up. synced=True
    waits for the GPU after every iteration instead, so the host's launch latency (Python, argument
    checks, launches before the first kernel) adds to each figure."""
    t_start = time.monotonic()
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if device.type == "cuda" and not synced:
        events = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            events.append((a, b))
        events[-1][1].synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in events)
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.monotonic() - t_start > max_seconds and len(times) >= 3:
            break
    return statistics.median(times)


# Cases at or below this many elements are bound by launches (issue 21): their steps are profiled
# once to count what each contender launches.
LAUNCH_BOUND_ELEMENTS = 256 * 128256


def launches_per_step(fn, device):
    """What one call of fn() puts on the device and asks of ATen, from one profiled call after a
    warm-up: {"device_ops": kernels, memsets and copies on the GPU (None on the CPU), "aten_ops":
    the top-level ATen calls (each launches a kernel or more on the GPU, or none for a view)}."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    events = prof.events()
    dev = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA) if device.type == "cuda" else None
    aten = sum(1 for e in events if e.name.startswith("aten::") and e.device_type == torch.autograd.DeviceType.CPU
               and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))
    return {"device_ops": dev, "aten_ops": aten}


# ----------------------------------------------------------------------------- copy bandwidth

def copy_bandwidth(device, nbytes):
    """Device-to-device copy: bytes read plus bytes written per second (GB/s), median of 20."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    x.fill_(1)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device, warmup=3, iters=20)
    del x, y
    free_memory(device)
    return {"bytes": nbytes, "ms": ms, "GBps": 2 * nbytes / (ms * 1e-3) / 1e9}


# ----------------------------------------------------------------------------- contenders

def eager_kd(s, t):
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True) * T * T


def kdfast_kd(s, t):
    return kdfast.kd_loss(s, t, temperature=T, reduction="batchmean")


def make_liger():
    from liger_kernel.transformers import LigerKLDIVLoss

    mod = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def liger_kd(s, t):
        return mod(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)) * T * T
    return liger_kd


def kd_op(s, t, divergence=0, mix=0.0, scale=T * T):
    """The fused op alone, as kd_loss (or, with divergence and mix, the divergence's function with
    scale 1) calls it: loss and student gradient in one launch (a few on the chunks path), the
    kernel's share of a kdfast step without Python and the small launches around it."""
    w = torch.full((s.shape[0],), scale / s.shape[0], dtype=torch.float32, device=s.device)
    x, y = s.detach(), t.detach()
    return lambda: torch.ops.kdfast.softmax_kl(x, y, 1.0 / T, divergence, mix, w, True, False)


# The divergence family. TRL's GKDTrainer.generalized_jsd_loss written out (labels=None, batchmean),
# not imported: the formula as TRL's users run it, in the inputs' dtype.
def trl_jsd(s, t, beta=0.5, temperature=T):
    s_lp = F.log_softmax(s / temperature, dim=-1)
    t_lp = F.log_softmax(t / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s_lp, t_lp, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t_lp, s_lp, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=s_lp.dtype, device=s_lp.device)
        mixture = torch.logsumexp(torch.stack([s_lp + torch.log1p(-beta_t), t_lp + torch.log(beta_t)]), dim=0)
        kl_teacher = F.kl_div(mixture, t_lp, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture, s_lp, reduction="none", log_target=True)
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    return jsd.sum() / jsd.size(0)


def kdfast_jsd(s, t):
    return kdfast.generalized_jsd(s, t, beta=0.5, temperature=T, reduction="batchmean")


def eager_reverse_kl(s, t):
    """KL(Q||P) as it is usually written: kl_div(log P, log Q) (the student is the target)."""
    return F.kl_div(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1), reduction="batchmean", log_target=True)


def kdfast_reverse_kl(s, t):
    return kdfast.reverse_kl_div(s, t, temperature=T, reduction="batchmean")


def make_liger_jsd():
    """Liger-Kernel's JSD fed log_softmax of student and teacher, as its users do (its beta weighs
    the teacher's side as TRL's does; 0.5 is symmetric anyway)."""
    from liger_kernel.transformers import LigerJSD

    mod = LigerJSD(beta=0.5)

    def liger_jsd(s, t):
        return mod(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1))
    return liger_jsd


def fwd_bwd(loss_fn, s, *rest):
    def step():
        s.grad = None
        loss_fn(s, *rest).backward()
    return step


def relerr(a, b):
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den else float((a - b).norm().item())


def kl_inputs(rows, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    s = (torch.randn(rows, V, device=device, generator=g, dtype=torch.float32) * 2).to(dtype).requires_grad_()
    t = (torch.randn(rows, V, device=device, generator=g, dtype=torch.float32) * 2).to(dtype)
    return s, t


def bench_kl(device, copy_gbps, budget, contenders, cases, compile_cases, iters, errors, results, save,
             prefix="", op=kd_op):
    """Each case: kdfast against the other contenders (contenders["kdfast"] checked against
    contenders["eager"] on the case first); op(s, t) gives kdfast's fused op alone."""
    for rows, V, dtype in cases:
        case = f"{prefix}{rows}x{V} {DT[dtype]}"
        nbytes = rows * V * 3 * torch.empty((), dtype=dtype).element_size()
        if budget.left() < 20:
            log(f"   {case}: skipped, out of time")
            errors.append(f"{case}: skipped, out of time")
            continue
        try:
            s, t = kl_inputs(rows, V, dtype, device)
        except torch.OutOfMemoryError:
            errors.append(f"{case}: inputs do not fit")
            continue
        # correctness of kdfast against eager on this very case
        check = {}
        try:
            s.grad = None
            with logged_plan(device) as plan:
                lk = contenders["kdfast"](s, t)
                lk.backward()
            if plan:
                check["plan"] = plan[-1]
                log(f"   {case}: kdfast plan {plan[-1]}")
            gk = s.grad.clone()
            s.grad = None
            le = contenders["eager"](s, t)
            le.backward()
            check.update({"loss_relerr_vs_eager": relerr(lk, le), "grad_relerr_vs_eager": relerr(gk, s.grad)})
            del gk, lk, le
            s.grad = None
        except Exception as e:  # noqa: BLE001
            check["error"] = f"{type(e).__name__}: {e}"[:300]
        free_memory(device)
        row = {"case": case, "rows": rows, "V": V, "dtype": DT[dtype], "temperature": T,
               "bytes_floor": nbytes, "check": check, "contenders": {}}
        for name, fn in contenders.items():
            if name == "torch.compile" and (rows, V, dtype) not in compile_cases:
                continue
            if budget.left() < 15:
                row["contenders"][name] = {"skipped": "out of time"}
                continue
            try:
                ms = time_ms(fwd_bwd(fn, s, t), device, warmup=2 if name != "torch.compile" else 3, iters=iters)
                c = row["contenders"][name] = {"ms": ms, **rates(nbytes, ms, copy_gbps)}
                if name == "kdfast" and kdfast.native_available(device.type):
                    # where the time goes: the same step with a host sync after each iteration
                    # (launch latency exposed), and the fused op alone (the kernel)
                    s.grad = None
                    c["synced"] = {"ms": (m := time_ms(fwd_bwd(fn, s, t), device, iters=iters, synced=True)),
                                   **rates(nbytes, m, copy_gbps)}
                    c["op_alone"] = {"ms": (m := time_ms(op(s, t), device, iters=iters)),
                                     **rates(nbytes, m, copy_gbps)}
                if rows * V <= LAUNCH_BOUND_ELEMENTS:
                    s.grad = None
                    try:
                        c["launches"] = launches_per_step(fwd_bwd(fn, s, t), device)
                    except Exception as e:  # noqa: BLE001  (the profiler is a guest here: never fatal)
                        c["launches"] = {"error": f"{type(e).__name__}: {e}"[:200]}
            except torch.OutOfMemoryError:
                row["contenders"][name] = {"skipped": "out of memory"}
            except Exception as e:  # noqa: BLE001
                row["contenders"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                errors.append(f"{case} {name}: {type(e).__name__}: {e}"[:300])
            s.grad = None
            free_memory(device)
            c = row["contenders"][name]
            for label, x in ((name, c), (name + " synced", c.get("synced")), (name + " op", c.get("op_alone"))):
                if x is None:
                    continue
                pct = f" {x['pct_copy']:5.1f}% of copy" if x.get("pct_copy") else ""
                log(f"   {case:22s} {label:14s} "
                    + (f"{x['ms']:9.3f} ms {x['GBps']:8.1f} GB/s{pct}" if "ms" in x else str(x)))
        k = row["contenders"].get("kdfast", {})
        if "ms" in k:
            row["speedup"] = {n: c["ms"] / k["ms"] for n, c in row["contenders"].items()
                              if n != "kdfast" and "ms" in c}
        results.append(row)
        save()
        del s, t
        free_memory(device)
    return results


def rates(nbytes, ms, copy_gbps):
    gbps = nbytes / (ms * 1e-3) / 1e9
    return {"GBps": gbps, "pct_copy": 100 * gbps / copy_gbps if copy_gbps else None}


def sweep_configs(device, budget, iters, cases, errors, out, save):
    """kdfast's CUDA kernel configurations on the bar's cases (forced through environment knobs),
    each timed as the fused op alone: what the configuration changes."""
    for rows, V, dtype in cases:
        if budget.left() < 20:
            break
        case = f"{rows}x{V} {DT[dtype]}"
        s, t = kl_inputs(rows, V, dtype, device)
        nbytes = rows * V * 3 * s.element_size()
        for name, env in KDFAST_CONFIGS.items():
            if budget.left() < 10:
                break
            if env.get("KDFAST_CUDA_KL_CACHE") == "inplace" and s.element_size() != 4:
                continue  # in place needs 4-byte inputs
            with knobs(env):
                try:
                    op = kd_op(s, t)
                    with logged_plan(device) as plan:  # what the knobs got (a plan that cannot run falls back)
                        op()
                    ms = time_ms(op, device, iters=iters)
                    out.append({"case": case, "config": name, "ms": ms, "GBps": nbytes / (ms * 1e-3) / 1e9,
                                "plan": plan[-1] if plan else None})
                    log(f"   {case:22s} {name:28s} {ms:9.3f} ms  {plan[-1] if plan else ''}")
                except Exception as e:  # noqa: BLE001
                    out.append({"case": case, "config": name, "error": f"{type(e).__name__}: {e}"[:300]})
                    log(f"   {case:22s} {name:28s} {type(e).__name__}: {e}"[:200])
            s.grad = None
            free_memory(device)
        save()
        del s, t
        free_memory(device)
    return out


@contextlib.contextmanager
def logged_plan(device):
    """The plans the CUDA op prints (KDFAST_CUDA_KL_LOG) for the calls inside the block, appended
    to the list it yields once the block ends."""
    plans, err = [], []
    os.environ["KDFAST_CUDA_KL_LOG"] = "1"
    reload_knobs()
    try:
        with captured_stderr(err):
            yield plans
            sync(device)
    finally:
        os.environ.pop("KDFAST_CUDA_KL_LOG", None)
        reload_knobs()
    plans += [ln.split("cuda: ", 1)[1] for ln in "".join(err).splitlines() if "softmax_kl cuda: " in ln]


@contextlib.contextmanager
def captured_stderr(sink):
    """Collects what C++ code writes to file descriptor 2 (the CUDA op logs its plan there)."""
    import tempfile
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            sink.append(f.read())


# ----------------------------------------------------------------------------- rkd

def bench_rkd(device, budget, N, D, errors):
    """rkd_loss forward plus backward at (N, D): time and peak memory with whatever backend kdfast
    uses for this device; skipped when its memory need cannot fit."""
    res = {"N": N, "D": D, "native_cuda": kdfast.native_available(device.type)}
    ops = torch.ops.kdfast
    has_rkd_kernels = hasattr(ops, "rkd") and device.type == "cuda" and \
        torch._C._dispatch_has_kernel_for_dispatch_key("kdfast::rkd", "CUDA")
    res["rkd_cuda_kernels"] = bool(has_rkd_kernels)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        res["free_bytes"] = free
        # Without fused kernels the angle term builds N x N x N tensors.
        if not has_rkd_kernels and 4 * N ** 3 > free:
            res["skipped"] = f"the reference angle loss needs ~{4 * N ** 3 / 1e12:.1f} TB (N^3 floats); no fused CUDA kernel"
            return res
    if budget.left() < 20:
        res["skipped"] = "out of time"
        return res
    try:
        g = torch.Generator(device=device).manual_seed(0)
        s = torch.randn(N, D, device=device, generator=g).requires_grad_()
        t = torch.randn(N, D, device=device, generator=g)
        free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)

        def step():
            s.grad = None
            kdfast.rkd_loss(s, t).backward()
        t0 = time.monotonic()
        step()
        sync(device)
        first = time.monotonic() - t0
        res["first_call_s"] = first
        iters = 3 if first < min(10.0, budget.left() / 6) else 0
        res["ms"] = time_ms(step, device, warmup=0, iters=iters) if iters else first * 1e3
        if device.type == "cuda":
            res["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        res["loss"] = float(kdfast.rkd_loss(s.detach(), t))
    except torch.OutOfMemoryError as e:
        res["skipped"] = f"out of memory: {str(e)[:200]}"
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {e}"[:300]
        errors.append(f"rkd: {res['error']}")
    free_memory(device)
    return res


# ----------------------------------------------------------------------------- feature losses

FEATURE_CASES = [  # (loss, shape, dtype): memory-bound one-pass losses
    ("logit_mse", (8192, 32768), torch.bfloat16), ("cosine_loss", (65536, 768), torch.float32),
]


def bench_feature(device, copy_gbps, budget, cases, iters, errors, results, save):
    """kdfast's fused feature losses against eager and torch.compile of the same PyTorch code:
    forward plus student gradient; GB/s against reading both inputs and writing the gradient."""
    eager = {"logit_mse": lambda s, t: F.mse_loss(s, t),
             "cosine_loss": lambda s, t: (1 - F.cosine_similarity(s, t, dim=-1)).mean()}
    for loss, shape, dtype in cases:
        case = f"{ {'logit_mse': 'mse'}.get(loss, 'cosine')} {'x'.join(map(str, shape))} {DT[dtype]}"
        if budget.left() < 15:
            errors.append(f"{case}: skipped, out of time")
            continue
        s, t = kl_inputs(*shape, dtype, device)
        nbytes = s.numel() * 3 * s.element_size()
        row = {"case": case, "bytes_floor": nbytes, "contenders": {}}
        kd = getattr(kdfast, loss)
        try:
            lk, le = kd(s, t), eager[loss](s, t)
            row["loss_relerr_vs_eager"] = relerr(lk, le)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{case}: {type(e).__name__}: {e}"[:300])
        contenders = {"kdfast": kd, "eager": eager[loss]}
        if device.type == "cuda":
            contenders["torch.compile"] = torch.compile(eager[loss])
        _time_contenders(row, case, contenders, (s, t), nbytes, device, iters, copy_gbps, errors)
        results.append(row)
        save()
        del s, t
        free_memory(device)
    return results


def _time_contenders(row, case, contenders, inputs, nbytes, device, iters, copy_gbps, errors):
    """Forward plus backward of each contender on inputs (the first is the student, which gets the
    gradient) into row["contenders"]."""
    for name, fn in contenders.items():
        try:
            ms = time_ms(fwd_bwd(fn, *inputs), device, warmup=3, iters=iters)
            row["contenders"][name] = {"ms": ms, **rates(nbytes, ms, copy_gbps)}
            log(f"   {case:28s} {name:14s} {ms:9.3f} ms")
        except Exception as e:  # noqa: BLE001
            row["contenders"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            errors.append(f"{case} {name}: {type(e).__name__}: {e}"[:300])
        inputs[0].grad = None
        free_memory(device)


SPARSE_CASES = [(2048, 32000, 64, torch.float32), (8192, 131072, 64, torch.bfloat16)]  # (rows, V, K, dtype)


def eager_sparse_kl(s, logprobs, ids):
    """The top-k KL as written today (bench/sparse.py): log_softmax over V, gather, renormalised teacher."""
    log_q = F.log_softmax(s.float(), -1).gather(-1, ids)
    log_p = F.log_softmax(logprobs.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum() / s.shape[0]


def bench_sparse(device, copy_gbps, budget, cases, iters, errors, results, save):
    """kdfast.sparse_kl_div (issue 17) against eager and torch.compile of the same formula, forward
    plus student gradient; GB/s against reading the student and writing its gradient."""
    for rows, V, K, dtype in cases:
        case = f"sparse {rows}x{V} K={K} {DT[dtype]}"
        if budget.left() < 15:
            errors.append(f"{case}: skipped, out of time")
            continue
        s, t = kl_inputs(rows, V, dtype, device)
        lp, ids = t.float().log_softmax(-1).topk(K, -1)
        del t
        nbytes = s.numel() * 2 * s.element_size()
        row = {"case": case, "bytes_floor": nbytes, "contenders": {}}
        try:
            row["loss_relerr_vs_eager"] = relerr(kdfast.sparse_kl_div(s, lp, ids), eager_sparse_kl(s, lp, ids))
        except Exception as e:  # noqa: BLE001
            errors.append(f"{case}: {type(e).__name__}: {e}"[:300])
        contenders = {"kdfast": kdfast.sparse_kl_div, "eager": eager_sparse_kl}
        if device.type == "cuda":
            contenders["torch.compile"] = torch.compile(eager_sparse_kl)
        _time_contenders(row, case, contenders, (s, lp, ids), nbytes, device, iters, copy_gbps, errors)
        results.append(row)
        save()
        del s, lp, ids
        free_memory(device)
    return results


# ----------------------------------------------------------------------------- vocab-parallel losses (issue 19)

# (rows, V_local, dtype): one rank's slice of a vocabulary split over a tensor-parallel group
SHARD_CASES = [(8192, 16032, torch.bfloat16), (2048, 32000, torch.float32), (256, 64128, torch.bfloat16)]


def bench_shard_ops(device, copy_gbps, budget, cases, iters, errors, results, save):
    """kdfast.distributed's softmax_kl_div and generalized_jsd (beta 0.5) at T on one rank's slice,
    forward plus student backward, in a world-size-1 process group (NCCL on the GPU, gloo on the CPU;
    its collectives carry O(rows) numbers): the fused per-shard ops (torch.ops.kdfast.softmax_kl_shard_*)
    against the plain-PyTorch per-shard passes they replace (kdfast.distributed's fallback). GB/s
    against the byte floor of the slice (both inputs read, the gradient written)."""
    import tempfile

    import torch.distributed as dist
    from kdfast import distributed as kdd
    own = not dist.is_initialized()
    if own:
        try:
            fd, init = tempfile.mkstemp(prefix="kdfast-gpu-check-pg-")
            os.close(fd)
            os.unlink(init)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init}",
                                    rank=0, world_size=1)
        except Exception as e:  # noqa: BLE001
            errors.append(f"vocab-parallel: no process group: {type(e).__name__}: {e}"[:300])
            return results
    losses = {"kl": lambda s, t: kdd.softmax_kl_div(s, t, temperature=T),
              "jsd0.5": lambda s, t: kdd.generalized_jsd(s, t, beta=0.5, temperature=T)}
    use_ops = kdd._use_ops

    @contextlib.contextmanager
    def passes():  # the PyTorch per-shard passes, in forward and backward
        kdd._use_ops = lambda x: False
        try:
            yield
        finally:
            kdd._use_ops = use_ops
    try:
        for rows, V, dtype in cases:
            s, t = kl_inputs(rows, V, dtype, device)
            nbytes = s.numel() * 3 * s.element_size()
            for name, fn in losses.items():
                case = f"vp {name} {rows}x{V} {DT[dtype]}"
                if budget.left() < 15:
                    errors.append(f"{case}: skipped, out of time")
                    continue
                row = {"case": case, "rows": rows, "V_local": V, "bytes_floor": nbytes, "contenders": {},
                       "uses_ops": bool(use_ops(s))}
                try:
                    got = fn(s, t)
                    with passes():
                        row["loss_relerr_vs_passes"] = relerr(got, fn(s, t))
                except Exception as e:  # noqa: BLE001
                    errors.append(f"{case}: {type(e).__name__}: {e}"[:300])
                _time_contenders(row, case, {"kdfast": fn}, (s, t), nbytes, device, iters, copy_gbps, errors)
                with passes():
                    _time_contenders(row, case, {"pytorch passes": fn}, (s, t), nbytes, device, iters, copy_gbps,
                                     errors)
                results.append(row)
                save()
            del s, t
            free_memory(device)
    finally:
        if own:
            dist.destroy_process_group()
    return results


# ----------------------------------------------------------------------------- report

def fmt_table(report):
    lines = []
    gpu = report.get("gpu", "?")
    cb = report.get("copy_bandwidth", {}).get("GBps")
    lines.append(f"kdfast GPU check: {gpu}   copy bandwidth {cb:.0f} GB/s (read+write)" if cb else f"kdfast GPU check: {gpu}")
    head = f"{'case':22s} {'contender':14s} {'ms':>9s} {'GB/s':>8s} {'%copy':>6s} {'kdfast x':>8s}"
    lines.append(head)
    lines.append("-" * len(head))
    for row in report.get("softmax_kl", []) + report.get("divergences", []):
        k = row["contenders"].get("kdfast", {})
        entries = []
        for name, c in row["contenders"].items():
            entries.append((name, c))
            if name == "kdfast":
                entries += [(f"  {sub}", c[key]) for sub, key in (("synced", "synced"), ("op alone", "op_alone"))
                            if key in c]
        for name, c in entries:
            if "ms" in c:
                sp = (c["ms"] / k["ms"]) if ("ms" in k and not name.startswith(("kdfast", " "))) else None
                pct = f"{c['pct_copy']:6.1f}" if c.get("pct_copy") is not None else f"{'':6s}"
                lines.append(f"{row['case']:22s} {name:14s} {c['ms']:9.3f} {c['GBps']:8.1f} {pct} "
                             + (f"{sp:8.2f}" if sp else f"{'':8s}"))
            else:
                lines.append(f"{row['case']:22s} {name:14s} {next(iter(c.values()))}"[:100])
    launch_rows = [(row["case"], name, c["launches"]) for row in report.get("softmax_kl", []) + report.get("divergences", [])
                   for name, c in row["contenders"].items() if "device_ops" in c.get("launches", {})]
    if launch_rows:
        lines.append("launches per forward+backward step (device ops / top-level ATen calls):")
        for case, name, n in launch_rows:
            lines.append(f"  {case:22s} {name:14s} {n['device_ops'] if n['device_ops'] is not None else '-':>4} / {n['aten_ops']}")
    cfgs = report.get("kdfast_configs") or []
    if cfgs:
        lines.append("kdfast kernel configurations (ms): " + "; ".join(
            f"{c['case']} {c['config']}: " + (f"{c['ms']:.3f}" if "ms" in c else "error") for c in cfgs))
    for row in report.get("feature", []) + report.get("sparse", []) + report.get("distributed", []):
        k = row["contenders"].get("kdfast", {})
        for name, c in row["contenders"].items():
            if "ms" in c:
                sp = c["ms"] / k["ms"] if "ms" in k and name != "kdfast" else None
                pct = f"{c['pct_copy']:6.1f}" if c.get("pct_copy") is not None else f"{'':6s}"
                lines.append(f"{row['case']:22s} {name:14s} {c['ms']:9.3f} {c['GBps']:8.1f} {pct} "
                             + (f"{sp:8.2f}" if sp else f"{'':8s}"))
    rk = report.get("rkd")
    if rk:
        if "ms" in rk:
            pk = rk.get("peak_bytes")
            lines.append(f"rkd_loss N={rk['N']} D={rk['D']} fwd+bwd: {rk['ms']:.1f} ms"
                         + (f", peak {pk / 2**30:.2f} GiB" if pk is not None else ""))
        else:
            lines.append(f"rkd_loss N={rk['N']} D={rk['D']}: {rk.get('skipped') or rk.get('error')}"[:160])
    if not report.get("complete"):
        lines.append("(incomplete: a later stage did not finish)")
    bar = report.get("bar")
    if bar:
        for b in bar:
            lines.append(b)
    return "\n".join(lines)


def bar_lines(report):
    out = []
    for row in report.get("softmax_kl", []):
        if row["rows"] == 8192 and row["V"] == 131072:
            k = row["contenders"].get("kdfast", {})
            lg = row["contenders"].get("liger", {})
            if "pct_copy" in k and k["pct_copy"] is not None:
                out.append(f"bar {row['case']}: kdfast at {k['pct_copy']:.1f}% of copy bandwidth "
                           f"({'meets' if k['pct_copy'] >= 80 else 'misses'} 80%)"
                           + (f"; {lg['ms'] / k['ms']:.2f}x Liger ({'meets' if lg['ms'] / k['ms'] >= 2 else 'misses'} 2x)"
                              if "ms" in lg else ""))
    for row in report.get("divergences", []):
        if row["case"].startswith("jsd") and row["rows"] == 8192 and row["V"] == 131072:
            k = row["contenders"].get("kdfast", {})
            lg = row["contenders"].get("liger", {})
            if k.get("pct_copy") is not None:
                out.append(f"bar {row['case']}: kdfast at {k['pct_copy']:.1f}% of copy bandwidth "
                           f"({'meets' if k['pct_copy'] >= 60 else 'misses'} 60%)"
                           + (f"; {lg['ms'] / k['ms']:.2f}x LigerJSD ({'meets' if lg['ms'] / k['ms'] >= 2 else 'misses'} 2x)"
                              if "ms" in lg else ""))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for all benchmarks together")
    ap.add_argument("--quick", action="store_true", help="fewer iterations and cases")
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/results; bench/out for the self-test)")
    ap.add_argument("--table-file", default=None, help="also write the final table here")
    ap.add_argument("--selftest-cpu", action="store_true", help="tiny shapes on the CPU, to test this script")
    args = ap.parse_args()
    if args.out is None:
        args.out = os.path.join(ROOT, "bench", "out" if args.selftest_cpu else "results")
    budget = Budget(args.budget)

    if args.selftest_cpu:
        device = torch.device("cpu")
        cases = [(64, 1000, torch.bfloat16), (32, 3001, torch.float32)]
        div_cases = cases
        compile_cases = set()
        rkd_nd = (64, 16)
        feature_cases = [("logit_mse", (64, 1000), torch.bfloat16), ("cosine_loss", (300, 64), torch.float32)]
        sparse_cases = [(64, 1000, 16, torch.float32)]
        copy_bytes = 64 << 20
        iters = 3
    else:
        if not torch.cuda.is_available():
            log("no CUDA device: GPU benchmarks skipped")
            return 0
        device = torch.device("cuda")
        cases = KL_CASES[:2] if args.quick else KL_CASES
        div_cases = DIV_CASES[:1] if args.quick else DIV_CASES
        compile_cases = COMPILE_CASES
        rkd_nd = (8192, 256)
        feature_cases = FEATURE_CASES[:1] if args.quick else FEATURE_CASES
        sparse_cases = SPARSE_CASES[:1] if args.quick else SPARSE_CASES
        copy_bytes = 2 << 30
        iters = 5 if args.quick else 10

    errors = []
    info = kdfast.build_info()
    report = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "kdfast_build": info, "temperature": T,
        "note": "ms = median of one forward plus backward (student gradient), iterations queued back to "
                "back with CUDA events around each (no host sync between them, as triton.testing.do_bench); "
                "kdfast also 'synced' (host sync after every iteration: launch latency included) and "
                "'op_alone' (the fused op without the Python around it); kdfast_configs time the op alone. "
                "GB/s against the byte floor rows*V*(2 inputs read + 1 gradient written)*itemsize; %copy "
                "against the measured D2D copy bandwidth (bytes read + written, timed the same way).",
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        report["device"] = {"name": p.name, "sms": p.multi_processor_count, "memory_bytes": p.total_memory,
                            "capability": f"{p.major}.{p.minor}"}
    log(f"== device {report['gpu']}; kdfast native kernels for it: {kdfast.native_available(device.type)}; "
        f"backend {kdfast.get_backend()}")
    if device.type == "cuda" and not kdfast.native_available("cuda"):
        errors.append("kdfast has no CUDA kernels here (build_info cuda=%s): its numbers are the reference" % info.get("cuda"))

    name = re.sub(r"[^A-Za-z0-9]+", "-", report["gpu"]).strip("-") or "unknown"
    if args.selftest_cpu:
        name = "selftest-cpu"
    path = os.path.join(args.out, f"gpu-{name}.json")
    os.makedirs(args.out, exist_ok=True)

    def save(final=False):
        """Writes the JSON and the table as they stand, so that a stage killed by its time limit
        still leaves everything measured before it."""
        report["bar"] = bar_lines(report)
        report["errors"] = errors
        report["seconds"] = budget.spent()
        report["complete"] = final
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)
        if os.environ.get("OUT") and not args.selftest_cpu:
            try:
                shutil.copy(path, os.environ["OUT"])
            except OSError as e:
                log(f"   could not copy to $OUT: {e}")
        if args.table_file:
            with open(args.table_file, "w") as f:
                f.write(fmt_table(report) + "\n")

    log("== copy bandwidth")
    try:
        report["copy_bandwidth"] = copy_bandwidth(device, copy_bytes)
        log(f"   {report['copy_bandwidth']['GBps']:.1f} GB/s")
    except Exception as e:  # noqa: BLE001
        report["copy_bandwidth"] = {"error": f"{type(e).__name__}: {e}"}
        errors.append(f"copy bandwidth: {e}")
    copy_gbps = report["copy_bandwidth"].get("GBps")
    save()

    contenders = {"kdfast": kdfast_kd, "eager": eager_kd}
    if device.type == "cuda":
        contenders["torch.compile"] = torch.compile(eager_kd)
        try:
            contenders["liger"] = make_liger()
            import liger_kernel
            report["liger_version"] = getattr(liger_kernel, "__version__", None) or _dist_version("liger-kernel")
        except Exception as e:  # noqa: BLE001
            report["liger"] = f"skipped: {type(e).__name__}: {e}"[:300]
            log(f"   Liger-Kernel skipped: {type(e).__name__}: {e}"[:200])

    log("== softmax-KL forward + backward")
    report["softmax_kl"] = []
    kl_budget = budget.less(min(DIV_RESERVE_S, budget.left() / 3))
    bench_kl(device, copy_gbps, kl_budget, contenders, cases, compile_cases, iters, errors, report["softmax_kl"], save)
    log("== divergences (generalized JSD beta = 0.5, reverse KL) forward + backward")
    report["divergences"] = []
    jsd = {"kdfast": kdfast_jsd, "eager": trl_jsd}
    rkl = {"kdfast": kdfast_reverse_kl, "eager": eager_reverse_kl}
    if device.type == "cuda":
        jsd["torch.compile"] = torch.compile(trl_jsd)
        rkl["torch.compile"] = torch.compile(eager_reverse_kl)
        try:
            jsd["liger"] = make_liger_jsd()
        except Exception as e:  # noqa: BLE001
            report["liger_jsd"] = f"skipped: {type(e).__name__}: {e}"[:300]
            log(f"   LigerJSD skipped: {type(e).__name__}: {e}"[:200])
    div_budget = budget.less(40)  # rkd and the feature losses after it
    for prefix, contenders_d, op in (("jsd0.5 ", jsd, lambda s, t: kd_op(s, t, 2, 0.5, 1.0)),
                                     ("rkl ", rkl, lambda s, t: kd_op(s, t, 1, 0.0, 1.0))):
        bench_kl(device, copy_gbps, div_budget, contenders_d, div_cases,
                 DIV_COMPILE_CASES if device.type == "cuda" else set(), iters, errors, report["divergences"], save,
                 prefix=prefix, op=op)
    log("== rkd_loss")
    report["rkd"] = bench_rkd(device, budget, *rkd_nd, errors)
    log(f"   {report['rkd']}")
    save()
    log("== feature losses forward + backward")
    report["feature"] = []
    bench_feature(device, copy_gbps, budget, feature_cases, iters, errors, report["feature"], save)
    log("== sparse_kl_div (top-k teacher) forward + backward")
    report["sparse"] = []
    bench_sparse(device, copy_gbps, budget, sparse_cases, iters, errors, report["sparse"], save)
    log("== vocab-parallel KL and JSD (kdfast.distributed, world size 1): per-shard ops vs PyTorch passes")
    report["distributed"] = []
    bench_shard_ops(device, copy_gbps, budget.less(60) if device.type == "cuda" else budget,
                    SHARD_CASES if device.type == "cuda" else [(64, 1000, torch.float32)], iters, errors,
                    report["distributed"], save)
    log("== fused linear head (JSD from hidden states and LM heads) forward + backward")
    report["fused_linear"] = []
    bench_fused_linear(device, budget.less(30) if device.type == "cuda" else budget, errors, report["fused_linear"], save,
                       cases=FUSED_LINEAR_CASES if device.type == "cuda" else [(64, 32, 48, 1000)],
                       dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.selftest_cpu or (device.type == "cuda" and kdfast.native_available("cuda")):
        log("== kdfast CUDA configurations"
            + (" (selftest: the knobs do nothing on the CPU)" if args.selftest_cpu else ""))
        report["kdfast_configs"] = []
        sweep_configs(device, Budget(min(90.0, max(budget.left() - 5, 0))), 5,
                      cases if args.selftest_cpu else KL_CASES[:2], errors, report["kdfast_configs"], save)
    save(final=True)
    log(f"== wrote {path}")
    if errors:
        log("== errors:\n   " + "\n   ".join(errors))
    print("\n" + fmt_table(report), flush=True)
    return 0


def _dist_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


# ----------------------------------------------------------------------------- fused linear head (issue 18)

FUSED_LINEAR_CASES = [(1024, 4096, 4096, 128256), (8192, 4096, 4096, 128256)]  # (N, H_s, H_t, V): Liger's shapes


def bench_fused_linear(device, budget, errors, results, save=lambda: None, cases=FUSED_LINEAR_CASES,
                       dtype=torch.bfloat16, iters=5):
    """JSD (beta = 0.5) from hidden states and LM heads, forward + backward of the student's hidden
    states and weight (teacher frozen): kdfast.fused_linear_distill_loss against the eager code
    (logits, then TRL GKDTrainer's formula), Liger's LigerFusedLinearJSDLoss and TRL's
    ChunkedDivergenceFunction, each where it imports. Milliseconds and peak memory above the inputs
    (on the CPU, used by --selftest-cpu style runs, the peak is not measured). Issue 18's bar: at
    N = 8192, faster than eager and Liger, with less memory than either."""
    from bench.fused_linear import eager_jsd
    contenders = {
        "kdfast": lambda hs, Ws, ht, Wt: kdfast.fused_linear_distill_loss(hs, Ws, ht, Wt, divergence="jsd", beta=0.5),
        "eager": eager_jsd,
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearJSDLoss
        liger = LigerFusedLinearJSDLoss(jsd_beta=0.5, temperature=1.0)
        contenders["liger"] = lambda hs, Ws, ht, Wt: liger(hs, Ws, ht, Wt)
    except Exception as e:  # noqa: BLE001
        log(f"   Liger fused JSD skipped: {type(e).__name__}: {e}"[:200])
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        def trl_jsd(hs, Ws, ht, Wt):
            div, _ = ChunkedDivergenceFunction.apply(hs, Ws, None, ht, Wt, None, 0.5, 1.0, 1.0, None, 1.0, None)
            return div.sum() / div.shape[0]
        contenders["trl"] = trl_jsd
    except Exception as e:  # noqa: BLE001
        log(f"   TRL ChunkedDivergenceFunction skipped: {type(e).__name__}: {e}"[:200])
    for N, Hs, Ht, V in cases:
        g = torch.Generator(device=device).manual_seed(0)
        hs = torch.randn(N, Hs, device=device, generator=g).to(dtype).requires_grad_()
        Ws = (Hs ** -0.5 * torch.randn(V, Hs, device=device, generator=g)).to(dtype).requires_grad_()
        ht = torch.randn(N, Ht, device=device, generator=g).to(dtype)
        Wt = (2 * Ht ** -0.5 * torch.randn(V, Ht, device=device, generator=g)).to(dtype)
        row = {"case": f"fused linear JSD N={N} H={Hs}/{Ht} V={V} {DT[dtype]}", "contenders": {}}
        results.append(row)
        for name, fn in contenders.items():
            if budget.left() < 10:
                row["contenders"][name] = "skipped: out of time budget"
                continue

            def step(fn=fn):
                hs.grad = Ws.grad = None
                loss = fn(hs, Ws, ht, Wt)
                loss.backward()
                return loss
            try:
                free_memory(device)
                loss = float(step().detach().float())
                peak = None
                if device.type == "cuda":
                    hs.grad = Ws.grad = None
                    free_memory(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    step()
                    sync(device)
                    peak = torch.cuda.max_memory_allocated(device) - base
                ms = time_ms(step, device, warmup=1, iters=iters, max_seconds=min(30.0, budget.left() / 2), synced=True)
                row["contenders"][name] = {"ms": ms, "peak_bytes": peak, "loss": loss}
                mem = "" if peak is None else f", peak {peak / 1e9:.2f} GB"
                log(f"   {row['case']} {name}: {ms:.1f} ms{mem}, loss {loss:.5f}")
            except Exception as e:  # noqa: BLE001 (out of memory included: recorded, the rest go on)
                row["contenders"][name] = f"error: {type(e).__name__}: {str(e)[:200]}"
                errors.append(f"{row['case']} {name}: {type(e).__name__}: {str(e)[:200]}")
            hs.grad = Ws.grad = None
            free_memory(device)
        save()
        del hs, Ws, ht, Wt
        free_memory(device)
    return results


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
