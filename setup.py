"""Build kdfast: a pure-Python package plus, by default, a C++ (and optionally CUDA) extension.

Switches (environment variables):
  KDFAST_BUILD_EXT=0     pure-Python install; kdfast then runs on its reference backend.
  KDFAST_CUDA=auto|0|1   auto: build CUDA kernels when torch has CUDA and nvcc is found (no GPU needed).
  KDFAST_CPU_ISAS        comma list of extra CPU kernel builds, default "avx2,avx512" on x86-64.
  CUDA_HOME              the CUDA toolkit; found by following an nvcc wrapper when unset.
  TORCH_CUDA_ARCH_LIST   default "8.0;9.0" when no GPU is visible.
"""
import os
import platform
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()


def _read_version():
    """kdfast/_version.py's __version__, read as text: importing kdfast would import torch."""
    text = (ROOT / "kdfast" / "_version.py").read_text()
    m = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M)
    if m is None:
        sys.exit("kdfast/_version.py must set __version__ to a string literal")
    return m.group(1)


# One source: pyproject.toml reads the same file ([tool.setuptools.dynamic]); this copy goes to the
# C++ build info (KDFAST_VERSION).
VERSION = _read_version()


def _env_flag(name, default):
    value = os.environ.get(name, default).strip().lower()
    if value not in ("0", "1", "auto"):
        sys.exit(f"{name} must be 0, 1 or auto, got {value!r}")
    return value


def _find_cuda_home():
    """The real toolkit folder. nvcc may be a wrapper script outside the toolkit: follow it."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = Path(os.path.realpath(nvcc))
        candidates.append(real.parent.parent)
        try:  # a shell wrapper: look for "exec /path/to/bin/nvcc"
            text = real.read_text(errors="ignore")[:4096]
            for m in re.finditer(r"(/[^\s\"']+)/bin/nvcc", text):
                candidates.insert(0, Path(m.group(1)))
        except OSError:
            pass
    candidates.append(Path("/usr/local/cuda"))
    for c in candidates:
        if (c / "bin" / "nvcc").exists() and (c / "include" / "cuda_runtime.h").exists():
            return str(c)
    return None


def _torch_version(torch):
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _visible_cuda_archs(torch):
    """The compute capabilities of the visible GPUs, as a TORCH_CUDA_ARCH_LIST ("9.0"), or None."""
    try:
        if not torch.cuda.is_available():
            return None
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    except Exception:  # a broken driver: build for the defaults
        return None
    return ";".join(f"{major}.{minor}" for major, minor in caps) or None


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extensions():
    if os.environ.get("KDFAST_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils import cpp_extension as ce

    want_cuda = _env_flag("KDFAST_CUDA", "auto")
    cuda_home = _find_cuda_home()
    with_cuda = False
    if want_cuda != "0":
        has = torch.version.cuda is not None and cuda_home is not None
        if want_cuda == "1" and not has:
            sys.exit("KDFAST_CUDA=1 but torch has no CUDA or no CUDA toolkit was found "
                     f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cuda_home}); set CUDA_HOME")
        with_cuda = has
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        ce.CUDA_HOME = cuda_home  # torch reads it at import time; the wrapper fools its guess
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # Spelled out (torch would pick the visible GPUs' archs itself) so that build_info can list them.
            os.environ["TORCH_CUDA_ARCH_LIST"] = _visible_cuda_archs(torch) or "8.0;9.0"

    omp = ["-fopenmp"]
    # torch >= 2.14's headers need C++20 (torch's own default); older ones build as C++17, as before.
    std = "-std=c++20" if _torch_version(torch) >= (2, 14) else "-std=c++17"
    # Match libtorch's std::string ABI explicitly: a compiler whose default differs (some toolchains
    # default to the old ABI) would otherwise build a library that crashes passing strings to torch.
    abi = [f"-D_GLIBCXX_USE_CXX11_ABI={int(getattr(torch._C, '_GLIBCXX_USE_CXX11_ABI', True))}"]
    base_cxx = ["-O3", std, "-fvisibility=hidden", "-fno-math-errno"] + abi + omp
    machine = platform.machine().lower()
    x86 = machine in ("x86_64", "amd64")
    defines = [("KDFAST_VERSION", f'"{VERSION}"')]

    # csrc/cpu holds the kernels (compiled once per ISA, raw pointers only) beside their tensor glue
    # (*_ops.cpp) and the buffer cache, which go into the main library once.
    cpu_dir = ROOT / "csrc" / "cpu"
    cpu_main = [*cpu_dir.glob("*_ops.cpp"), cpu_dir / "alloc.cpp"]
    kernel_sources = _rel(set(cpu_dir.glob("*.cpp")) - set(cpu_main))
    main_sources = _rel([ROOT / "csrc" / "kdfast.cpp", *(ROOT / "csrc" / "ops").glob("*.cpp"), *cpu_main])
    # The default-ISA kernels live in the main library and are listed first, so that where an inline
    # function from a header is emitted by several objects, the linker keeps the baseline copy.
    sources = kernel_sources + main_sources
    # CUDA kernels (*.cu, no tensor headers) and their tensor glue (*.cpp, TORCH_LIBRARY_IMPL for CUDA).
    cuda_dir = ROOT / "csrc" / "cuda"
    cuda_sources = _rel([*cuda_dir.glob("*.cu"), *cuda_dir.glob("*.cpp")]) if with_cuda else []
    main_defines = defines + [("CPU_CAPABILITY", "DEFAULT"), ("CPU_CAPABILITY_DEFAULT", None)]
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    main_defines.append(("KDFAST_CUDA_ARCHS", f'"{archs}"'))
    if with_cuda:
        main_defines.append(("KDFAST_WITH_CUDA", "1"))
        nvcc = ["-O3", std, *abi, "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                "-DKDFAST_WITH_CUDA=1"]
        ext = ce.CUDAExtension(
            "kdfast._C", sources + cuda_sources, include_dirs=[str(ROOT / "csrc")],
            define_macros=main_defines,
            extra_compile_args={"cxx": base_cxx, "nvcc": nvcc},
            extra_link_args=omp, py_limited_api=False)
    else:
        ext = ce.CppExtension(
            "kdfast._C", sources, include_dirs=[str(ROOT / "csrc")], define_macros=main_defines,
            extra_compile_args={"cxx": base_cxx}, extra_link_args=omp)
    exts = [ext]

    # Per-ISA builds of the same kernel files, as separate libraries that are loaded at run time
    # only on a CPU that has the instructions (the way ATen's DispatchStub picks a kernel).
    isa_flags = {
        "avx2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
        "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
                   "-mf16c", "-mbmi", "-mbmi2"],
    }
    isas = os.environ.get("KDFAST_CPU_ISAS", "avx2,avx512" if x86 else "")
    for isa in [i.strip() for i in isas.split(",") if i.strip()]:
        if isa not in isa_flags:
            sys.exit(f"KDFAST_CPU_ISAS: unknown ISA {isa!r}; known: {sorted(isa_flags)}")
        cap = isa.upper()
        exts.append(ce.CppExtension(
            f"kdfast._cpu_{isa}", kernel_sources, include_dirs=[str(ROOT / "csrc")],
            define_macros=defines + [("CPU_CAPABILITY", cap), (f"CPU_CAPABILITY_{cap}", None),
                                     ("KDFAST_ISA_LIBRARY", None)],
            extra_compile_args={"cxx": base_cxx + isa_flags[isa]}, extra_link_args=omp))
    return exts, {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

# name, dependencies and the version (kdfast/_version.py) are in pyproject.toml
setup(packages=find_packages(include=["kdfast", "kdfast.*"]), ext_modules=ext_modules, cmdclass=cmdclass)
