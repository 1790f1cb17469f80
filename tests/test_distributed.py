"""kdfast.distributed on real gloo process groups (CPU): vocab-parallel losses against the
single-process full-vocabulary losses (values and gradient slices), subgroups, uneven and empty
slices, DTensor, DDP and the torchrun example. One spawn per world size runs many cases, so the
file stays within CI's time (process start-up dominates)."""
import math
import os
import queue as queue_module
import subprocess
import sys
import tempfile
import time
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.utils._pytree
import torch.utils._python_dispatch

import kdfast
from kdfast import distributed as kdd, reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# (name, kwargs) of every loss, the endpoints and the reverse forms included
LOSSES = [("softmax_kl_div", {}), ("kd_loss", {"temperature": 2.0}), ("generalized_jsd", {"beta": 0.5}),
          ("generalized_jsd", {"beta": 0.2, "temperature": 0.7}), ("generalized_jsd", {"beta": 0.0}),
          ("generalized_jsd", {"beta": 1.0}), ("reverse_kl_div", {}), ("skew_kl_div", {"alpha": 0.1}),
          ("skew_kl_div", {"alpha": 0.3, "reverse": True}), ("skew_kl_div", {"alpha": 0.0}),
          ("skew_kl_div", {"alpha": 1.0}), ("tv_distance", {"temperature": 1.5})]
REDUCTIONS = ["none", "sum", "mean", "batchmean"]


def _inputs(seed, V, dtype=torch.float64, lead=(2, 3), neg_inf=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(*lead, V, generator=g, dtype=torch.float64) * 2
    if neg_inf:  # a masked vocabulary: the first slice's entries of one row without mass, and others
        s[0, 0, :2] = -math.inf
        t[0, 0, :2] = -math.inf
        t[1, 1, 3:5] = -math.inf
        s[1, 2, 4] = -math.inf
    mask = torch.rand(lead, generator=g) > 0.3
    up = torch.rand(lead, generator=g, dtype=torch.float64)  # upstream gradient of "none"
    return s.to(dtype), t.to(dtype), mask, up


def _run(fn, s, t, kwargs, up):
    s, t = s.detach().requires_grad_(), t.detach().requires_grad_()
    out = fn(s, t, **kwargs)
    (out * up.to(out.dtype)).sum().backward() if out.dim() else out.backward()
    # (a loss that does not depend on an input, as skew KL at alpha = 1 on the student, leaves no grad: 0)
    return out.detach(), *(torch.zeros_like(x) if x.grad is None else x.grad for x in (s, t))


def _close(a, b, what, rtol, atol):
    if not torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True):
        err = (a.double() - b.double()).abs().nan_to_num(math.inf).max().item()
        raise AssertionError(f"{what}: max abs error {err}\n{a}\n{b}")


def _check_losses(group, seed, V, dtype, neg_inf=False, rtol=1e-10, atol=1e-12, device="cpu"):
    """Every loss x reduction x mask on this rank's slice against the reference on the full logits."""
    start, stop = kdd.vocab_range(V, group)
    rank = dist.get_rank(group)
    s, t, mask, up = (x.to(device) for x in _inputs(seed, V, dtype, neg_inf=neg_inf))
    n = 0
    for name, kw in LOSSES:
        if neg_inf and kw.get("alpha") == 1.0:
            continue  # the reference's gradient is NaN there (skew KL at alpha = 1 is 0; the op gives 0)
        # every reduction unmasked; the mask with the two reductions that count rows differently
        for reduction, m in [(r, None) for r in REDUCTIONS] + [("none", mask), ("mean", mask), ("batchmean", mask)]:
            if True:
                kwargs = dict(kw, reduction=reduction, mask=m)
                what = f"rank {rank} V={V} {dtype} {name} {kw} {reduction} mask={m is not None} inf={neg_inf}"
                want, gs, gt = _run(getattr(reference, name), s, t, kwargs, up)
                got, ls, lt = _run(lambda a, b, **k: getattr(kdd, name)(a, b, group=group, **k),
                                   s[..., start:stop], t[..., start:stop], kwargs, up)
                assert got.dtype == want.dtype and got.shape == want.shape, what
                _close(got, want, what + " value", rtol, atol)
                _close(ls, gs[..., start:stop], what + " grad student", rtol, atol)
                _close(lt, gt[..., start:stop], what + " grad teacher", rtol, atol)
                assert ls.dtype == s.dtype and lt.dtype == t.dtype, what
                n += 1
    return n


def _head_reference(hs, ws, bs, ht, wt, bt, labels, kw):
    """The fused head's loss with the full logits (float64): DESIGN.md section 5's semantics."""
    def logits(h, w, b, cap):
        z = h.reshape(-1, h.shape[-1]) @ w.t() + b
        return z if cap is None else cap * torch.tanh(z / cap)
    zs, zt = logits(hs, ws, bs, kw.get("student_softcap")), logits(ht, wt, bt, kw.get("teacher_softcap"))
    keep = labels.reshape(-1) != -100
    div = kw["divergence"]
    mix = kw.get("beta", 0.5) if div == "jsd" else kw.get("alpha", 0.1) if div.startswith("skew") else 0.0
    rows = kw.get("soft_weight", 1.0) * reference.divergence_rows(zs, zt, kw.get("temperature", 1.0), div, mix, keep)
    if kw.get("hard_weight", 0.0):
        ce = torch.nn.functional.cross_entropy(zs, labels.reshape(-1), ignore_index=-100, reduction="none")
        rows = rows + kw["hard_weight"] * ce
    rows = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype))
    if kw["reduction"] == "none":
        return rows.reshape(labels.shape)
    return rows.sum() if kw["reduction"] == "sum" else rows.sum() / keep.sum()


# tokens per chunk of the fused head's cases, in turn: the default (one chunk here), single tokens,
# and sizes that do not divide the 8 tokens (a short last chunk)
HEAD_CHUNKS = (None, 3, 1, 5, 8, 2)


def _check_fused_head(group, seed, V):
    """kdfast.distributed.fused_linear_distill_loss on weight and bias slices against the full head:
    loss, the hidden states' full gradients, the slices' gradients (student and teacher), with the
    chunk sizes of HEAD_CHUNKS in turn (and every one of them on two cases)."""
    start, stop = kdd.vocab_range(V, group)
    g = torch.Generator().manual_seed(seed)
    d = dict(dtype=torch.float64)
    full = [torch.randn(2, 4, 5, generator=g, **d), torch.randn(V, 5, generator=g, **d), torch.randn(V, generator=g, **d),
            torch.randn(2, 4, 7, generator=g, **d), torch.randn(V, 7, generator=g, **d), torch.randn(V, generator=g, **d)]
    labels = torch.randint(0, V, (2, 4), generator=g)
    labels[0, :2] = -100
    n = 0
    cases = [dict(divergence=dv, reduction=r, hard_weight=hw) for dv in ("kl", "jsd", "skew_reverse_kl", "tvd")
             for r in ("mean", "sum", "none") for hw in (0.0, 0.7)]
    cases += [dict(divergence="reverse_kl", reduction="mean", hard_weight=0.3, temperature=2.0, student_softcap=3.0,
                   teacher_softcap=4.0, soft_weight=0.5), dict(divergence="jsd", beta=0.2, reduction="mean"),
              dict(divergence="skew_kl", alpha=0.4, reduction="sum", hard_weight=1.0),
              dict(divergence="kl", reduction="mean", hard_weight=0.5, soft_weight=0.0)]
    cases = [dict(kw, chunk_size=HEAD_CHUNKS[i % len(HEAD_CHUNKS)]) for i, kw in enumerate(cases)]
    cases += [dict(divergence=dv, reduction=r, hard_weight=0.4, chunk_size=c, student_softcap=5.0)
              for dv, r in (("kl", "none"), ("jsd", "mean")) for c in HEAD_CHUNKS]
    for kw in cases:
        ref_in = [x.clone().requires_grad_() for x in full]
        want = _head_reference(*ref_in[:3], *ref_in[3:], labels, kw)
        (want * torch.linspace(0.5, 1.5, want.numel(), **d).reshape(want.shape)).sum().backward()
        loc = [x.detach().clone() for x in full]
        for i in (1, 2, 4, 5):
            loc[i] = loc[i][start:stop].clone()
        loc = [x.requires_grad_() for x in loc]
        got = kdd.fused_linear_distill_loss(loc[0], loc[1], loc[3], loc[4], student_bias=loc[2], teacher_bias=loc[5],
                                            labels=labels, group=group, **kw)
        (got * torch.linspace(0.5, 1.5, got.numel(), **d).reshape(got.shape)).sum().backward()
        what = f"fused head rank {dist.get_rank()} V={V} {kw}"
        _close(got.detach(), want.detach(), what, 1e-10, 1e-12)
        for i, name in enumerate(("student_hidden", "student_weight", "student_bias", "teacher_hidden",
                                  "teacher_weight", "teacher_bias")):
            ref_g = ref_in[i].grad if ref_in[i].grad is not None else torch.zeros_like(full[i])
            if i in (1, 2, 4, 5):
                ref_g = ref_g[start:stop]
            _close(loc[i].grad if loc[i].grad is not None else torch.zeros_like(loc[i]), ref_g, what + " " + name,
                   1e-10, 1e-12)
        n += 1
    # a label outside the full vocabulary is an error on every rank, not a silent 0
    bad = labels.clone()
    bad[1, 1] = V
    try:
        kdd.fused_linear_distill_loss(loc[0], loc[1], loc[3], loc[4], labels=bad, hard_weight=1.0, chunk_size=3,
                                      group=group)
    except ValueError as e:
        assert "labels" in str(e), e
    else:
        raise AssertionError("an out-of-range label was accepted")
    return n


class _PeakMemory(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the tensor storages created under it and alive at once (what a tracking
    allocator sees above the inputs, gradients included; scratch inside an op is not counted)."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, key):
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.live:
                    self.live[key] = st.nbytes()
                    self.now += st.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(st, self._free, key)
        return out


def _check_fused_head_memory(group):
    """The fused head's memory above its inputs, forward and backward, scales with the chunk of
    tokens, not with tokens x V_local: one chunk's (chunk x V_local) buffers, the O(tokens x H)
    hidden gradients and O(tokens) per-row numbers."""
    world = dist.get_world_size(group)
    H, V_local = 4, 3000
    start, stop = kdd.vocab_range(V_local * world, group)

    def peak(N, chunk, divergence):
        g = torch.Generator().manual_seed(N)
        hs, ht = (torch.randn(N, H, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
        ws, wt = (torch.randn(V_local * world, H, generator=g, dtype=torch.float64)[start:stop].clone()
                  .requires_grad_() for _ in range(2))
        labels = torch.randint(0, V_local * world, (N,), generator=g)
        with _PeakMemory() as m:
            kdd.fused_linear_distill_loss(hs, ws, ht, wt, divergence=divergence, labels=labels, hard_weight=0.5,
                                          chunk_size=chunk, group=group).backward()
        return m.peak

    logits = 8 * V_local  # bytes of one token's float64 logits slice
    N, C = 64, 4
    for divergence in ("kl", "jsd"):
        small, big, more_tokens = peak(N, C, divergence), peak(N, 4 * C, divergence), peak(2 * N, C, divergence)
        what = (f"fused head memory {divergence}: {N} tokens chunk {C} {small} B, chunk {4 * C} {big} B, "
                f"{2 * N} tokens {more_tokens} B")
        # N x V_local logits would be 1.5 MB each; a chunk needs a few (C x V_local) buffers
        assert small < 12 * C * logits + 2 * N * 8 * (H + 16) + 2 * V_local * 8 * H, what
        assert big - small > 2 * 3 * C * logits, what  # the (chunk x V_local) buffers grow with the chunk
        assert more_tokens - small < 2 * N * 8 * (H + 16), what  # more tokens: only O(tokens) more
    print(what) if os.environ.get("KDFAST_TEST_VERBOSE") else None
    return 1


def _check_dtensor(mesh, mesh_dim, seed, V):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    placements = [Replicate()] * mesh.ndim
    placements[mesh_dim] = Shard(2)  # the vocabulary dim of (2, 3, V)
    s, t, mask, _ = _inputs(seed, V)
    n = 0
    # one and two round trips, with and without a mask (the losses themselves: _check_losses)
    for name, kw, m in (("kd_loss", {}, None), ("generalized_jsd", {"beta": 0.4}, mask), ("tv_distance", {}, None),
                        ("skew_kl_div", {"alpha": 0.2, "reverse": True}, mask)):
        want, gs, gt = _run(getattr(reference, name), s, t, dict(kw, reduction="mean", mask=m), None)
        ds = distribute_tensor(s, mesh, placements).requires_grad_()
        dt = distribute_tensor(t, mesh, placements).requires_grad_()
        out = getattr(kdfast, name)(ds, dt, reduction="mean", mask=m, **kw)
        assert not isinstance(out, DTensor), "the loss comes back as a plain full value"
        out.backward()
        what = f"DTensor {name} {kw} mask={m is not None}"
        _close(out, want, what, 1e-10, 1e-12)
        for g, ref in ((ds.grad, gs), (dt.grad, gt)):
            assert isinstance(g, DTensor) and tuple(g.placements) == tuple(placements), what
            _close(g.full_tensor(), ref, what + " grad", 1e-10, 1e-12)
        n += 1
    # a DTensor sharded on a row dim is not a vocabulary split: refused, naming the argument
    ds = distribute_tensor(s, mesh, [Shard(0) if i == mesh_dim else Replicate() for i in range(mesh.ndim)])
    try:
        kdfast.kd_loss(ds, distribute_tensor(t, mesh, ds.placements))
    except ValueError as e:
        assert "student_logits" in str(e), e
    else:
        raise AssertionError("a row-sharded DTensor was accepted")
    return n


def _check_ddp(seed):
    """2-rank DDP of a small student distilled from a fixed teacher equals the single-process run
    on the same global batch, step for step (float64)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(seed)
    H, V, B, steps = 6, 9, 8, 3
    teacher = torch.nn.Linear(H, V).double()
    student = torch.nn.Sequential(torch.nn.Linear(H, 8), torch.nn.Tanh(), torch.nn.Linear(8, V)).double()
    single = torch.nn.Sequential(torch.nn.Linear(H, 8), torch.nn.Tanh(), torch.nn.Linear(8, V)).double()
    single.load_state_dict(student.state_dict())
    ddp = DDP(student)
    opt_d = torch.optim.SGD(ddp.parameters(), lr=0.5)
    opt_s = torch.optim.SGD(single.parameters(), lr=0.5)
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(steps):
        x = torch.randn(B, H, dtype=torch.float64)
        with torch.no_grad():
            zt = teacher(x)
        part = slice(rank * B // world, (rank + 1) * B // world)
        for opt, model, xb, tb in ((opt_d, ddp, x[part], zt[part]), (opt_s, single, x, zt)):
            opt.zero_grad()
            z = model(xb)
            loss = kdfast.kd_loss(z, tb, temperature=2.0) + 0.5 * kdfast.generalized_jsd(z, tb, beta=0.3)
            loss.backward()
            opt.step()
        for (name, p), q in zip(ddp.module.named_parameters(), single.parameters()):
            _close(p.detach(), q.detach(), f"DDP step {step} {name}", 1e-12, 1e-13)
    return steps


def _mesh(*shape):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", shape)


def _tp(world):
    """This rank's tensor-parallel group: the default group, or at world size 4 one of two groups of
    2 (TP inside DP; every rank creates both, as new_group requires)."""
    if world != 4:
        return None
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    return groups[dist.get_rank() // 2]


def _data(g):
    """A seed per TP group: the groups of world size 4 each have their own data."""
    return dist.get_rank() // dist.get_world_size(g) if g is not None else 0


F64, F32 = torch.float64, torch.float32
# world size -> (check, function of the TP group returning its number of cases), run in this order
# by every rank of one process group per world size
GLOO_CHECKS = {
    2: [("losses", lambda g: _check_losses(g, 1, 11, F64) + _check_losses(g, 1, 2, F64)),  # uneven; 1 per rank
        ("losses_masked_vocab", lambda g: _check_losses(g, 2, 13, F64, neg_inf=True)),
        ("losses_fp32", lambda g: _check_losses(g, 3, 50, F32, rtol=2e-5, atol=2e-6)),
        ("fused_head", lambda g: _check_fused_head(g, 6, 10)),
        ("fused_head_memory", _check_fused_head_memory),
        ("dtensor", lambda g: _check_dtensor(_mesh(2), 0, 5, 11)),
        ("ddp", lambda g: _check_ddp(7))],
    3: [("losses", lambda g: _check_losses(g, 1, 11, F64)),  # uneven slices
        ("losses_masked_vocab", lambda g: _check_losses(g, 2, 13, F64, neg_inf=True)),
        ("losses_empty_slice", lambda g: _check_losses(g, 4, 2, F64)),  # V = 2 over 3 ranks
        ("fused_head", lambda g: _check_fused_head(g, 6, 10)),
        ("fused_head_empty_slice", lambda g: _check_fused_head(g, 8, 2)),
        ("dtensor", lambda g: _check_dtensor(_mesh(3), 0, 5, 11))],
    4: [("losses_tp_groups", lambda g: _check_losses(g, 100 + _data(g), 7, F64)),
        ("fused_head_tp_groups", lambda g: _check_fused_head(g, 200 + _data(g), 9)),
        ("dtensor_2d_mesh", lambda g: _check_dtensor(_mesh(2, 2), 1, 7, 9))],
}
NCCL_CHECKS = [  # the lent GPU machine (bench/gpu_check.sh): the PyTorch passes on CUDA
    ("losses", lambda g: _check_losses(g, 1, 1000, F64, device=f"cuda:{dist.get_rank()}")),
    ("losses_masked_vocab", lambda g: _check_losses(g, 2, 13, F64, neg_inf=True, device=f"cuda:{dist.get_rank()}"))]


def _worker(rank, world, init_file, queue, backend="gloo"):
    """Runs the checks of its world size in order, reporting each (world, rank, check, error, cases);
    stops at the first failure (the others would wait on its collectives), then ends with "done"."""
    check = "init_process_group"
    try:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        group = _tp(world) if backend == "gloo" else None
        for check, fn in (GLOO_CHECKS[world] if backend == "gloo" else NCCL_CHECKS):
            queue.put((world, rank, check, None, fn(group)))
        check = "barrier"
        dist.barrier()
        queue.put((world, rank, "done", None, 1))
    except BaseException:  # report, then let the others finish or fail
        import traceback
        queue.put((world, rank, check, traceback.format_exc(), 0))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context(backend):
    """A fork server that has imported torch, kdfast and this module once: each rank is a fork of
    it instead of a fresh interpreter (process start-up dominated these tests). NCCL: spawn, as
    importing this module asks CUDA for its devices, after which a fork may not use CUDA."""
    if backend == "nccl":
        return mp.get_context("spawn")
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:  # no fork server on this platform
        return mp.get_context("spawn")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.tensor",
                                "torch.nn.parallel", "torch._dynamo", "kdfast", "kdfast.distributed", __name__])
    return ctx


def _run_groups(worlds, backend, timeout=240):
    """One process group per world size, all at once: {world: {check: [(rank, error, cases)]}};
    a rank that stopped early reports its error under the check it was in."""
    ctx = _context(backend)
    queue = ctx.Queue()
    results = {w: {} for w in worlds}
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_worker, args=(r, w, os.path.join(d, f"init{w}"), queue, backend))
                 for w in worlds for r in range(w)]
        for p in procs:
            p.start()
        pending = {(w, r) for w in worlds for r in range(w)}
        deadline = time.monotonic() + timeout
        try:
            while pending and time.monotonic() < deadline:
                try:
                    world, rank, check, error, n = queue.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue_module.Empty:
                    break
                results[world].setdefault(check, []).append((rank, error, n))
                if error is not None:  # its group cannot finish: the others wait on this rank
                    pending -= {(world, r) for r in range(world)}
                elif check == "done":
                    pending.discard((world, rank))
        finally:
            for p in procs:
                p.join(timeout=0 if pending else 30)
                if p.is_alive():
                    p.kill()
                    p.join()
    return results


def _assert_check(results, world, check):
    got = results[world].get(check, [])
    errors = [e for entries in results[world].values() for _, e, _ in entries if e]  # what stopped the group
    assert not any(e for _, e, _ in got), [e for _, e, _ in got if e][0]
    ranks = sorted(r for r, _, _ in got)
    assert ranks == list(range(world)), (f"world {world} {check}: ran on ranks {ranks} only; "
                                         f"{errors[0] if errors else 'timed out or died'}")
    assert all(n > 0 for _, _, n in got), got


def _launch(tmp, name, cmd, extra_env=None):
    """A subprocess of the repository's Python, its output in files (not pipes: nobody reads them
    while it runs)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {}))
    out, err = open(tmp / f"{name}.out", "w+"), open(tmp / f"{name}.err", "w+")
    return subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=out, stderr=err, text=True), out, err


def _finish(launched, timeout=240):
    """(returncode, stdout, stderr) of a _launch."""
    proc, out, err = launched
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out.seek(0)
    err.seek(0)
    return proc.returncode, out.read(), err.read()


@pytest.fixture(scope="module")
def started(request, tmp_path_factory):
    """What the selected tests of this module wait on, started at once so that their process
    start-ups (which dominate them) overlap: the torchrun example and the distributed bench's quick
    run as subprocesses, and meanwhile the gloo process groups of world sizes 2, 3 and 4 here."""
    wanted = {item.originalname for item in request.session.items if item.module is request.module}
    tmp = tmp_path_factory.mktemp("distributed")
    runs = {}
    if "test_torchrun_example" in wanted:
        runs["torchrun"] = _launch(tmp, "torchrun", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                                     "2", os.path.join(REPO, "examples", "tp_distill.py"), "--steps",
                                                     "3"], {"OMP_NUM_THREADS": "1"})
    if "test_bench_distributed_quick" in wanted:
        runs["bench_json"] = tmp / "bench.json"
        runs["bench"] = _launch(tmp, "bench", ["-m", "bench", "--only", "distributed", "--quick", "--json",
                                               str(runs["bench_json"])])
    try:
        if "test_vocab_parallel_matches_single_process" in wanted:
            runs["gloo"] = _run_groups(sorted(GLOO_CHECKS), "gloo")
        yield runs
    finally:
        for name in ("torchrun", "bench"):
            if name in runs and runs[name][0].poll() is None:
                runs[name][0].kill()
                runs[name][0].wait()


@pytest.mark.parametrize("world,check", [(w, c) for w, checks in GLOO_CHECKS.items() for c, _ in checks])
def test_vocab_parallel_matches_single_process(started, world, check):
    """One row of the table the process groups of world sizes 2, 3 and 4 (two TP groups of 2) fill
    (they run at once, in the module's fixture): every rank passed this check."""
    gloo_runs = started["gloo"]
    _assert_check(gloo_runs, world, check)
    if check == GLOO_CHECKS[world][-1][0]:
        _assert_check(gloo_runs, world, "done")


@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs CUDA and NCCL")
def test_vocab_parallel_nccl():
    """NCCL on the machine's GPUs (world size 1 on one GPU): every loss against the reference."""
    world = torch.cuda.device_count()
    results = _run_groups([world], "nccl")
    for check, _ in NCCL_CHECKS + [("done", None)]:
        _assert_check(results, world, check)


def test_not_initialised_is_an_error():
    if dist.is_initialized():
        pytest.skip("a process group is up in this process")
    s = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="init_process_group"):
        kdd.kd_loss(s, s)


def test_torchrun_example(started):
    """torchrun --nproc-per-node 2 examples/tp_distill.py --steps 3 (started by the fixture)."""
    code, out, err = _finish(started["torchrun"])
    assert code == 0, out + err
    assert "step 3" in out and "matches single-process" in out, out


# ---------------------------------------------------------------- the per-shard ops (one process)

needs_ops = pytest.mark.skipif(not hasattr(torch.ops.kdfast, "softmax_kl_shard_stats") or not kdfast.native_available(),
                               reason="the compiled extension is not loaded")


def _slice_inputs(dtype, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(6, V, generator=g, dtype=torch.float64) * 3)
    t = (torch.randn(6, V, generator=g, dtype=torch.float64) * 3)
    if V:
        s[1] = -math.inf  # a slice row without student mass
        t[2] = -math.inf  # nor teacher mass
        s[3, : V // 2] = -math.inf
        t[4, V // 3:] = -math.inf
        s[5], t[5] = s[5] + 40, t[5] - 25  # far apart
    return s.to(dtype), t.to(dtype)


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [0, 1, 7, 100, 3000])
def test_shard_ops_match_pytorch_passes(dtype, V, monkeypatch):
    """The fused per-shard passes against the plain-PyTorch ones (the fallback), float64 tightly."""
    s, t = _slice_inputs(dtype, V)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = dict(rtol=1e-11, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    inv_t = 1 / 1.7

    def both(fn, *args):
        got = fn(*args)
        monkeypatch.setattr(kdd, "_use_ops", lambda x: False)
        want = fn(*args)
        monkeypatch.undo()
        return got, want

    for with_a in (False, True):
        got, want = both(kdd._shard_stats, s, t, inv_t, with_a, acc)
        assert got.dtype == acc and got.shape == want.shape
        torch.testing.assert_close(got, want, **tol, equal_nan=True)
    # a global state as the merge gives it (here: this slice alone, the rows with mass on both sides)
    live = torch.tensor([0, 3, 4, 5]) if V > 1 else torch.tensor([0, 5])
    s, t = s[live].contiguous(), t[live].contiguous()
    state = kdd._merge_stats(kdd._shard_stats(s, t, inv_t, True, acc)[None], inv_t) if V else None
    coef = torch.linspace(0.5, 2.0, s.shape[0], dtype=acc)
    for div, mix in (("kl", 0.0), ("jsd", 0.3), ("skew_kl", 0.2), ("skew_kl", 1.0), ("tvd", 0.0)):
        if not V:
            continue
        st = state if div == "kl" else state[:4].contiguous()
        sums = None
        if div != "kl":
            sums, want_sums = both(kdd._shard_term_sums, s, t, inv_t, st, div, mix, acc)
            torch.testing.assert_close(sums, want_sums, **tol, equal_nan=True)
        (gs, gt), (ws, wt) = both(kdd._shard_grads, s, t, inv_t, st, sums, coef, div, mix, True, True, acc)
        gtol = tol if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(gs, ws, **gtol, equal_nan=True, msg=f"{div} grad student")
        torch.testing.assert_close(gt, wt, **gtol, equal_nan=True, msg=f"{div} grad teacher")


@needs_ops
def test_shard_ops_bad_arguments_name_them():
    s = torch.randn(3, 5)
    st = torch.ops.kdfast.softmax_kl_shard_stats(s, s, 1.0, True)
    with pytest.raises(RuntimeError, match="softmax_kl_shard_sums: divergence"):
        torch.ops.kdfast.softmax_kl_shard_sums(s, s, 1.0, 1, 0.0, st[:4].contiguous())
    with pytest.raises(RuntimeError, match="softmax_kl_shard_sums: state"):
        torch.ops.kdfast.softmax_kl_shard_sums(s, s, 1.0, 2, 0.5, st[:, :2].contiguous())
    with pytest.raises(RuntimeError, match="softmax_kl_shard_grads: coef"):
        torch.ops.kdfast.softmax_kl_shard_grads(s, s, 1.0, 0, 0.0, st, torch.empty(0), torch.ones(2), True, False)
    with pytest.raises(RuntimeError, match="inv_temperature"):
        torch.ops.kdfast.softmax_kl_shard_stats(s, s, 0.0, False)
    with pytest.raises(RuntimeError, match="differ in shape"):
        torch.ops.kdfast.softmax_kl_shard_stats(s, s[:, :4], 1.0, False)


@needs_ops
def test_shard_ops_opcheck():
    s, t = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    st = torch.ops.kdfast.softmax_kl_shard_stats(s, t, 0.5, True)
    state = kdd._merge_stats(st[None], 0.5)
    sums = torch.ops.kdfast.softmax_kl_shard_sums(s, t, 0.5, 2, 0.4, state[:4].contiguous())
    coef = torch.ones(4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.kdfast.softmax_kl_shard_stats, (s, t, 0.5, True))
    torch.library.opcheck(torch.ops.kdfast.softmax_kl_shard_sums, (s, t, 0.5, 2, 0.4, state[:4].contiguous()))
    torch.library.opcheck(torch.ops.kdfast.softmax_kl_shard_grads, (s, t, 0.5, 2, 0.4, state[:4].contiguous(), sums,
                                                                    coef, True, True))


def test_bench_distributed_quick(started):
    """`python -m bench --only distributed --quick` (started by the fixture) runs its 2 gloo ranks end
    to end: every method ran, the three formulations agree on the loss, and kdfast moves O(rows)
    bytes; the fused head's cases ran."""
    code, out, err = _finish(started["bench"])
    assert code == 0, out[-3000:] + err[-3000:]
    import json
    doc = json.loads(started["bench_json"].read_text())
    res, rows = doc["results"], doc["rows"]
    for loss in ("kl", "jsd"):
        base = res[f"{loss}/kdfast"]
        for method in ("modelopt", "allgather"):
            assert abs(res[f"{loss}/{method}"]["loss"] - base["loss"]) <= 1e-4 * abs(base["loss"]), (loss, method)
        assert base["bytes_per_rank"] <= 8 * 4 * rows  # a few fp32 numbers per row
        assert res[f"{loss}/allgather"]["bytes_per_rank"] >= 2 * 4 * rows * doc["vocab"] // 2
    for loss in ("fused-kl", "fused-jsd"):
        assert res[f"{loss}/kdfast"]["loss"] > 0, loss
