"""The upstream-factor prediction (kdfast/_grad_scale_prediction.py): its logic on its own (no
kernels), the switch that turns it off (kdfast.set_grad_scale_prediction, KDFAST_PREDICT_GRAD_SCALE),
and that switching it off changes no bit of any result while the prediction is never used."""
import json
import math

import pytest
import torch

import kdfast
from kdfast._grad_scale_prediction import MAX_FACTOR, MIN_FACTOR, PREDICTOR, UpstreamFactorPredictor, uniform_factor

from conftest import FusedOpCalls, needs_native, run_python, same_bits

# ----------------------------------------------------------------------------- the logic, no kernels


def test_predicts_a_factor_once_it_repeats():
    p = UpstreamFactorPredictor()
    assert p.predict("k") is None  # nothing observed
    p.observe("k", 0.3)
    assert p.predict("k") is None  # seen once
    p.observe("k", 0.3)
    assert p.predict("k") == 0.3
    p.observe("k", 0.3)
    assert p.predict("k") == 0.3  # still repeating
    p.observe("k", 0.7)
    assert p.predict("k") is None  # changed: not repeated yet
    p.observe("k", 0.7)
    assert p.predict("k") == 0.7


def test_keys_are_independent():
    p = UpstreamFactorPredictor()
    for _ in range(2):
        p.observe("a", 2.0)
        p.observe("b", -0.5)
    p.observe("c", 3.0)
    assert (p.predict("a"), p.predict("b"), p.predict("c")) == (2.0, -0.5, None)
    p.observe("a", 4.0)
    assert (p.predict("a"), p.predict("b")) == (None, -0.5)


def test_non_uniform_upstream_forgets_the_key():
    p = UpstreamFactorPredictor()
    p.observe("k", 0.3)
    p.observe("k", 0.3)
    p.observe("k", None)
    assert p.predict("k") is None and len(p) == 0
    p.observe("k", 0.3)  # one observation after forgetting is not a repeat
    assert p.predict("k") is None


@pytest.mark.parametrize("factor", [1.0, 0.0, -0.0, math.inf, -math.inf, math.nan, MIN_FACTOR / 2, MAX_FACTOR * 2,
                                    -MAX_FACTOR * 2])
def test_factors_not_predicted(factor):
    """1 is the factor computed anyway; 0 would make the op skip the rows; non-finite and far-off
    factors could round differently from a rescale after the op."""
    p = UpstreamFactorPredictor()
    for _ in range(3):
        p.observe("k", factor)
    assert p.predict("k") is None


@pytest.mark.parametrize("factor", [MIN_FACTOR, -MIN_FACTOR, MAX_FACTOR, -MAX_FACTOR, -1.0, 16.0, 1e-3])
def test_factors_predicted(factor):
    p = UpstreamFactorPredictor()
    p.observe("k", factor)
    p.observe("k", factor)
    assert p.predict("k") == factor


def test_disabled_predicts_nothing_and_records_nothing():
    p = UpstreamFactorPredictor(enabled=False)
    for _ in range(3):
        p.observe("k", 0.3)
    assert p.predict("k") is None and len(p) == 0
    p.enabled = True
    p.observe("k", 0.3)
    assert p.predict("k") is None  # nothing was kept while disabled
    p.observe("k", 0.3)
    assert p.predict("k") == 0.3
    p.clear()
    assert p.predict("k") is None and len(p) == 0


def test_uniform_factor():
    assert uniform_factor(torch.tensor(0.25).expand(7)) == 0.25  # backward of alpha * loss.sum()
    assert uniform_factor(torch.tensor([-2.0])) == -2.0
    assert uniform_factor(torch.full((3,), 0.25)) is None  # materialised: not read
    assert uniform_factor(torch.tensor([0.5, 2.0])) is None
    assert uniform_factor(torch.empty(0)) is None


def test_switch():
    assert kdfast.grad_scale_prediction_enabled() is True  # the default
    PREDICTOR.observe("k", 0.3)
    kdfast.set_grad_scale_prediction(False)
    assert kdfast.grad_scale_prediction_enabled() is False and PREDICTOR.enabled is False and len(PREDICTOR) == 0
    kdfast.set_grad_scale_prediction(True)
    assert kdfast.grad_scale_prediction_enabled() is True
    with pytest.raises(TypeError, match="enabled"):
        kdfast.set_grad_scale_prediction("off")


_ENV_SNIPPET = "import json, kdfast; print(json.dumps(kdfast.grad_scale_prediction_enabled()))"


@pytest.mark.parametrize("value,want", [("0", False), ("1", True), ("maybe", "ValueError")])
def test_env(value, want):
    proc = run_python(_ENV_SNIPPET, env={"KDFAST_PREDICT_GRAD_SCALE": value})
    if want == "ValueError":
        assert proc.returncode != 0 and "ValueError" in proc.stderr and "KDFAST_PREDICT_GRAD_SCALE" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.strip().splitlines()[-1]) is want


# ----------------------------------------------------------------------------- on the fused losses


class _OpArgs(FusedOpCalls):
    """Also records the positional arguments of every fused row op (softmax_kl, feature_match)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "kdfast" and func._opname in ("softmax_kl", "feature_match"):
            self.calls.append((func._opname, len(args) + len(kwargs or {})))
        return super().__torch_dispatch__(func, types, args, kwargs)


def _steps(fn, s0, t0, plan):
    """Runs `factor * fn(s, t)` forward and backward for each factor of plan; returns the losses
    and gradients of every step, and the fused-op calls."""
    out = []
    with _OpArgs() as calls:
        for factor in plan:
            s = s0.clone().requires_grad_()
            loss = fn(s, t0)
            (factor * loss).backward()
            out += [loss.detach(), s.grad]
    return out, calls


LOSSES = {
    "kd_loss": lambda s, t: kdfast.kd_loss(s, t, temperature=2.0),
    "kd_loss_none": lambda s, t: kdfast.kd_loss(s, t, reduction="none").sum(),
    "logit_mse": kdfast.logit_mse,
    "cosine_loss": kdfast.cosine_loss,
}
# repeated factors (predicted from the third step), a change (a wrong guess), 1, 0, repeats again
PLAN = [0.3, 0.3, 0.3, 0.3, 2.0, 2.0, 2.0, 1.0, 0.0, -0.5, -0.5, -0.5]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_off_gives_the_same_bits_and_never_predicts(name, dtype):
    kdfast.set_backend("native")
    gen = torch.Generator().manual_seed(3)
    s0, t0 = torch.randn(6, 300, generator=gen).to(dtype), torch.randn(6, 300, generator=gen).to(dtype)
    on, on_calls = _steps(LOSSES[name], s0, t0, PLAN)
    # with it on, steps were predicted: some forward got a grad_scale (its 7th argument for
    # softmax_kl, 8th for feature_match) and the wrong guess was recomputed
    n_plain = {"softmax_kl": 8, "feature_match": 7}
    assert any(n > n_plain[op] for op, n in on_calls.calls), on_calls.calls
    assert len(on_calls.calls) > len(PLAN)
    kdfast.set_grad_scale_prediction(False)
    off, off_calls = _steps(LOSSES[name], s0, t0, PLAN)
    # with it off: one forward per step, none with a grad_scale, nothing remembered
    assert len(off_calls.calls) == len(PLAN) and all(n == n_plain[op] for op, n in off_calls.calls), off_calls.calls
    assert len(PREDICTOR) == 0
    for i, (a, b) in enumerate(zip(on, off)):
        assert same_bits(a, b), (name, i)
