"""README's API table states the real signatures: every `name(args)` in it has the parameter names,
order, kinds (positional or keyword-only) and defaults of the function or module constructor it
names, so that a call written from the README does what it says."""
import ast
import os
import inspect
import re
from pathlib import Path

import pytest

import kdfast

README = Path(__file__).resolve().parent.parent / "README.md"


def _api_signatures():
    text = README.read_text()
    table = text[text.index("## API"):]
    table = table[:table.index("\n\n", table.index("| function |"))]
    found = []
    for line in table.splitlines():
        for span in re.findall(r"`([^`]+)`", line):
            m = re.fullmatch(r"(\w+)\((.*)\)", span)
            if m:
                found.append((m.group(1), m.group(2)))
    return found


SIGNATURES = _api_signatures()


def _documented(args):
    """[(name, kind, default)] of a README argument list, read as Python."""
    fn = ast.parse(f"def f({args}): pass").body[0].args
    out = []
    positional = fn.posonlyargs + fn.args
    defaults = [None] * (len(positional) - len(fn.defaults)) + fn.defaults
    for a, d in zip(positional, defaults):
        out.append((a.arg, "positional", inspect.Parameter.empty if d is None else ast.literal_eval(d)))
    for a, d in zip(fn.kwonlyargs, fn.kw_defaults):
        out.append((a.arg, "keyword", inspect.Parameter.empty if d is None else ast.literal_eval(d)))
    return out


def _actual(name):
    obj = getattr(kdfast, name, None) or getattr(kdfast.nn, name)
    params = list(inspect.signature(obj.__init__ if inspect.isclass(obj) else obj).parameters.values())
    if inspect.isclass(obj):
        params = params[1:]  # self
    kinds = {inspect.Parameter.KEYWORD_ONLY: "keyword"}
    return [(p.name, kinds.get(p.kind, "positional"), p.default) for p in params]


def test_table_lists_every_loss_and_module():
    names = {n for n, _ in SIGNATURES}
    assert set(kdfast.functional.__all__) <= names
    assert set(kdfast.nn.__all__) <= names


@pytest.mark.parametrize("name,args", SIGNATURES, ids=[n for n, _ in SIGNATURES])
def test_signature_matches_code(name, args):
    assert _documented(args) == _actual(name)


def test_no_merge_conflict_markers():
    """No tracked text file holds the markers a failed merge leaves (README once did)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    bad = []
    for f in files:
        try:
            with open(os.path.join(root, f), encoding="utf-8") as fh:
                for i, line in enumerate(fh, 1):
                    if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line.rstrip("\n") == "=======":
                        bad.append(f"{f}:{i}")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
    assert not bad, bad
