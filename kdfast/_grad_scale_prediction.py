"""Prediction of the upstream factor a fused CPU loss will receive in backward.

The fused ops (torch.ops.kdfast.softmax_kl, feature_match) write the gradient in the same pass as
the loss, at a factor fixed in forward: their `grad_scale`. Backward then learns the factor the loss
really receives (the upstream gradient, e.g. the `alpha` of `ce + alpha * kd`) and, where the two
differ, makes one more pass over the buffer to rescale it (see kdfast/_fused_autograd.py). In a
training loop the factor is usually the same on every step, so once a configuration (op,
parameters, dtype) has received the same uniform factor on two steps in a row, the next forward
computes its gradient at that factor and backward has no pass left to make.

A prediction never changes a result: a wrong guess is recomputed at factor 1 before the rescale,
and the op's grad_scale rounds as that rescale would, so every step has the bits of a step taken
with no history. It only changes the time a step takes, and it makes that time depend on the calls
before it. To turn it off (every forward then computes at factor 1, and no history is kept):

    KDFAST_PREDICT_GRAD_SCALE=0        # environment, read when kdfast is imported
    kdfast.set_grad_scale_prediction(False)

This module is pure Python and needs no kernel: `UpstreamFactorPredictor` is the logic,
`PREDICTOR` the instance the fused autograd layer consults.
"""
import math
import os

ENV_VAR = "KDFAST_PREDICT_GRAD_SCALE"

# Only factors that scale a gradient harmlessly are predicted: 0 would make the op skip the rows
# (their gradient must then be recomputed anyway), and far-off powers of two could under- or
# overflow a gradient that a rescale after the op would have kept.
MIN_FACTOR, MAX_FACTOR = 2.0 ** -20, 2.0 ** 20


def uniform_factor(ratio):
    """The value of `ratio` (an upstream gradient, 1-D, one entry per row) if it is one number for every
    row by construction, i.e. a single element or an expanded scalar (stride 0, what the backward
    of a sum or of `alpha * loss` hands over); else None. A materialised tensor that happens to hold
    one value counts as non-uniform: checking it would cost a pass over it."""
    if ratio.numel() == 0 or (ratio.numel() > 1 and ratio.stride(0) != 0):
        return None
    return float(ratio[0])


class UpstreamFactorPredictor:
    """Remembers, per key, the last uniform upstream factor observed and whether the observation
    before it was the same; predicts that factor once it has repeated.

    predict(key) -> float or None: the factor to compute the next gradient at, or None for 1 (no
        prediction: nothing observed, not repeated, 1 itself, or outside [MIN_FACTOR, MAX_FACTOR]).
    observe(key, factor): record the factor a step under `key` received; None (a non-uniform
        upstream gradient) forgets the key.
    clear(): forget everything.
    enabled: when False, predict() always returns None and observe() records nothing.
    """

    def __init__(self, enabled=True):
        self._last = {}  # key -> (factor, repeated)
        self.enabled = bool(enabled)

    def predict(self, key):
        if not self.enabled:
            return None
        value, repeated = self._last.get(key, (1.0, False))
        if repeated and value != 1.0 and math.isfinite(value) and MIN_FACTOR <= abs(value) <= MAX_FACTOR:
            return value
        return None

    def observe(self, key, factor):
        if not self.enabled:
            return
        if factor is None:
            self._last.pop(key, None)
            return
        previous = self._last.get(key)
        self._last[key] = (factor, previous is not None and previous[0] == factor)

    def clear(self):
        self._last.clear()

    def __len__(self):
        return len(self._last)


def _enabled_from_env():
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on", ""):
        raise ValueError(f"{ENV_VAR} must be 0 or 1, got {value!r}")
    return value not in ("0", "false", "off")


PREDICTOR = UpstreamFactorPredictor(enabled=_enabled_from_env())


def set_grad_scale_prediction(enabled):
    """Turn the prediction of the upstream gradient factor of fused CPU losses on (the default) or
    off (KDFAST_PREDICT_GRAD_SCALE=0 sets the initial state). Results are bit-identical either
    way; off, no step's time depends on the steps before it. Either call forgets what was observed."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    PREDICTOR.clear()
    PREDICTOR.enabled = enabled


def grad_scale_prediction_enabled():
    """Whether fused CPU losses predict their upstream gradient factor (see set_grad_scale_prediction)."""
    return PREDICTOR.enabled


__all__ = ["UpstreamFactorPredictor", "PREDICTOR", "uniform_factor", "set_grad_scale_prediction",
           "grad_scale_prediction_enabled"]
