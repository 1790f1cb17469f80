"""kdfast without its compiled extension: a KDFAST_BUILD_EXT=0 install (left out on purpose) and a
broken build. Each runs in a subprocess on a copy of the package's Python files, as pip installs them."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kdfast"

SCRIPT = r"""
import json, sys, warnings
# An editable install of kdfast elsewhere (a development venv) would serve its kdfast._C to the copy:
# drop its finder, so that the copy is all there is, as in a pure-Python install.
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
import torch
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import kdfast
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    kdfast.kd_loss(x, y)  # the first loss warns ...
    kdfast.softmax_kl_div(x, y)  # ... and no later one
    kdfast.rkd_loss(torch.randn(5, 3), torch.randn(5, 3))
try:
    kdfast.set_backend("native")
    native_error = None
except RuntimeError as e:
    native_error = str(e)
print(json.dumps({
    "file": kdfast.__file__,
    "loaded": kdfast._ops.LOADED,
    "warnings": [{"category": w.category.__name__, "message": str(w.message), "filename": w.filename}
                 for w in caught],
    "native_error": native_error,
    "load_error": kdfast.build_info()["load_error"],
}))
"""


def _run_copy(tmp_path, extra_files=None):
    root = tmp_path / "site"
    pkg = root / "kdfast"
    pkg.mkdir(parents=True)
    for f in PACKAGE.glob("*.py"):  # the Python files only: no compiled extension
        shutil.copy(f, pkg / f.name)
    for name, text in (extra_files or {}).items():
        (pkg / name).write_text(text)
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    env = {k: val for k, val in os.environ.items() if not k.startswith("KDFAST_")}
    env["PYTHONPATH"] = str(root)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["file"] == str(pkg / "__init__.py")  # the copy ran, not the worktree
    assert not out["loaded"]
    return out, script


def _kdfast_warnings(out):
    return [w for w in out["warnings"] if "kdfast" in w["message"]]


def test_extension_left_out_on_purpose_says_so_once(tmp_path):
    out, script = _run_copy(tmp_path)
    ws = _kdfast_warnings(out)
    assert len(ws) == 1, ws  # once, at the first loss
    w = ws[0]
    assert w["category"] == "RuntimeWarning"
    for text in (w["message"], out["native_error"], out["load_error"]):
        assert "circular import" not in text and "partially initialized" not in text, text
    assert "installed without" in w["message"] and "KDFAST_BUILD_EXT=0" in w["message"]
    assert "reference backend" in w["message"]
    assert "pip install --no-build-isolation ." in w["message"]  # how to build it
    assert w["filename"] == str(script)  # points at the user's call, not into kdfast
    assert out["native_error"].startswith("kdfast: the compiled extension is not loaded")
    assert "installed without" in out["native_error"]


def test_broken_extension_reports_its_load_error(tmp_path):
    # A build that exists but cannot load (e.g. built against another torch) is not a pure-Python
    # install: the message carries the loader's own error.
    out, _ = _run_copy(tmp_path, {"_C.py": "raise ImportError('undefined symbol: _ZN3c10fake')\n"})
    ws = _kdfast_warnings(out)
    assert len(ws) == 1, ws
    for text in (ws[0]["message"], out["native_error"]):
        assert "failed to load (undefined symbol: _ZN3c10fake)" in text, text
        assert "installed without" not in text
    assert "Running the reference backend" in ws[0]["message"]
    assert out["load_error"] == "undefined symbol: _ZN3c10fake"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
