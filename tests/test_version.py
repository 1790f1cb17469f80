"""One version string, in kdfast/_version.py: the package metadata (pyproject.toml's dynamic
version), setup.py's KDFAST_VERSION (the compiled extension's build info), kdfast.__version__ and
build_info() all take it from there."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kdfast
from kdfast import _ops

from conftest import needs_native

ROOT = Path(__file__).resolve().parent.parent


def test_python_versions_agree():
    from kdfast._version import __version__

    assert kdfast.__version__ == __version__
    assert kdfast.build_info()["version"] == __version__


@needs_native
def test_extension_was_built_from_this_version():
    # KDFAST_VERSION is compiled in; a mismatch means a stale build (rebuild after a version change).
    assert _ops.native_build_info()["version"] == kdfast.__version__


def _run(cmd, cwd):
    env = dict(os.environ, KDFAST_BUILD_EXT="0")
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_build_reads_the_version_file(tmp_path):
    """Change kdfast/_version.py alone in a copy of the build files: the metadata version and the
    C++ define follow, and reading them imports neither kdfast nor torch."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    pkg = tmp_path / "kdfast"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('raise ImportError("the build must not import kdfast")\n')
    text = (ROOT / "kdfast" / "_version.py").read_text()
    new = text.replace(f'"{kdfast.__version__}"', '"9.8.7"')
    assert new != text
    (pkg / "_version.py").write_text(new)

    assert _run([sys.executable, "setup.py", "--version"], tmp_path) == "9.8.7"
    # setup.py's VERSION is what it passes to the C++ build as KDFAST_VERSION
    show = ("import runpy, setuptools; setuptools.setup = lambda **kw: None; "
            "print(runpy.run_path('setup.py')['VERSION'])")
    assert _run([sys.executable, "-c", show], tmp_path) == "9.8.7"
