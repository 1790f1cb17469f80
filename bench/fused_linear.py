"""Fused linear-head distillation: generalized JSD (beta = 0.5) between a student's and a frozen
teacher's LM heads, from their hidden states, forward+backward of the student's hidden states and
head weight (issue 18).

Contenders:
  kdfast       kdfast.fused_linear_distill_loss(hs, Ws, ht, Wt, divergence="jsd", beta=0.5): chunks of
               tokens, ATen GEMMs, the fused divergence writing the logit gradient in forward
  eager        both logits materialised, then TRL GKDTrainer.generalized_jsd_loss's formula written
               out (log_softmax, logsumexp of the stacked mixture, two F.kl_div), per-token mean
  trl          (when trl imports) trl.kernels.chunked_divergence.ChunkedDivergenceFunction, which
               TRL's DistillationTrainer uses: 4096 x 32768 tiles, GEMMs recomputed in backward
  GEMM floor   the four products alone with torch.mm: both heads' logits, the student's logit
               gradient times its weight and its transpose times its hidden states. A lower bound,
               not a loss: its value is not compared with kdfast's.

Cases: the issue's bar, N = 2048 tokens, H = 512 (student) / 768 (teacher), V = 32000 fp32, and the
same at other token counts for the plot of memory against tokens. Gelem/s counts tokens*V.
"""
import torch
import torch.nn.functional as F

from bench.harness import DTYPES, Case, Contender, generator, has_kernel

FAMILY = "fused_linear"
BETA = 0.5


def cases(settings, device):
    if settings.mode == "quick":
        shapes, V = [(64, 32, 48)], 1000
        tokens = [32, 64]
    else:
        shapes, V = [(2048, 512, 768)], 32000
        tokens = [512, 1024, 2048] + ([4096] if settings.mode == "full" else [])
    out = []
    for N, Hs, Ht in shapes:
        for n in tokens:
            out.append(Case(FAMILY, f"N={n} H={Hs}/{Ht} V={V} fp32 jsd", device,
                            {"N": n, "Hs": Hs, "Ht": Ht, "V": V, "dtype": "fp32", "beta": BETA},
                            elements=n * V, elements_unit="tokens*V logits", series="tokens", x=n,
                            cost_exponent=1.0, headline=n == N))
    return out


def make_inputs(case):
    p, dev = case.params, case.device
    g = generator(dev)
    dt = DTYPES[p["dtype"]]

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=dev, generator=g)).to(dt)
    hs = r(p["N"], p["Hs"]).requires_grad_(True)
    Ws = r(p["V"], p["Hs"], scale=p["Hs"] ** -0.5).requires_grad_(True)
    ht = r(p["N"], p["Ht"])
    Wt = r(p["V"], p["Ht"], scale=2 * p["Ht"] ** -0.5)  # a sharper teacher
    return hs, Ws, ht, Wt


def eager_jsd(hs, Ws, ht, Wt, beta=BETA, temperature=1.0):
    """Logits, then TRL GKDTrainer.generalized_jsd_loss (0 < beta < 1, per-token mean)."""
    student_logits = hs @ Ws.t()
    with torch.no_grad():
        teacher_logits = ht @ Wt.t()
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    b = torch.tensor(beta, dtype=student_log_probs.dtype)
    mixture_log_probs = torch.logsumexp(
        torch.stack([student_log_probs + torch.log(1 - b), teacher_log_probs + torch.log(b)]), dim=0)
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    jsd = b * kl_teacher + (1 - b) * kl_student
    return jsd.sum() / jsd.size(0)


def gemm_floor(hs, Ws, ht, Wt):
    """The four products of a fused head's step, timed alone (the loss's gradient is faked by the
    logits themselves); backward touches one element."""
    with torch.no_grad():
        zs = torch.mm(hs, Ws.t())
        zt = torch.mm(ht, Wt.t())
        torch.mm(zs, Ws)
        torch.mm(zs.t(), hs)
        keep = zt[0, 0]
    return hs[0, 0] * keep.detach()


def contenders(case, settings):
    import kdfast
    p = case.params
    logits = p["N"] * p["V"] * DTYPES[p["dtype"]].itemsize
    native = has_kernel("kdfast::softmax_kl", case.device)

    def fused(hs, Ws, ht, Wt):
        return kdfast.fused_linear_distill_loss(hs, Ws, ht, Wt, divergence="jsd", beta=p["beta"])
    return [
        Contender("kdfast", fused, is_kdfast=True, native=native, mem_estimate=0.5 * logits),
        Contender("eager", eager_jsd, mem_estimate=12 * logits),
        _trl(p["beta"], logits),
        Contender("GEMM floor (4 products)", gemm_floor, floor=True, mem_estimate=2 * logits),
    ]


def _trl(beta, logits):
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    except Exception as e:  # trl (and transformers) are optional test dependencies
        return Contender("trl ChunkedDivergence", None, skip=f"trl not importable: {type(e).__name__}")

    def fn(hs, Ws, ht, Wt):
        # DistillationTrainer's call with no mask: per-token divergences, mean over tokens
        div, _ = ChunkedDivergenceFunction.apply(hs, Ws, None, ht, Wt, None, beta, 1.0, 1.0, None, 1.0, None)
        return div.sum() / div.shape[0]
    return Contender("trl ChunkedDivergence", fn, mem_estimate=3 * logits)
