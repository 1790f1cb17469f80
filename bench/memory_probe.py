"""Peak CPU memory of one forward+backward step of one (case, contender), in a fresh process.

Why a separate process: RSS belongs to the whole process, and allocators keep memory they once
had, so in the benchmark process the figure would depend on which contender ran before. Each
probe is a new process forked from a server that has only imported torch, kdfast and the bench
modules (multiprocessing's "forkserver", see bench/_forkserver_init.py: the same isolation as
spawning `python -m bench.memory_probe`, without paying the torch import in every probe).

What is measured: the process's peak RSS (VmHWM) during one step, minus its RSS after the inputs
are built. Before the measured step:
  * glibc is told to mmap every block of 64 KiB and more (M_MMAP_THRESHOLD), so freed memory leaves
    the process and a later allocation shows up as new RSS instead of hiding in a free list;
  * one warm-up step runs (torch.compile compiles there; skipped for slow eager steps, whose first
    step costs nothing extra), and every allocator cache is then released (kdfast's block cache,
    malloc_trim), so the measured step's buffers count whether they are fresh or recycled;
  * the peak is reset by writing 5 to /proc/self/clear_refs. Where the kernel refuses, a thread
    samples RSS every 0.2 ms instead (the JSON names the method).
So the figure is "memory this loss needs above its inputs", gradient included.

CLI, for looking at one case by hand:
    python -m bench.memory_probe kl "2048x32000 fp32" eager
"""
import argparse
import ctypes
import gc
import importlib
import json
import multiprocessing as mp
import threading
import time

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _RssSampler(threading.Thread):
    """Fallback peak tracker where VmHWM cannot be reset."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self):
        import os
        page = os.sysconf("SC_PAGE_SIZE")
        while not self.stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.0002)


def _release_caches(libc):
    import torch
    gc.collect()
    empty = getattr(torch.ops.kdfast, "_empty_cpu_cache", None) if hasattr(torch.ops, "kdfast") else None
    if empty is not None:
        empty()
    if libc is not None:
        libc.malloc_trim(0)


def probe(case, contender_name, warmup, threads, settings):
    """Run in the fresh process: returns {"peak_bytes", "method", "base_rss_bytes"}."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    import torch
    from bench.harness import leaves_of, step

    torch.set_num_threads(threads)
    family = importlib.import_module(f"bench.{case.family}")
    contender = next(c for c in family.contenders(case, settings) if c.name == contender_name)
    inputs = family.make_inputs(case)
    leaves = leaves_of(inputs)
    if warmup:
        step(contender.fn, inputs, leaves)
        for x in leaves:
            x.grad = None
    _release_caches(libc)
    base = _status_bytes("VmRSS")
    if _reset_peak():
        loss = step(contender.fn, inputs, leaves)
        peak, method = _status_bytes("VmHWM"), "VmHWM (fresh process)"
    else:
        sampler = _RssSampler()
        sampler.start()
        loss = step(contender.fn, inputs, leaves)
        sampler.stop.set()
        sampler.join()
        peak, method = max(sampler.peak, _status_bytes("VmRSS")), "RSS sampling (fresh process)"
    del loss
    return {"peak_bytes": max(0, peak - base), "method": method, "base_rss_bytes": base}


def _child(conn, *args):
    try:
        res = probe(*args)
    except BaseException as e:  # noqa: BLE001 - anything goes back to the parent as a message
        res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    conn.send(res)
    conn.close()


class MemoryProbe:
    """Starts one probe process per (case, contender); see the module docstring."""

    # torch, kdfast, the bench and torch.compile's modules and CPU checks: seconds, paid once in
    # the server instead of once per probe.
    PRELOAD = ["bench._forkserver_init"]

    def __init__(self):
        try:
            self.ctx = mp.get_context("forkserver")
            self.ctx.set_forkserver_preload(self.PRELOAD)
        except ValueError:  # no forkserver on this platform: a spawned interpreter is as fresh
            self.ctx = mp.get_context("spawn")

    def close(self):
        """Stop the fork server (and multiprocessing's resource tracker) and wait for them: left to
        exit after this process, they would linger as zombies where PID 1 reaps nothing (containers).
        These are private hooks of multiprocessing, hence the guard."""
        from multiprocessing import forkserver, resource_tracker
        for server in (getattr(forkserver, "_forkserver", None),
                       getattr(resource_tracker, "_resource_tracker", None)):
            try:
                server._stop()
            except Exception:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def measure(self, case, contender_name, *, warmup, settings, timeout):
        import torch
        recv, send = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(target=_child, args=(send, case, contender_name, warmup,
                                                  torch.get_num_threads(), settings))
        p.start()
        send.close()
        try:
            if recv.poll(timeout):
                res = recv.recv()
            else:
                res = {"error": f"timed out after {timeout:.0f} s"}
        except EOFError:  # died without a word: usually the kernel's OOM killer
            res = None
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
        if res is None:
            res = {"error": f"probe process died (exit code {p.exitcode})"}
        recv.close()
        return res


def main():
    from bench.harness import Settings
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family", choices=["kl", "divergence", "sparse", "relation", "feature", "fused_linear"])
    ap.add_argument("case", help="the case name as in the table")
    ap.add_argument("contender")
    ap.add_argument("--mode", default="default", choices=["quick", "default", "full"])
    ap.add_argument("--no-warmup", action="store_true")
    a = ap.parse_args()
    import torch
    settings = Settings.for_mode(a.mode)
    family = importlib.import_module(f"bench.{a.family}")
    case = next((c for c in family.cases(settings, "cpu") if c.name == a.case), None)
    if case is None:
        raise SystemExit(f"no case {a.case!r}; cases: {[c.name for c in family.cases(settings, 'cpu')]}")
    print(json.dumps(probe(case, a.contender, not a.no_warmup, torch.get_num_threads(), settings)))


if __name__ == "__main__":
    main()
