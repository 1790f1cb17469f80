"""Top-k teachers: KL from a teacher stored as its top-K log-probabilities and ids to the student's
softmax over all of V, forward+backward of the student logits (issue 17).

Contenders (every one computes the same number; the harness checks it against kdfast's):
  kdfast         kdfast.sparse_kl_div(s, logprobs, ids)             (tail="renormalize", T = 1)
  eager          what people write today: log_softmax of the student over V, gather the K ids,
                 the teacher renormalised over its K entries, KL, batchmean (DistillKit's formula)
  torch.compile  the same eager function, compiled once per case

Cases: the issue's bar, 2048 x 32000 fp32 with K = 64, and an LLM vocabulary in bf16. Gelem/s
counts rows*V (the student's logits).
"""
import torch
import torch.nn.functional as F

from bench.harness import DTYPES, Case, Contender, compile_fn, generator, has_kernel

FAMILY = "sparse"


def eager_sparse_kl(s, logprobs, ids):
    log_q = F.log_softmax(s.float(), -1).gather(-1, ids)
    log_p = F.log_softmax(logprobs.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum() / s.shape[0]


def _case(rows, V, K, dtype, device):
    return Case(FAMILY, f"{rows}x{V} K={K} {dtype}", device, {"rows": rows, "V": V, "K": K, "dtype": dtype},
                elements=rows * V, elements_unit="rows*V student logits", headline=(rows, V) == (2048, 32000))


def cases(settings, device):
    if settings.mode == "quick":
        return [_case(64, 1000, 16, "fp32", device)]
    return [_case(2048, 32000, 64, "fp32", device), _case(256, 128256, 64, "bf16", device)]


def make_inputs(case):
    p, dev = case.params, case.device
    g = generator(dev)
    s = (2 * torch.randn(p["rows"], p["V"], device=dev, generator=g)).to(DTYPES[p["dtype"]]).requires_grad_(True)
    t = 2 * torch.randn(p["rows"], p["V"], device=dev, generator=g)
    logprobs, ids = t.log_softmax(-1).topk(p["K"], -1)  # as stored offline
    return s, logprobs, ids


def contenders(case, settings):
    import kdfast
    p = case.params
    one_input = p["rows"] * p["V"] * DTYPES[p["dtype"]].itemsize
    native = has_kernel("kdfast::sparse_kl", case.device)
    out = [
        Contender("kdfast", lambda s, lp, ids: kdfast.sparse_kl_div(s, lp, ids), is_kdfast=True, native=native,
                  mem_estimate=(1.3 if native else 6) * one_input),
        Contender("eager", eager_sparse_kl, mem_estimate=6 * one_input),
    ]
    if case.with_compile:
        out.append(Contender("torch.compile", compile_fn(eager_sparse_kl), compiled=True, mem_estimate=3 * one_input))
    return out
