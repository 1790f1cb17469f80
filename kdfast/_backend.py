"""Backend selection: "auto" (compiled kernels where the extension has one, else reference; CPU
squared errors too small to gain from the fused op take ATen's mse_loss, see functional.py),
"native" (the compiled kernels always, an error when the extension is missing) or "reference"
(pure PyTorch)."""
import os
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
    return ("kdfast: the compiled extension is not loaded "
            f"({_ops.LOAD_ERROR!s}). Reinstall from source with a C++ compiler and torch present: "
            "`pip install --no-build-isolation .` (KDFAST_BUILD_EXT=0 builds the pure-Python package "
            "on purpose); or use kdfast.set_backend('reference').")


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
        warnings.warn(_missing_message() + " Running the reference backend.", RuntimeWarning, stacklevel=3)
    return False


set_backend(os.environ.get("KDFAST_BACKEND", "auto"))
