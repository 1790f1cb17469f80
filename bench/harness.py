"""The shared benchmark harness: what is timed and how, statistics, memory, guards, machine info,
the table and the JSON. The family modules (kl, relation, feature) only say what to run.

How a case is run (run_case), and why:
  * Every contender is warmed up first (torch.compile compiles there, caches fill, the gradient
    buffers get faulted in once), outside any timing.
  * Timed rounds are interleaved round-robin in this one process: each round runs every contender
    once, in a rotated order, so drift of the machine (clock, thermal state, other load) hits every
    contender alike instead of whichever ran last.
  * One contender's turn in a round runs `iterations` forward+backward steps, calibrated from the
    warm-up so that a turn lasts about `round_s` (pytest-benchmark's rounds x iterations): tiny
    cases are not dominated by timer resolution, slow ones run once per round.
  * A step is what a training loop pays: leaf .grad = None, loss = fn(*inputs), loss.backward().
    A turn starts with the leaves' gradients already freed (outside the clock), so that no
    contender pays for unmapping the previous contender's gradient.
  * Rounds stop after `budget_s` once `min_rounds` are done (so a 2 s eager step is timed 3 times,
    a 50 ms one many more), or at `max_rounds`.
  * Reported: median with IQR, min and max over rounds (pytest-benchmark's robust statistics),
    Gelem/s = elements / median, and peak memory above the inputs.
  * Memory on CPU is measured in a fresh process per (case, contender) (bench.memory_probe), because
    RSS is per process and allocators keep what they once had; on CUDA it is
    torch.cuda.max_memory_allocated() minus what is allocated before the step.
  * Guards skip a contender, with the reason in the table, when its estimated memory exceeds what
    the device can give, or when the previous point of the same series predicts a step longer than
    `max_iter_s` (RKD's N^3 growth would otherwise blow the default run's 5 minutes).
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

GB = 1e9
MB = 1e6


# ------------------------------------------------------------------ configuration

@dataclass(frozen=True)
class Settings:
    """How long and how hard to measure; one preset per mode (quick, default, full)."""
    mode: str
    budget_s: float        # timed rounds of one case stop after this long (once min_rounds are done)
    min_rounds: int
    max_rounds: int
    round_s: float         # target duration of one contender's turn within a round
    warmup_s: float        # warm-up per contender lasts at least this long (at least 1 step)
    max_iter_s: float      # skip a contender whose predicted step is longer than this
    compile: str           # "all": torch.compile contenders in every case; "first": in the run's first case only
    cpu_mem_limit: float = 8 * GB   # skip a contender estimated to need more than this (bytes)
    memory: bool = True    # measure peak memory

    @classmethod
    def for_mode(cls, mode: str) -> "Settings":
        if mode == "quick":   # a smoke test: tiny sizes, just enough to exercise every path
            return cls(mode, budget_s=0.05, min_rounds=3, max_rounds=3, round_s=0.002, warmup_s=0.0,
                       max_iter_s=2.0, compile="first")
        if mode == "full":
            return cls(mode, budget_s=20.0, min_rounds=5, max_rounds=60, round_s=0.1, warmup_s=0.3,
                       max_iter_s=90.0, compile="all")
        return cls("default", budget_s=3.0, min_rounds=3, max_rounds=25, round_s=0.05, warmup_s=0.1,
                   max_iter_s=4.0, compile="all")


@dataclass
class Case:
    """One input configuration of one loss family on one device; plain data, so it pickles to the
    memory-probe process, which rebuilds inputs and contenders from it."""
    family: str
    name: str                  # as shown in the table, e.g. "2048x32000 fp32"
    device: str
    params: dict
    elements: int              # what Gelem/s counts (KL: rows*V)
    elements_unit: str         # what one element is, for the JSON and the notes
    series: Optional[str] = None    # cases of one series form one curve in the plots ...
    x: Optional[float] = None       # ... at this x (vocabulary size, N)
    cost_exponent: float = 1.0      # step time grows as x**cost_exponent along the series
    with_compile: bool = True       # include torch.compile contenders
    headline: bool = False          # a case the issues set bars on: never skipped for time


@dataclass
class Contender:
    """One implementation of the loss for a case. fn(*inputs) returns the scalar loss."""
    name: str
    fn: Optional[Callable]
    is_kdfast: bool = False
    mem_estimate: Optional[float] = None   # bytes above the inputs, for the guard only
    skip: Optional[str] = None             # why it cannot run here, if it cannot
    compiled: bool = False
    native: Optional[bool] = None          # kdfast only: whether a fused kernel runs
    floor: bool = False                    # a lower bound (e.g. the GEMMs alone), not the loss:
                                           # neither its value nor its speed is held against kdfast


@dataclass
class Record:
    """Every figure about one (case, contender); what goes to the JSON."""
    family: str
    case: str
    device: str
    params: dict
    contender: str
    is_kdfast: bool
    elements: int
    elements_unit: str
    series: Optional[str] = None
    x: Optional[float] = None
    status: str = "ok"                    # "ok", "skipped (...)" or "error: ..."
    iterations: int = 0                   # steps per round
    round_times_s: list = field(default_factory=list)  # per-step time of each round
    median_s: Optional[float] = None
    q1_s: Optional[float] = None
    q3_s: Optional[float] = None
    iqr_s: Optional[float] = None
    min_s: Optional[float] = None
    max_s: Optional[float] = None
    mean_s: Optional[float] = None
    stddev_s: Optional[float] = None
    gelem_s: Optional[float] = None
    peak_mem_bytes: Optional[float] = None
    mem_method: Optional[str] = None
    mem_error: Optional[str] = None
    loss: Optional[float] = None
    rel_diff_vs_kdfast: Optional[float] = None
    speedup_of_kdfast: Optional[float] = None    # contender median / kdfast median
    mem_ratio_vs_kdfast: Optional[float] = None  # contender peak / kdfast peak
    mem_estimate_bytes: Optional[float] = None
    case_wall_s: Optional[float] = None          # the whole case: warm-up, rounds, memory probes
    kdfast_native: Optional[bool] = None         # for the kdfast row: a fused kernel ran
    floor: bool = False                          # see Contender.floor

    @property
    def ok(self):
        return self.status == "ok"


# ------------------------------------------------------------------ statistics

def summarize(rec: Record) -> None:
    """Median, quartiles (inclusive method, as pytest-benchmark), min/max, mean and stddev."""
    xs = sorted(rec.round_times_s)
    if not xs:
        return
    rec.median_s = statistics.median(xs)
    if len(xs) >= 2:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        rec.q1_s, rec.q3_s = q[0], q[2]
        rec.stddev_s = statistics.stdev(xs)
    else:
        rec.q1_s = rec.q3_s = xs[0]
        rec.stddev_s = 0.0
    rec.iqr_s = rec.q3_s - rec.q1_s
    rec.min_s, rec.max_s, rec.mean_s = xs[0], xs[-1], statistics.fmean(xs)
    rec.gelem_s = rec.elements / rec.median_s / 1e9 if rec.median_s > 0 else None


# ------------------------------------------------------------------ stepping and timing

def leaves_of(inputs):
    return [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]


def step(fn, inputs, leaves):
    """One training-loop step of the loss: clear the gradients, forward, backward."""
    for x in leaves:
        x.grad = None
    loss = fn(*inputs)
    loss.backward()
    return loss


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_turn(fn, inputs, leaves, iterations, device):
    """Seconds per step over `iterations` steps: CUDA events on the GPU, perf_counter on the CPU.

    The gradients the previous contender left are freed before the clock starts: freeing them is
    that contender's cost (unmapping a large eager gradient takes a sizeable part of a step),
    and would otherwise be charged to whoever runs next. Within a turn each step frees its own."""
    for x in leaves:
        x.grad = None
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iterations):
            step(fn, inputs, leaves)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iterations
    t0 = time.perf_counter()
    for _ in range(iterations):
        step(fn, inputs, leaves)
    return (time.perf_counter() - t0) / iterations


def warm_up(fn, inputs, leaves, device, warmup_s, compiled=False):
    """Run steps until warmup_s has passed: at least two, or one where a step takes over 0.5 s, but
    always one more after torch.compile's compiling first step. Returns (loss of the first step,
    seconds of the last step)."""
    t_start = time.perf_counter()
    loss = step(fn, inputs, leaves)
    _sync(device)
    value = float(loss.detach().float())
    last = time.perf_counter() - t_start
    n = 1
    while (compiled and n < 2) or (last < 0.5 and (n < 2 or time.perf_counter() - t_start < warmup_s)):
        t0 = time.perf_counter()
        step(fn, inputs, leaves)
        _sync(device)
        last = time.perf_counter() - t0
        n += 1
    return value, last


# ------------------------------------------------------------------ guards

def mem_limit(device, settings):
    """Bytes a contender may need beyond its inputs on this device."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return 0.8 * free
    try:
        import psutil
        avail = psutil.virtual_memory().available
    except ImportError:
        avail = settings.cpu_mem_limit / 0.7
    return min(settings.cpu_mem_limit, 0.7 * avail)


def _fmt_bytes(b):
    return f"{b / GB:.1f} GB" if b >= 0.1 * GB else f"{b / MB:.0f} MB"


class History:
    """Last measured (x, median) per (device, series, contender), to predict the next point."""

    def __init__(self):
        self._last = {}

    def predict(self, case, contender):
        key = (case.device, case.series, contender)
        if case.series is None or key not in self._last:
            return None
        x0, t0 = self._last[key]
        return t0 * (case.x / x0) ** case.cost_exponent

    def add(self, rec):
        if rec.series is not None and rec.median_s is not None:
            self._last[(rec.device, rec.series, rec.contender)] = (rec.x, rec.median_s)


# ------------------------------------------------------------------ running a case

def run_case(family, case, settings, *, history, probe=None, on_phase=lambda msg: None):
    """Warm up, time interleaved, measure memory; returns one Record per contender."""
    t_case = time.perf_counter()
    contenders = family.contenders(case, settings)
    records = {c.name: Record(case.family, case.name, case.device, case.params, c.name, c.is_kdfast,
                              case.elements, case.elements_unit, case.series, case.x,
                              mem_estimate_bytes=c.mem_estimate, kdfast_native=c.native, floor=c.floor)
               for c in contenders}
    active = []
    limit = mem_limit(case.device, settings)
    for c in contenders:
        rec = records[c.name]
        predicted = history.predict(case, c.name)
        if c.skip:
            rec.status = f"skipped ({c.skip})"
        elif c.mem_estimate is not None and c.mem_estimate > limit:
            rec.status = f"skipped (needs ~{_fmt_bytes(c.mem_estimate)})"
        elif predicted is not None and predicted > settings.max_iter_s and not case.headline:
            rec.status = (f"skipped (~{predicted:.0f} s/step expected, cap {settings.max_iter_s:.0f} s"
                          + ("; --full runs it)" if settings.mode != "full" else ")"))
        else:
            active.append(c)
    if active:
        inputs = family.make_inputs(case)
        limit = mem_limit(case.device, settings)  # again, with the inputs in place
        for c in list(active):
            if c.mem_estimate is not None and c.mem_estimate > limit:
                records[c.name].status = f"skipped (needs ~{_fmt_bytes(c.mem_estimate)})"
                active.remove(c)
    if not active:
        inputs = None
        _free(case.device)
        for rec in records.values():
            rec.case_wall_s = time.perf_counter() - t_case
        return list(records.values())

    if any(c.compiled for c in active):
        # Dynamo keys its cache on the code object: reset, or the per-shape recompiles of earlier
        # cases count against its recompile limit and it silently falls back to eager.
        torch._dynamo.reset()
    leaves = leaves_of(inputs)
    est = {}
    for c in list(active):
        on_phase(f"warm-up {c.name}")
        rec = records[c.name]
        try:
            rec.loss, est[c.name] = warm_up(c.fn, inputs, leaves, case.device, settings.warmup_s,
                                            c.compiled)
        except Exception as e:  # e.g. out of memory: report it, keep benchmarking the rest
            _fail(rec, e, active, c, case.device)
        if c.floor:
            rec.loss = None
    for x in leaves:
        x.grad = None

    for c in active:
        records[c.name].iterations = max(1, min(1000, round(settings.round_s / max(est[c.name], 1e-7))))
    t_start, r = time.perf_counter(), 0
    while active:
        order = active[r % len(active):] + active[:r % len(active)]
        for c in order:
            rec = records[c.name]
            on_phase(f"round {r + 1}: {c.name}")
            try:
                rec.round_times_s.append(timed_turn(c.fn, inputs, leaves, rec.iterations, case.device))
            except Exception as e:
                _fail(rec, e, active, c, case.device)
        r += 1
        if r >= settings.max_rounds or (r >= settings.min_rounds
                                        and time.perf_counter() - t_start >= settings.budget_s):
            break
    for x in leaves:
        x.grad = None

    if settings.memory and case.device.startswith("cuda"):
        for c in active:
            on_phase(f"memory {c.name}")
            try:
                _cuda_peak(c, inputs, leaves, records[c.name])
            except Exception as e:
                records[c.name].mem_error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                _free(case.device)
    del inputs, leaves
    _free(case.device)
    if settings.memory and case.device == "cpu" and probe is not None:
        for c in active:
            on_phase(f"memory {c.name} (fresh process)")
            res = probe.measure(case, c.name, warmup=est[c.name] < 0.5 or c.compiled,
                                settings=settings, timeout=120 + 20 * est[c.name])
            rec = records[c.name]
            rec.peak_mem_bytes, rec.mem_method, rec.mem_error = (res.get("peak_bytes"), res.get("method"),
                                                                 res.get("error"))
    for rec in records.values():
        summarize(rec)
        history.add(rec)
        rec.case_wall_s = time.perf_counter() - t_case
    _compare_to_kdfast(list(records.values()), case)
    return list(records.values())


def _fail(rec, exc, active, contender, device):
    msg = str(exc).splitlines()[0][:120] if str(exc) else ""
    rec.status = f"error: {type(exc).__name__}: {msg}"
    rec.round_times_s = []
    active.remove(contender)
    _free(device)


def _cuda_peak(c, inputs, leaves, rec):
    """torch.cuda.max_memory_allocated over one step, minus what was allocated before it."""
    for x in leaves:
        x.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = step(c.fn, inputs, leaves)
    torch.cuda.synchronize()
    rec.peak_mem_bytes = torch.cuda.max_memory_allocated() - base
    rec.mem_method = "torch.cuda.max_memory_allocated"
    del loss
    for x in leaves:
        x.grad = None


def _free(device):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _compare_to_kdfast(records, case):
    """Speed-up and memory ratio of kdfast over each contender, and agreement of the loss values
    (a benchmark of a wrong loss proves nothing)."""
    kd = next((r for r in records if r.is_kdfast and r.ok), None)
    if kd is None:
        return
    for r in records:
        if r is kd or not r.ok:
            continue
        if r.median_s and kd.median_s:
            r.speedup_of_kdfast = r.median_s / kd.median_s
        if r.peak_mem_bytes is not None and kd.peak_mem_bytes:
            r.mem_ratio_vs_kdfast = r.peak_mem_bytes / kd.peak_mem_bytes
        if r.loss is not None and kd.loss is not None:
            r.rel_diff_vs_kdfast = abs(r.loss - kd.loss) / max(abs(kd.loss), 1e-12)


# ------------------------------------------------------------------ machine

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(s):
    s = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b", " ", s, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def machine_info(devices):
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # Other work on the machine skews every figure; the load average says how much there was.
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "THP_MEM_ALLOC_ENABLE", "KDFAST_BACKEND",
                                           "KDFAST_CPU_ISA", "KDFAST_CPU_CACHE_MB") if k in os.environ},
    }
    try:
        import psutil
        info["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    try:
        import kdfast
        info["kdfast_build_info"] = kdfast.build_info()
    except Exception as e:  # the bench still records what it can
        info["kdfast_build_info"] = {"error": repr(e)}
    if "cuda" in devices:
        p = torch.cuda.get_device_properties(0)
        info["cuda"] = {"device": p.name, "capability": f"{p.major}.{p.minor}",
                        "memory_bytes": p.total_memory, "cuda_runtime": torch.version.cuda}
    for mod in ("liger_kernel", "torchdistill", "trl"):
        try:
            m = __import__(mod)
            info[f"{mod}_version"] = getattr(m, "__version__", "installed")
        except Exception:
            pass
    return info


def machine_tag(info):
    tag = f"cpu-{slug(info['cpu_model'])}-{info['threads']}t"
    if "cuda" in info:
        tag = f"cuda-{slug(info['cuda']['device'])}_{tag}"
    return tag


def machine_label(info, device):
    """One line naming the machine, for plot titles and the table heading."""
    if device.startswith("cuda") and "cuda" in info:
        return f"{info['cuda']['device']} (torch {info['torch']})"
    return f"{info['cpu_model']}, {info['threads']} threads (torch {info['torch']})"


# ------------------------------------------------------------------ report

def _ms(s):
    if s is None:
        return ""
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"


def _x(v):
    return "" if v is None else f"{v:.2f}x"


def table_rows(records):
    rows = []
    for r in records:
        if not r.ok:
            rows.append([r.case, r.contender, r.status, "", "", "", "", ""])
            continue
        mem = "" if r.peak_mem_bytes is None else f"{r.peak_mem_bytes / MB:.1f}"
        if r.mem_error:
            mem = "n/a"
        rows.append([r.case, r.contender, _ms(r.median_s), _ms(r.iqr_s),
                     f"{r.gelem_s:.3g}" if r.gelem_s else "", mem,
                     "" if r.is_kdfast else _x(r.speedup_of_kdfast),
                     "" if r.is_kdfast else _x(r.mem_ratio_vs_kdfast)])
    return rows


HEADERS = ["case", "contender", "median ms", "IQR ms", "Gelem/s", "peak MB", "kdfast speed-up",
           "kdfast mem saving"]


def format_tables(records, info):
    """One table per (family, device), rendered by tabulate (GitHub markdown, pasteable into the
    README)."""
    from tabulate import tabulate
    out = []
    groups = {}
    for r in records:
        groups.setdefault((r.family, r.device), []).append(r)
    for (fam, dev), recs in groups.items():
        unit = recs[0].elements_unit
        out.append(f"\n### {fam} on {dev}: {machine_label(info, dev)}\n\nforward+backward, median "
                   f"and IQR over interleaved rounds; Gelem/s counts {unit}; peak MB = peak memory "
                   f"above the inputs; kdfast speed-up = contender median / kdfast median; kdfast mem "
                   f"saving = contender peak / kdfast peak\n")
        out.append(tabulate(table_rows(recs), headers=HEADERS, tablefmt="github",
                            disable_numparse=True))
    return "\n".join(out)


def notes(records):
    """Every case where kdfast is not ahead (time or memory), with the reason where it is known,
    and every loss value that disagrees with kdfast's."""
    lines = []
    by_case = {}
    for r in records:
        by_case.setdefault((r.family, r.device, r.case), []).append(r)
    for (fam, dev, case), recs in by_case.items():
        kd = next((r for r in recs if r.is_kdfast), None)
        why = ""
        if kd is not None and kd.kdfast_native is False:
            why = " (kdfast has no fused kernel for this loss on this device yet and runs its PyTorch reference)"
        if kd is None or not kd.ok:
            if kd is not None:
                lines.append(f"{fam}/{dev}/{case}: kdfast {kd.status}{why}")
            continue
        for r in recs:
            if r is kd or not r.ok or r.floor:
                continue
            if r.speedup_of_kdfast is not None and r.speedup_of_kdfast < 1.0:
                lines.append(f"{fam}/{dev}/{case}: kdfast is not faster than {r.contender} "
                             f"({_ms(kd.median_s)} ms vs {_ms(r.median_s)} ms){why}")
            if r.mem_ratio_vs_kdfast is not None and r.mem_ratio_vs_kdfast < 0.99 and \
                    kd.peak_mem_bytes - r.peak_mem_bytes > 1 * MB:
                lines.append(f"{fam}/{dev}/{case}: kdfast uses more memory than {r.contender} "
                             f"({kd.peak_mem_bytes / MB:.1f} MB vs {r.peak_mem_bytes / MB:.1f} MB){why}")
            tol = 2e-2 if r.params.get("dtype") in ("bf16", "fp16") else 1e-3
            if r.rel_diff_vs_kdfast is not None and not r.rel_diff_vs_kdfast <= tol:
                lines.append(f"{fam}/{dev}/{case}: {r.contender}'s loss differs from kdfast's by "
                             f"{r.rel_diff_vs_kdfast:.2e} (relative)")
        for r in recs:
            if r.mem_error:
                lines.append(f"{fam}/{dev}/{case}: memory probe of {r.contender} failed: {r.mem_error}")
            if r.status.startswith("error"):
                lines.append(f"{fam}/{dev}/{case}: {r.contender} {r.status}")
    return lines


def to_json(records, info, settings, extra=None):
    return {"machine": info, "settings": dataclasses.asdict(settings),
            "results": [dataclasses.asdict(r) for r in records], **(extra or {})}



# ------------------------------------------------------------------ helpers for the family modules

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def generator(device, seed=0):
    return torch.Generator(device=device).manual_seed(seed)


def has_kernel(op, device):
    """Whether the kdfast extension registered a kernel of `op` (e.g. "kdfast::rkd") for the
    device, and the backend would use it."""
    try:
        import kdfast
        if kdfast.get_backend() == "reference" or not kdfast.native_available(device):
            return False
        key = "CUDA" if str(device).startswith("cuda") else "CPU"
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, key))
    except Exception:
        return False


def compile_fn(fn):
    """torch.compile as its users would write it, specialised to the case's shapes (dynamic=False:
    its fastest code, compiled in the warm-up and never inside the timing). Built on first call, so
    listing the contenders (as every memory probe does) does not pay for importing Dynamo."""
    compiled = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, dynamic=False)
        return compiled(*args)
    return call
