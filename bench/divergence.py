"""The LLM divergences: TRL's generalized JSD (beta = 0.5) and reverse KL, forward+backward of the
student logits at T = 1 (the teacher is frozen).

Contenders (every one computes the same number; the harness checks it against kdfast's):
  kdfast             kdfast.generalized_jsd(s, t, beta=0.5) / kdfast.reverse_kl_div(s, t)
  TRL eager          (JSD) the formula of TRL's GKDTrainer.generalized_jsd_loss (trl 1.16), written
                     out here so that trl stays optional: log_softmax of both, the mixture's log as
                     a logsumexp over the stacked weighted log-probabilities, two F.kl_div(...,
                     log_target=True) per element, batchmean
  eager              (reverse KL) F.kl_div(F.log_softmax(t), F.log_softmax(s), reduction="batchmean",
                     log_target=True), the student's distribution as the target
  torch.compile      each eager formula, compiled once per case

Cases: the issue's two sizes for each divergence (2048x32000 fp32; 256x128256 bf16, an LLM
vocabulary); --quick: tiny ones. Gelem/s counts rows*V.
"""
import torch
import torch.nn.functional as F

from bench.harness import DTYPES, Case, Contender, compile_fn, has_kernel
from bench.kl import make_inputs  # noqa: F401 (this family's too: the KD cases' logits)

FAMILY = "divergence"
BETA = 0.5
DIVERGENCES = ("jsd", "reverse_kl")


def trl_jsd(s, t, beta=BETA):
    """TRL's generalized JSD at T = 1, 0 < beta < 1, reduction batchmean without labels."""
    log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
    b = torch.tensor(beta, dtype=log_q.dtype, device=log_q.device)
    log_m = torch.logsumexp(torch.stack([log_q + torch.log1p(-b), log_p + torch.log(b)]), dim=0)
    per_entry = (b * F.kl_div(log_m, log_p, reduction="none", log_target=True)
                 + (1 - b) * F.kl_div(log_m, log_q, reduction="none", log_target=True))
    return per_entry.sum() / per_entry.size(0)


def eager_reverse_kl(s, t):
    """KL(Q || P), Q = softmax(s): F.kl_div with the student's log-probabilities as the target."""
    return F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), reduction="batchmean", log_target=True)


EAGER = {"jsd": ("TRL eager", trl_jsd), "reverse_kl": ("eager", eager_reverse_kl)}


def _case(divergence, device, rows, V, dtype):
    label = f"jsd({BETA:g})" if divergence == "jsd" else divergence
    return Case(FAMILY, f"{label} {rows}x{V} {dtype}", device,
                {"divergence": divergence, "rows": rows, "V": V, "dtype": dtype, "beta": BETA},
                elements=rows * V, elements_unit="rows*V logits", cost_exponent=1.0, headline=True)


def cases(settings, device):
    sizes = [(64, 1000, "fp32"), (32, 4096, "bf16")] if settings.mode == "quick" else \
        [(2048, 32000, "fp32"), (256, 128256, "bf16")]
    return [_case(d, device, r, V, dt) for d in DIVERGENCES for r, V, dt in sizes]


def contenders(case, settings):
    import kdfast
    p = case.params
    one_input = p["rows"] * p["V"] * DTYPES[p["dtype"]].itemsize
    native = has_kernel("kdfast::softmax_kl", case.device)
    if p["divergence"] == "jsd":
        ours = lambda s, t: kdfast.generalized_jsd(s, t, beta=p["beta"])  # noqa: E731
    else:
        ours = kdfast.reverse_kl_div
    eager_name, eager = EAGER[p["divergence"]]
    # the eager JSD holds about ten (rows x V) temporaries at its peak, the reverse KL about seven
    eager_mem = (12 if p["divergence"] == "jsd" else 7) * one_input
    out = [Contender("kdfast", ours, is_kdfast=True, native=native,
                     mem_estimate=1.3 * one_input if native else eager_mem),
           Contender(eager_name, eager, mem_estimate=eager_mem)]
    if case.with_compile:
        out.append(Contender("torch.compile", compile_fn(eager), compiled=True, mem_estimate=3 * one_input))
    return out
