"""Imported by the memory-probe fork server only (see bench.memory_probe): the per-process set-up
that every probe would otherwise repeat, done once before the server forks the probes. It starts
no threads (a fork must not inherit a thread pool): imports, and torch.compile's CPU checks, which
run short-lived subprocesses."""
import torch  # noqa: F401
import kdfast  # noqa: F401
import bench.divergence  # noqa: F401
import bench.feature  # noqa: F401
import bench.harness  # noqa: F401
import bench.kl  # noqa: F401
import bench.relation  # noqa: F401

try:
    import torch._dynamo  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401
    from torch._inductor import cpu_vec_isa

    cpu_vec_isa.pick_vec_isa()  # ~1.4 s here: compiles and loads a probe library per ISA
except Exception:  # only a speed-up; a probe does the same work itself if this fails
    pass
