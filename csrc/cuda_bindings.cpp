// CUDA implementations of the ops rcekd_C::*: the binding helper (binding.h) checks the
// arguments, allocates the outputs and fills the argument structs (args.h); these call the
// launchers of cuda/rcekd_cuda.cu (no torch headers there) on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding.h"
#include "cuda/rcekd_cuda.h"

namespace rcekd {
namespace cuda {
namespace {

void check_cuda(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, msg("rcekd cuda: ", what, " failed: ", cudaGetErrorString(e)));
}

Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

// The Impl of register_ops<Impl> (binding.h) for the CUDA dispatch key.
struct Kernels {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  static constexpr bool kZeroFilledGrad = true;  // the kernels write the gathered ids only

  static void select(const SelectArgs& a, const Tensor& like) {
    Tensor ws = workspace(select_workspace_bytes(a), like);
    check_cuda(select_launch(a, ws.data_ptr(), c10::cuda::getCurrentCUDAStream()), "select");
  }
  static void fused_fwd(const SelectArgs& a, const Tensor& like) {
    Tensor ws = workspace(select_workspace_bytes(a), like);
    check_cuda(select_launch(a, ws.data_ptr(), c10::cuda::getCurrentCUDAStream()), "fused_fwd");
  }
  static void subset_fwd(const SubsetArgs& a, const Tensor&) {
    check_cuda(subset_fwd_launch(a, c10::cuda::getCurrentCUDAStream()), "subset_ce_fwd");
  }
  static void subset_bwd(const SubsetArgs& a, const Tensor&) {
    check_cuda(subset_bwd_launch(a, c10::cuda::getCurrentCUDAStream()), "subset_ce_bwd");
  }
  static void fused_bwd(const FusedBwdArgs& a, const Tensor& like) {
    Tensor ws = workspace(fused_bwd_workspace_bytes(a), like);
    check_cuda(fused_bwd_launch(a, ws.data_ptr(), c10::cuda::getCurrentCUDAStream()), "fused_bwd");
  }
};

}  // namespace
}  // namespace cuda
}  // namespace rcekd

TORCH_LIBRARY_IMPL(rcekd_C, CUDA, m) { rcekd::register_ops<rcekd::cuda::Kernels>(m); }
