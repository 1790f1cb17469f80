"""build_info(): what this install was built with and what it runs."""
import platform

import torch

from kdfast import _backend, _ops
from kdfast._version import __version__


def build_info():
    """A dict: version, torch, whether the extension is loaded, the CPU kernel builds compiled and
    the one selected, OpenMP, threads, CUDA on/off and the CUDA archs compiled."""
    native = _ops.native_build_info()
    info = {
        "version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "extension_loaded": _ops.LOADED,
        "backend": _backend.get_backend(),
        "threads": torch.get_num_threads(),
        "cpu_capability_torch": torch.backends.cpu.get_cpu_capability(),
    }
    if native is None:
        info.update({"cpu_isa_compiled": [], "cpu_isa_selected": None, "openmp": None, "cuda": False,
                     "cuda_archs": [], "load_error": str(_ops.LOAD_ERROR)})
        return info
    info.update({
        "cpu_isa_compiled": _ops.compiled_cpu_isas(),
        "cpu_isa_usable": _ops.available_cpu_isas(),
        "cpu_isa_selected": native["cpu_isa"].lower(),
        "openmp": native["openmp"] is not None,
        "compiler": native.get("compiler"),
        "cuda": bool(native["cuda"]),
        "cuda_archs": [a for a in native["cuda_archs"].replace(",", ";").split(";") if a],
        "cuda_runtime_available": torch.cuda.is_available(),
    })
    return info
