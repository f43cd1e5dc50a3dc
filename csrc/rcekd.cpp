// The compiled extension of rcekd_kernels: schemas of the ops rcekd_C::* and their
// CPU implementations. The CUDA implementations are registered by
// cuda_bindings.cpp when the extension is built with CUDA.
//
// The five loss ops (schemas and binding: binding.h) take the tensors of the functions of the
// same names in rcekd_kernels/backends/reference.py, then the flattened configuration and the
// seed, and return the same outputs; gathered_dot(_bwd) are those of the reference's
// gathered_dot (CPU only: on a GPU torch's gather is used); csr_layer_mean is the reference's
// layer_mean (CPU only: LightGCN's propagation, rcekd_kernels/graph.py).
#include <Python.h>  // only for the module's init function (import rcekd_kernels._C)

#include <torch/library.h>

#include <string>

#include "binding.h"
#include "cpu/rcekd_cpu.h"

#if defined(__has_include)
#if __has_include(<torch/version.h>)
#include <torch/version.h>
#endif
#endif

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

#define RCEKD_STR2(x) #x
#define RCEKD_STR(x) RCEKD_STR2(x)

#ifdef RCEKD_WITH_CUDA
namespace rcekd {
namespace cuda {
std::string build_info_json();  // cuda/rcekd_cuda_launch.cu (fields of the CUDA part)
}
}  // namespace rcekd
#endif

namespace {

std::string compiler_string() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return std::string("msvc ") + RCEKD_STR(_MSC_VER);
#else
  return "unknown";
#endif
}

// What this binary was built with, as a JSON object (parsed by native.build_info()).
std::string build_info() {
  std::string s = "{\"cpu\": true";
#ifdef RCEKD_WITH_CUDA
  s += ", \"cuda\": true, " + rcekd::cuda::build_info_json();
#else
  s += ", \"cuda\": false";
#endif
  s += ", \"compiler\": \"" + compiler_string() + "\"";
#if defined(_OPENMP)
  s += ", \"openmp\": true";
#else
  s += ", \"openmp\": false";
#endif
#if defined(TORCH_VERSION_MAJOR) && defined(TORCH_VERSION_MINOR) && defined(TORCH_VERSION_PATCH)
  s += ", \"torch\": \"" + std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
       std::to_string(TORCH_VERSION_PATCH) + "\"";
#endif
  s += ", \"cplusplus\": " + std::to_string(static_cast<long>(__cplusplus));
  s += "}";
  return s;
}

}  // namespace

TORCH_LIBRARY(rcekd_C, m) {
  rcekd::define_ops(m);  // the five loss ops (binding.h)
  m.def("gathered_dot(Tensor user_vecs, Tensor item_vecs, Tensor idx) -> Tensor");
  m.def("gathered_dot_bwd(Tensor grad, Tensor user_vecs, Tensor item_vecs, Tensor idx) -> (Tensor, Tensor)");
  m.def("csr_layer_mean(Tensor crow, Tensor col, Tensor val, Tensor[] parts, int layers, bool backward) -> Tensor[]");
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(rcekd_C, CPU, m) {
  rcekd::register_ops<rcekd::cpu::Kernels>(m);
  m.impl("gathered_dot", &rcekd::cpu::gathered_dot);
  m.impl("gathered_dot_bwd", &rcekd::cpu::gathered_dot_bwd);
  m.impl("csr_layer_mean", &rcekd::cpu::csr_layer_mean);
}

// `import rcekd_kernels._C` loads this library, which registers the ops above.
#define RCEKD_CONCAT2(a, b) a##b
#define RCEKD_CONCAT(a, b) RCEKD_CONCAT2(a, b)
extern "C" PyMODINIT_FUNC RCEKD_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, RCEKD_STR(TORCH_EXTENSION_NAME),
                                   "rcekd_kernels compiled ops (torch.ops.rcekd_C)", -1, nullptr};
  return PyModule_Create(&def);
}
