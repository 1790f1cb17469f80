"""Response losses: Hinton's KD loss, T^2 * KL(softmax(t/T) || softmax(s/T)), forward+backward of
the student logits (the teacher is frozen, as in distillation).

Contenders (every one computes the same number; the harness checks it against kdfast's):
  kdfast         kdfast.kd_loss(s, t, temperature=T)
  eager          F.kl_div(F.log_softmax(s/T,-1), F.log_softmax(t/T,-1), reduction="batchmean",
                 log_target=True) * T*T   -- what people write today
  torch.compile  the same eager function, compiled once per case
  liger          (CUDA, when liger_kernel imports) LigerKLDIVLoss(reduction="batchmean",
                 log_target=True) fed torch's log_softmax(s/T) and log_softmax(t/T), times T^2
                 (Liger's KL takes log-probabilities, so the softmaxes stay in PyTorch)
  torchdistill   (when installed) torchdistill's KDLoss with alpha=0 (soft loss only), times T^2

Cases: the two from the foundation issue's performance bars (2048x32000 fp32; 256x128256 bf16, an
LLM vocabulary), two classification heads (256x1000, 128x100 fp32), 2048x32000 weighted by
alpha = 0.5 as in `ce + alpha * kd` (every contender times alpha), a vocabulary sweep
V = 4096..131072 for the plot (256 rows on CPU, 4096 on CUDA), and on CUDA the LLM-scale
8192x131072 (--full: 16384x131072).
Gelem/s counts rows*V.
"""
import dataclasses

import torch
import torch.nn.functional as F

from bench.harness import DTYPES, Case, Contender, compile_fn, generator, has_kernel

FAMILY = "kl"
T = 2.0


def eager_kd(s, t, T=T):
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean",
                    log_target=True) * T * T


def _case(settings, device, rows, V, dtype, series=None, alpha=1.0):
    name = f"{rows}x{V} {dtype}" + (f" alpha={alpha:g}" if alpha != 1.0 else "")
    return Case(FAMILY, name, device, {"rows": rows, "V": V, "dtype": dtype, "T": T, "alpha": alpha},
                elements=rows * V, elements_unit="rows*V logits", series=series,
                x=V if series else None, cost_exponent=1.0, headline=series is None)


def cases(settings, device):
    cuda = device.startswith("cuda")
    if settings.mode == "quick":
        fixed, sweep_rows, sweep = [(64, 1000, "fp32"), (32, 4096, "bf16")], 32, [256, 1024, 4096]
    else:
        # an LLM-sized pair, then image classification (ImageNet, CIFAR-100), where a step is
        # microseconds and per-call overhead counts
        fixed = [(2048, 32000, "fp32"), (256, 128256, "bf16"), (256, 1000, "fp32"), (128, 100, "fp32")]
        if cuda:
            fixed += [(8192, 131072, "bf16"), (8192, 131072, "fp32")]
            if settings.mode == "full":
                fixed += [(16384, 131072, "bf16"), (16384, 131072, "fp32")]
        sweep_rows = 4096 if cuda else 256
        sweep = [4096, 16384, 32768, 65536, 131072]
    out = [_case(settings, device, r, V, dt) for r, V, dt in fixed]
    if settings.mode != "quick":  # the KD term as trained: alpha * kd inside ce + alpha * kd
        out.append(_case(settings, device, 2048, 32000, "fp32", alpha=0.5))
    out += [_case(settings, device, sweep_rows, V, "fp32", series="vocab") for V in sweep]
    return out


def make_inputs(case):
    p, dev = case.params, case.device
    g = generator(dev)
    dtype = DTYPES[p["dtype"]]
    s = (2 * torch.randn(p["rows"], p["V"], device=dev, generator=g)).to(dtype).requires_grad_(True)
    t = (2 * torch.randn(p["rows"], p["V"], device=dev, generator=g)).to(dtype)
    return s, t


def contenders(case, settings):
    import kdfast
    p = case.params
    T_ = p["T"]
    one_input = p["rows"] * p["V"] * DTYPES[p["dtype"]].itemsize
    native = has_kernel("kdfast::softmax_kl", case.device)
    eager = lambda s, t: eager_kd(s, t, T_)  # noqa: E731
    out = [
        Contender("kdfast", lambda s, t: kdfast.kd_loss(s, t, temperature=T_), is_kdfast=True,
                  native=native, mem_estimate=(1.3 if native else 7) * one_input),
        Contender("eager", eager, mem_estimate=7 * one_input),
    ]
    if case.with_compile:
        out.append(Contender("torch.compile", compile_fn(eager_kd), compiled=True,
                             mem_estimate=3 * one_input))
    if case.device.startswith("cuda"):
        out.append(_liger(T_, one_input))
    td = _torchdistill(T_, one_input)
    if td is not None:
        out.append(td)
    alpha = p.get("alpha", 1.0)
    if alpha != 1.0:
        out = [c if c.fn is None else dataclasses.replace(c, fn=_weighted(c.fn, alpha)) for c in out]
    return out


def _weighted(fn, alpha):
    return lambda s, t: alpha * fn(s, t)


def _liger(T_, one_input):
    try:
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    except Exception:
        try:  # the op itself, where the transformers integration will not import
            from liger_kernel.ops.kl_div import LigerKLDivLossFunction

            def kl(y_pred, y_true):
                return LigerKLDivLossFunction.apply(y_pred, y_true, "batchmean", True)
        except Exception as e:  # not installed, or no triton
            return Contender("liger", None, skip=f"liger_kernel not importable: {type(e).__name__}")

    def fn(s, t):
        return kl(F.log_softmax(s / T_, -1), F.log_softmax(t / T_, -1)) * T_ * T_
    return Contender("liger", fn, mem_estimate=4 * one_input)


def _torchdistill(T_, one_input):
    try:
        from torchdistill.losses.mid_level import KDLoss
    except Exception:
        return None  # an optional contender: absent unless installed
    loss = KDLoss("s", "output", "t", "output", temperature=T_, alpha=0.0, reduction="batchmean")

    def fn(s, t):
        return loss({"s": {"output": s}}, {"t": {"output": t}}) * T_ * T_
    return Contender("torchdistill KDLoss", fn, mem_estimate=7 * one_input)
