"""The end-to-end example trains on real data (scikit-learn's digits) at reduced size."""
import importlib.util
import pathlib


EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "distill_digits.py"


def test_distill_digits_trains():
    spec = importlib.util.spec_from_file_location("distill_digits", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--quick"])
    assert out["ce_last"] < 0.7 * out["ce_first"], out  # the distilled student's loss falls
    acc = out["accuracy"]
    assert acc["teacher"] > 0.8, acc
    assert acc["student + kdfast KD + RKD"] > 0.5, acc  # chance is 0.1
    assert out["loss_ms_kdfast"] > 0 and out["loss_ms_eager"] > 0
