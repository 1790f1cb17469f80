// kdfast: the library, the CPU kernel-table selection and build information. Each op declares its
// schema in csrc/ops/<op>.cpp (TORCH_LIBRARY_FRAGMENT); each device registers its kernels in
// csrc/<device>/<op>_ops.cpp.
#include <Python.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <atomic>
#include <string>

#include "cpu/alloc.h"
#include "cpu/kernels.h"

extern "C" const kdfast::cpu::Kernels* kdfast_cpu_kernels_default();

namespace kdfast {

namespace {
std::atomic<const cpu::Kernels*> g_kernels{nullptr};

// Select the CPU kernel build: "default" is compiled into this library, any other name is loaded
// from the library at `path`. Python decides which one the CPU can run (see kdfast/_ops.py).
std::string select_cpu_isa(const std::string& name, const std::string& path) {
  if (name == "default") {
    g_kernels = kdfast_cpu_kernels_default();
    return g_kernels.load()->isa;
  }
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(handle != nullptr, "kdfast: cannot load the ", name, " CPU kernels from ", path, ": ",
              dlerror());
  auto fn = reinterpret_cast<kdfast_cpu_kernels_fn>(dlsym(handle, "kdfast_cpu_kernels"));
  TORCH_CHECK(fn != nullptr, "kdfast: ", path, " has no kernel table");
  g_kernels = fn();
  return g_kernels.load()->isa;
}

// What the CPU (and the OS, which must save the wide registers) supports, asked of the hardware.
bool cpu_supports(const std::string& isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
  }
#endif
  return isa == "default";
}

// Plain string concatenation: no iostreams, whose inline code can disagree with the C++ runtime
// that the process loaded when the compiler is newer than it.
std::string build_info_json() {
  std::string o = "{\"version\": \"" KDFAST_VERSION "\"";
#ifdef _OPENMP
  o += ", \"openmp\": " + std::to_string(_OPENMP);
#else
  o += ", \"openmp\": null";
#endif
#ifdef KDFAST_WITH_CUDA
  o += ", \"cuda\": true";
#else
  o += ", \"cuda\": false";
#endif
  o += ", \"cuda_archs\": \"" KDFAST_CUDA_ARCHS "\"";
  o += std::string(", \"cpu_isa\": \"") + cpu::selected_kernels().isa + "\"";
#if defined(__clang__)
  o += ", \"compiler\": \"clang " + std::to_string(__clang_major__) + "." + std::to_string(__clang_minor__) + "\"";
#elif defined(__GNUC__)
  o += ", \"compiler\": \"gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "\"";
#endif
  return o + "}";
}
}  // namespace

const cpu::Kernels& cpu::selected_kernels() {
  const cpu::Kernels* k = g_kernels.load();
  if (k == nullptr) {
    g_kernels = k = kdfast_cpu_kernels_default();
  }
  return *k;
}

}  // namespace kdfast

TORCH_LIBRARY(kdfast, m) {
  // The library's own ops; the losses' ops are in csrc/ops/.
  m.def("_select_cpu_isa(str name, str path) -> str", &kdfast::select_cpu_isa);
  m.def("_cpu_supports(str isa) -> bool", &kdfast::cpu_supports);
  m.def("_empty_cpu_cache() -> ()", &kdfast::empty_cpu_cache);
  m.def("_build_info() -> str", &kdfast::build_info_json);
}

// `import kdfast._C` loads this library and so runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
