// The compiled extension of rcekd_kernels: schemas of the ops rcekd_C::* and their
// CPU implementations. The CUDA implementations are registered by
// cuda_bindings.cpp when the extension is built with CUDA.
//
// The five loss ops take the arguments of the functions of the same names in
// rcekd_kernels/backends/reference.py and return the same outputs; gathered_dot(_bwd)
// are those of rcekd_kernels/gathered.py (CPU only: on a GPU torch's gather is used).
#include <Python.h>  // only for the module's init function (import rcekd_kernels._C)

#include <torch/library.h>

#include <string>

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
  m.def(
      "select(Tensor s, Tensor? t, Tensor? teacher_topk, Tensor? exclude, Tensor row_ids, int K, int M, int L, "
      "float T, str mode, int seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "subset_ce_fwd(Tensor s_g, Tensor t_g, Tensor q2_mask, Tensor gamma, int K, int L, float tau) "
      "-> (Tensor, Tensor)");
  m.def(
      "subset_ce_bwd(Tensor grad_rows, Tensor s_g, Tensor t_g, Tensor q2_mask, Tensor gamma, int K, int L, "
      "float tau) -> Tensor");
  m.def(
      "fused_fwd(Tensor s, Tensor t, Tensor? teacher_topk, Tensor? exclude, Tensor row_ids, int K, int M, int L, "
      "float tau, float T, float beta, str mode, int seed) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "fused_bwd(Tensor grad_rows, Tensor s, Tensor t, Tensor idx, Tensor q2_mask, Tensor gamma, int K, int L, "
      "float tau) -> Tensor");
  m.def("gathered_dot(Tensor user_vecs, Tensor item_vecs, Tensor idx) -> Tensor");
  m.def("gathered_dot_bwd(Tensor grad, Tensor user_vecs, Tensor item_vecs, Tensor idx) -> (Tensor, Tensor)");
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(rcekd_C, CPU, m) {
  m.impl("select", &rcekd::cpu::select);
  m.impl("subset_ce_fwd", &rcekd::cpu::subset_ce_fwd);
  m.impl("subset_ce_bwd", &rcekd::cpu::subset_ce_bwd);
  m.impl("fused_fwd", &rcekd::cpu::fused_fwd);
  m.impl("fused_bwd", &rcekd::cpu::fused_bwd);
  m.impl("gathered_dot", &rcekd::cpu::gathered_dot);
  m.impl("gathered_dot_bwd", &rcekd::cpu::gathered_dot_bwd);
}

// `import rcekd_kernels._C` loads this library, which registers the ops above.
#define RCEKD_CONCAT2(a, b) a##b
#define RCEKD_CONCAT(a, b) RCEKD_CONCAT2(a, b)
extern "C" PyMODINIT_FUNC RCEKD_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, RCEKD_STR(TORCH_EXTENSION_NAME),
                                   "rcekd_kernels compiled ops (torch.ops.rcekd_C)", -1, nullptr};
  return PyModule_Create(&def);
}
