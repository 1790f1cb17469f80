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
    assert res["per_loss"]["sparse_kl_div"] >= 5  # (9 of seed 0's 150: top-k teachers, both tails)
    assert not res["failures"], fuzz_losses.summary(res)


@needs_native
@pytest.mark.parametrize("loss", ["logit_mse", "sparse_kl_div"])
@pytest.mark.parametrize("planted", ["value", "gradient"])
def test_fuzz_catches_a_planted_bug(planted, loss, monkeypatch):
    """logit_mse (or sparse_kl_div) 1e-3 off in its value, or in its gradient only: the harness
    reports failures with a reproducer line, also with every known class excused."""
    real = getattr(kdfast, loss)

    class Off(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * (1.001 if planted == "value" else 1.0)

        @staticmethod
        def backward(ctx, g):
            return g * (1.001 if planted == "gradient" else 1.0)

    monkeypatch.setattr(kdfast, loss, lambda *args, **kw: Off.apply(real(*args, **kw)))
    res = fuzz_losses.fuzz(seed=0, cases=30, excuse=["all"], losses=[loss])
    assert res["cases"] == 30
    assert len(res["failures"]) >= 5, fuzz_losses.summary(res)
    text = fuzz_losses.summary(res)
    assert f"reproduce: python tests/fuzz/fuzz_losses.py --seed 0 --losses {loss} --case" in text
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


@needs_native
def test_fuzz_catches_unchecked_sparse_ids(monkeypatch):
    """sparse_kl_div that stops rejecting invalid ids (it swaps them for 0..K-1): the drawn duplicate,
    out-of-range and negative ids (cases 47 and 50 of seed 0) make the reference raise a ValueError
    that native no longer raises, and the harness reports it."""
    real = kdfast.sparse_kl_div

    def lax(s, lp, idx, **kw):
        try:
            return real(s, lp, idx, **kw)
        except ValueError:
            return real(s, lp, torch.arange(idx.shape[-1]).expand(idx.shape), **kw)

    monkeypatch.setattr(kdfast, "sparse_kl_div", lax)
    res = fuzz_losses.fuzz(seed=0, cases=51, losses=["sparse_kl_div"])
    assert [i for i, _, msg, _ in res["failures"] if "native accepted it" in msg] == [47, 50], \
        fuzz_losses.summary(res)
