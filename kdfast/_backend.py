"""Backend selection: "auto" (compiled kernels where the extension has one, else reference; CPU
squared errors too small to gain from the fused op take ATen's mse_loss, see functional.py),
"native" (the compiled kernels always, an error when the extension is missing) or "reference"
(pure PyTorch)."""
import os
import sys
import warnings

import torch

from kdfast import _ops

BACKENDS = ("auto", "native", "reference")
_backend = None
_warned_missing = False


def set_backend(name):
    """Choose the backend for every kdfast loss. KDFAST_BACKEND sets the initial choice."""
    global _backend
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}")
    name = name.strip().lower()
    if name == "native" and not _ops.LOADED:
        raise RuntimeError(_missing_message())
    _backend = name


def get_backend():
    return _backend


def native_available(device="cpu"):
    """True when the compiled extension is loaded and has kernels for `device`."""
    device = torch.device(device)
    if not _ops.LOADED:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return _ops.has_cuda_kernels() and torch.cuda.is_available()
    return False


def _missing_message():
    build = ("reinstall from the kdfast source with a C++ compiler and torch present: "
             "`pip install --no-build-isolation .` (in a source checkout, "
             "`python setup.py build_ext --inplace` builds it in place)")
    if not _ops.BUILT:
        return ("kdfast: the compiled extension is not loaded: this kdfast was installed without it "
                "(KDFAST_BUILD_EXT=0, a pure-Python install), so its losses run on the pure-PyTorch "
                f"reference backend. To build the fused kernels, {build}.")
    return (f"kdfast: the compiled extension is not loaded: kdfast._C failed to load ({_ops.LOAD_ERROR!s}"
            f"). To rebuild it, {build}; or use kdfast.set_backend('reference').")


def _stacklevel_outside_package():
    """The warnings stacklevel, counted from the caller, of the first frame outside kdfast: the
    user's line, however deep the loss sits."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def use_native(device):
    """Whether a loss with a fused kernel should call it for tensors on `device`."""
    global _warned_missing
    if _backend == "reference":
        return False
    if native_available(device):
        return True
    if _backend == "native":
        if not _ops.LOADED:
            raise RuntimeError(_missing_message())
        raise RuntimeError(f"kdfast: backend 'native' has no kernel for device {device}; "
                           "use set_backend('auto') to fall back to the reference")
    if not _ops.LOADED and not _warned_missing:
        _warned_missing = True
        suffix = "" if not _ops.BUILT else " Running the reference backend."
        warnings.warn(_missing_message() + suffix, RuntimeWarning, stacklevel=_stacklevel_outside_package())
    return False


set_backend(os.environ.get("KDFAST_BACKEND", "auto"))
