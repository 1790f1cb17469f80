"""Loads the compiled extension and registers, in Python, what the C++ op schemas need around them:
fake (meta) kernels for torch.compile (kdfast/_fake_kernels.py) and autograd (kdfast/_op_autograd.py
on the ops; kdfast/_fused_autograd.py around the forward-and-gradient ops). Everything here is
guarded by LOADED."""
import importlib.util
import json
import os
import warnings

import torch

# Look for the extension before importing it: `from kdfast import _C` with no _C present fails with
# Python's "cannot import name '_C' from partially initialized module 'kdfast' (most likely due to a
# circular import)", which reads like a bug when the extension was left out on purpose.
BUILT = importlib.util.find_spec("kdfast._C") is not None  # False: a KDFAST_BUILD_EXT=0 install
LOADED = False
LOAD_ERROR = ImportError("kdfast was installed without its compiled extension kdfast._C (KDFAST_BUILD_EXT=0)")
if BUILT:
    try:
        importlib.import_module("kdfast._C")  # registers the torch.ops.kdfast ops
        LOADED, LOAD_ERROR = True, None
    except ImportError as e:  # a broken build: keep the loader's own message
        LOAD_ERROR = e

_ISA_ORDER = ("avx512", "avx2", "default")
_selected_isa = None


def compiled_cpu_isas():
    """The CPU kernel builds in this install (the baseline is always there)."""
    if not LOADED:
        return []
    return [isa for isa in _ISA_ORDER[:-1] if importlib.util.find_spec(f"kdfast._cpu_{isa}")] + ["default"]


def available_cpu_isas():
    """The CPU kernel builds that this install has and this CPU can run, best first."""
    if not LOADED:
        return []
    return [isa for isa in compiled_cpu_isas() if isa == "default" or _cpu_supports(isa)]


def _cpu_supports(isa):
    return bool(torch.ops.kdfast._cpu_supports(isa))


def select_cpu_isa(name="auto"):
    """Choose which CPU kernel build runs: "auto" (the best this CPU supports), "avx512", "avx2" or
    "default". Returns the chosen name. KDFAST_CPU_ISA sets the choice at import time."""
    global _selected_isa
    name = str(name).strip().lower()
    if name not in ("auto",) + _ISA_ORDER:
        raise ValueError(f"KDFAST_CPU_ISA / select_cpu_isa: unknown ISA {name!r}; use auto, "
                         f"{', '.join(_ISA_ORDER)}")
    if not LOADED:
        return None
    usable = available_cpu_isas()
    if name == "auto":
        name = usable[0]
    elif name not in usable:
        warnings.warn(f"kdfast: the {name} CPU kernels are not available on this CPU or build "
                      f"(available: {usable}); using {usable[0]}", RuntimeWarning, stacklevel=2)
        name = usable[0]
    path = "" if name == "default" else importlib.util.find_spec(f"kdfast._cpu_{name}").origin
    torch.ops.kdfast._select_cpu_isa(name, path)
    _selected_isa = name
    return name


def selected_cpu_isa():
    return _selected_isa


def native_build_info():
    return json.loads(torch.ops.kdfast._build_info()) if LOADED else None


_HAS_CUDA_KERNELS = None


def has_cuda_kernels():
    # Read once: the loss functions ask on every call, also while torch.compile traces them.
    global _HAS_CUDA_KERNELS
    if _HAS_CUDA_KERNELS is None:
        _HAS_CUDA_KERNELS = LOADED and bool(native_build_info().get("cuda"))
    return _HAS_CUDA_KERNELS


if LOADED:
    select_cpu_isa(os.environ.get("KDFAST_CPU_ISA", "auto"))
    has_cuda_kernels()

    from kdfast import _fake_kernels, _op_autograd  # noqa: E402,F401  (registrations)
