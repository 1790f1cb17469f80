"""Relation losses: RKD (Park et al., CVPR 2019), distance + angle with the published weights 25 and
50, forward+backward of the student embeddings (the teacher is frozen).

Contenders:
  kdfast         kdfast.rkd_loss(s, t)   (distance_weight=25, angle_weight=50, delta=1)
  torchdistill formulation
                 torchdistill/RepDistiller RKDLoss written out below, line for line: pdist from
                 e_square + e_square - 2*prod, clamped, sqrt, zero diagonal; psi = d / mean of the
                 positive d; smooth_l1; angles from an N x N x D tensor of normalised differences and
                 an N x N x N bmm. That is O(N^2 D + N^3) memory and O(N^3 D) time.
  torch.compile  the same function, compiled once per case
  torchdistill RKDLoss   the package's own module, when torchdistill is installed

Cases: N=256 D=512 (the performance bar), N=1024 D=512 (where memory is the point), and a scaling
series N=64..1024 (--full: ..4096) at D=512 for the log-log plot; --full adds N=4096 D=128 for
kdfast alone. Contenders whose estimated memory, ~4*N^2*D*4 + N^3*4*4 bytes, is more than the
device can give are skipped with that estimate in the table; so is a step that the previous N
predicts (time ~ N^3) to be slower than the mode's cap. Gelem/s counts the N^3 angle triplets.
"""
import torch
import torch.nn.functional as F

from bench.harness import DTYPES, Case, Contender, compile_fn, generator, has_kernel

FAMILY = "relation"
DIST_W, ANGLE_W = 25.0, 50.0


def td_pdist(e, squared=False, eps=1e-12):
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def td_rkd(student, teacher, dist_factor=DIST_W, angle_factor=ANGLE_W):
    """torchdistill's RKDLoss.forward for (N, D) embeddings, reduction="mean"."""
    with torch.no_grad():
        t_d = td_pdist(teacher, squared=False)
        t_d = t_d / t_d[t_d > 0].mean()
    d = td_pdist(student, squared=False)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)

    with torch.no_grad():
        td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    loss_a = F.smooth_l1_loss(s_angle, t_angle)
    return dist_factor * loss_d + angle_factor * loss_a


def eager_bytes(N, D, itemsize=4):
    """Peak memory of the torchdistill formulation, roughly: four N x N x D tensors (differences,
    normalised, and their gradients) and four N x N x N ones."""
    return 4 * N * N * D * itemsize + 4 * N ** 3 * itemsize


def kdfast_native(device):
    import kdfast
    return (kdfast.rkd_loss is not kdfast.reference.rkd_loss
            and has_kernel("kdfast::rkd", device))


def _case(device, N, D, kdfast_only=False, series="scaling"):
    return Case(FAMILY, f"N={N} D={D}", device, {"N": N, "D": D, "dtype": "fp32",
                                                 "kdfast_only": kdfast_only},
                elements=N ** 3, elements_unit="N^3 angle triplets", series=series,
                x=N if series else None, cost_exponent=3.0,
                headline=(N, D) in ((256, 512), (1024, 512), (4096, 128)))


def cases(settings, device):
    if settings.mode == "quick":
        out = [_case(device, n, 32) for n in (16, 32, 64)]
    else:
        ns = (64, 128, 256, 512, 1024) + ((2048, 4096) if settings.mode == "full" else ())
        out = [_case(device, n, 512) for n in ns]
        if settings.mode == "full":
            out.append(_case(device, 4096, 128, kdfast_only=True, series=None))
    return out


def make_inputs(case):
    p, dev = case.params, case.device
    g = generator(dev)
    dtype = DTYPES[p["dtype"]]
    s = torch.randn(p["N"], p["D"], device=dev, generator=g, dtype=dtype).requires_grad_(True)
    t = torch.randn(p["N"], p["D"], device=dev, generator=g, dtype=dtype)
    return s, t


def contenders(case, settings):
    import kdfast
    N, D = case.params["N"], case.params["D"]
    native = kdfast_native(case.device)
    eager_est = eager_bytes(N, D)
    out = [Contender("kdfast", lambda s, t: kdfast.rkd_loss(s, t, distance_weight=DIST_W,
                                                            angle_weight=ANGLE_W),
                     is_kdfast=True, native=native,
                     mem_estimate=16 * N * N * 4 if native else eager_est)]
    if case.params["kdfast_only"]:
        return out
    out.append(Contender("torchdistill formulation", td_rkd, mem_estimate=eager_est))
    if case.with_compile:
        out.append(Contender("torch.compile", compile_fn(td_rkd), compiled=True, mem_estimate=eager_est))
    try:
        from torchdistill.losses.mid_level import RKDLoss
    except Exception:
        return out  # optional contender: absent unless installed
    module = RKDLoss("s", "t", dist_factor=DIST_W, angle_factor=ANGLE_W, reduction="mean")
    out.append(Contender("torchdistill RKDLoss",
                         lambda s, t: module({"s": {"output": s}}, {"t": {"output": t}}),
                         mem_estimate=eager_est))
    return out
