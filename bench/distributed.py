"""python -m bench --only distributed: vocab-parallel KL and JSD on 2 gloo ranks (CPU).

Each rank holds rows x V/2 student and teacher logits (fp32), as after a column-parallel LM head,
and runs one forward and backward (student gradient) of the loss over the full vocabulary:
  kdfast      kdfast.distributed.softmax_kl_div / generalized_jsd (per-row statistics only)
  modelopt    the ModelOpt Megatron-plugin formulation in eager PyTorch: all_reduce(MAX) of the row
              maxima, a differentiable all_reduce(SUM) of the sum-exp, log-softmax by hand, the
              divergence's elementwise terms, a differentiable all_reduce(SUM) of the row sums
  allgather   all_gather the logits (differentiable for the student), then kdfast's single-device
              fused loss on the full rows, and the gradient's slice taken back
and the column-parallel fused head (fused-kl, fused-jsd): kdfast.distributed.fused_linear_distill_loss
from replicated hidden states (rows x --hidden) and each rank's V/2 x hidden weight slices of both
heads (gradients of the student's hidden states and weight), with its peak memory above the inputs
(VmHWM, as bench/memory_probe.py measures it, in one extra step after the timed ones).
Reports the median time of a step on rank 0 and the collective payload per rank and step (the
bytes of the tensors handed to all_reduce / all_gather, forward and backward), counted by wrapping
torch.distributed's collectives. Writes bench/results/<machine-tag>/distributed.json and prints a
table.

    python -m bench --only distributed
    python -m bench.distributed [--rows 2048 --vocab 32000 --hidden 512 --repeats 5 --head-only]
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


class _Counter:
    """Counts the payload bytes handed to torch.distributed's all_reduce and all_gather (the
    module attributes, which torch.distributed.nn and kdfast.distributed both call)."""

    def __init__(self):
        self.bytes = 0
        self._orig = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}
        for name, fn in self._orig.items():
            setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            t = args[0] if name == "all_reduce" else args[1]  # all_gather(out_list, tensor)
            self.bytes += t.numel() * t.element_size()
            return fn(*args, **kwargs)
        return counted


def _modelopt_log_probs(x, group):
    """log-softmax over the full vocabulary of a slice, ModelOpt style: all_reduce(MAX) of the
    maxima (no gradient needed: the maximum cancels), differentiable all_reduce(SUM) of the sum-exp."""
    from torch.distributed.nn.functional import all_reduce
    m = x.detach().amax(-1, keepdim=True)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    shifted = x - m
    denom = all_reduce(shifted.exp().sum(-1, keepdim=True), op=dist.ReduceOp.SUM, group=group)
    return shifted - denom.log()


def modelopt_kl(s, t, group):
    from torch.distributed.nn.functional import all_reduce
    ls, lt = _modelopt_log_probs(s, group), _modelopt_log_probs(t, group)
    rows = torch.nn.functional.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    return all_reduce(rows, op=dist.ReduceOp.SUM, group=group).sum() / s.shape[0]


def modelopt_jsd(s, t, group, beta=0.5):
    from torch.distributed.nn.functional import all_reduce
    lq, lp = _modelopt_log_probs(s, group), _modelopt_log_probs(t, group)
    lm = torch.logsumexp(torch.stack([lp + torch.log(torch.tensor(beta)), lq + torch.log(torch.tensor(1 - beta))]), 0)
    rows = (beta * torch.nn.functional.kl_div(lm, lp, reduction="none", log_target=True)
            + (1 - beta) * torch.nn.functional.kl_div(lm, lq, reduction="none", log_target=True)).sum(-1)
    return all_reduce(rows, op=dist.ReduceOp.SUM, group=group).sum() / s.shape[0]


def allgather_loss(fn):
    def loss(s, t, group):
        from torch.distributed.nn.functional import all_gather
        full_s = torch.cat(all_gather(s.contiguous(), group=group), -1)
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        return fn(full_s, torch.cat(parts, -1))
    return loss


def _methods():
    import kdfast
    from kdfast import distributed as kdd
    return {
        ("kl", "kdfast"): lambda s, t, g: kdd.softmax_kl_div(s, t, group=g),
        ("kl", "modelopt"): modelopt_kl,
        ("kl", "allgather"): allgather_loss(kdfast.softmax_kl_div),
        ("jsd", "kdfast"): lambda s, t, g: kdd.generalized_jsd(s, t, beta=0.5, group=g),
        ("jsd", "modelopt"): modelopt_jsd,
        ("jsd", "allgather"): allgather_loss(lambda s, t: kdfast.generalized_jsd(s, t, beta=0.5)),
    }


def _worker(rank, init_file, args, queue):
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.nn's deprecation notes
    torch.set_num_threads(1)  # 2 ranks on the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        g = torch.Generator().manual_seed(rank)
        V = args.vocab // WORLD
        s0 = torch.randn(args.rows, V, generator=g) * 3
        t = torch.randn(args.rows, V, generator=g) * 3
        counter = _Counter()
        out = {}
        for key, fn in ({} if args.head_only else _methods()).items():
            times, byts, value = [], None, None
            for i in range(args.repeats + 1):
                s = s0.clone().requires_grad_()
                dist.barrier()
                before = counter.bytes
                t0 = time.perf_counter()
                loss = fn(s, t, None)
                loss.backward()
                dt = time.perf_counter() - t0
                byts, value = counter.bytes - before, float(loss)
                if i:  # the first is a warm-up
                    times.append(dt)
                del s, loss
            out["/".join(key)] = {"median_s": statistics.median(times), "min_s": min(times),
                                  "bytes_per_rank": byts, "loss": value}
        out.update(_fused_head(args, counter))
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def _fused_head(args, counter):
    """The column-parallel fused head: time, payload and (one more step) peak memory above inputs."""
    from bench import memory_probe as mp_
    from kdfast import distributed as kdd
    g = torch.Generator().manual_seed(0)  # the hidden states are replicated: the same on every rank
    hs, ht = (torch.randn(args.rows, args.hidden, generator=g) for _ in range(2))
    g.manual_seed(1 + dist.get_rank())
    ws, wt = (torch.randn(args.vocab // WORLD, args.hidden, generator=g) / args.hidden ** 0.5 for _ in range(2))
    out = {}
    for loss in ("kl", "jsd"):
        def step():
            h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
            dist.barrier()
            t0 = time.perf_counter()
            value = kdd.fused_linear_distill_loss(h, w, ht, wt, divergence=loss)
            value.backward()
            return time.perf_counter() - t0, float(value)
        times = []
        for i in range(args.repeats + 1):
            before = counter.bytes
            dt, value = step()
            byts = counter.bytes - before
            if i:
                times.append(dt)
        libc = mp_._libc()
        if libc is not None:  # big blocks from mmap, so freed memory leaves and new memory shows as RSS
            libc.mallopt(mp_._M_MMAP_THRESHOLD, 64 * 1024)
        mp_._release_caches(libc)
        base = mp_._status_bytes("VmRSS")
        peak = None
        if mp_._reset_peak():
            step()
            peak = mp_._status_bytes("VmHWM") - base
        out[f"fused-{loss}/kdfast"] = {"median_s": statistics.median(times), "min_s": min(times),
                                       "bytes_per_rank": byts, "loss": value, "peak_bytes": peak}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench --only distributed")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=512, help="hidden width of the fused-head cases")
    ap.add_argument("--head-only", action="store_true", help="only the fused-head cases")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_worker, args=(r, os.path.join(d, "init"), args, queue)) for r in range(WORLD)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=1800) for _ in range(WORLD))
        for p in procs:
            p.join()
    res = results[0]
    from bench import harness
    info = harness.machine_info(["cpu"])
    cpu = f"{harness.cpu_model()}, {os.cpu_count()} cores, {WORLD} gloo ranks x 1 thread"
    print(f"vocab-parallel losses, {args.rows} x {args.vocab} fp32 ({args.vocab // WORLD} per rank), forward + "
          f"backward; {cpu}")
    print(f"{'loss':9} {'method':10} {'median ms':>10} {'min ms':>8} {'bytes/rank':>12} {'vs kdfast':>9}  loss value"
          f"  (fused: hidden {args.hidden}, peak MB above inputs)")
    for key, r in res.items():
        loss, method = key.split("/")
        base = res[f"{loss}/kdfast"]["median_s"]
        peak = f"  {r['peak_bytes'] / 2**20:.1f} MB" if r.get("peak_bytes") is not None else ""
        print(f"{loss:9} {method:10} {r['median_s'] * 1e3:10.1f} {r['min_s'] * 1e3:8.1f} {r['bytes_per_rank']:12,d} "
              f"{r['median_s'] / base:8.2f}x  {r['loss']:.6f}{peak}")
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", harness.machine_tag(info),
                                     "distributed.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"cpu": cpu, "rows": args.rows, "vocab": args.vocab, "hidden": args.hidden, "world": WORLD, "results": res,
                   "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, f, indent=1)
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
