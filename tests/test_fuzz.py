"""The fuzz harness (tests/fuzz/fuzz_losses.py) as a test: a fixed seed and a small case count, with
the known defect classes (fuzz_losses.KNOWN) excused; and a check that the harness does catch a
wrong value and a wrong gradient, with a reproducer line."""
import os
import sys

import pytest
import torch

import kdfast
from conftest import needs_native

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz"))
import fuzz_losses  # noqa: E402


@needs_native
def test_fuzz_fixed_seed():
    """150 cases of seed 0 (about 15 s on two busy threads): no disagreement with float64 beyond
    dtype tolerance, no crash, no changed input, outside the classes listed in fuzz_losses.KNOWN."""
    res = fuzz_losses.fuzz(seed=0, cases=150, excuse=["all"])
    assert res["cases"] == 150
    assert set(res["per_loss"]) == set(fuzz_losses.LOSSES)  # every loss was drawn
    assert not res["failures"], fuzz_losses.summary(res)


@needs_native
@pytest.mark.parametrize("planted", ["value", "gradient"])
def test_fuzz_catches_a_planted_bug(planted, monkeypatch):
    """logit_mse 1e-3 off in its value, or in its gradient only: the harness reports failures with a
    reproducer line, also with every known class excused."""
    real = kdfast.logit_mse

    class Off(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * (1.001 if planted == "value" else 1.0)

        @staticmethod
        def backward(ctx, g):
            return g * (1.001 if planted == "gradient" else 1.0)

    monkeypatch.setattr(kdfast, "logit_mse", lambda s, t, **kw: Off.apply(real(s, t, **kw)))
    res = fuzz_losses.fuzz(seed=0, cases=30, excuse=["all"], losses=["logit_mse"])
    assert res["cases"] == 30
    assert len(res["failures"]) >= 5, fuzz_losses.summary(res)
    text = fuzz_losses.summary(res)
    assert "reproduce: python tests/fuzz/fuzz_losses.py --seed 0 --losses logit_mse --case" in text
    if planted == "gradient":
        assert any("gradient" in msg for _, _, msg, _ in res["failures"])


def test_fuzz_command_line_reruns_one_case():
    """The reproducer line works: one case by index, and an unknown class is refused."""
    if not kdfast.native_available("cpu"):
        assert fuzz_losses.main(["--cases", "1"]) == 2  # says so, compares nothing
        return
    assert fuzz_losses.main(["--seed", "0", "--case", "3"]) == 0
    with pytest.raises(ValueError, match="known-defect classes"):
        fuzz_losses.main(["--cases", "1", "--excuse-known", "no_such_class"])
