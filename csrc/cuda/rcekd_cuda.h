// Launchers of the CUDA kernels of RCE-KD. Plain C++ and the CUDA runtime only:
// no torch header, so that rcekd_cuda.cu compiles with nvcc alone, in seconds.
// binding.h turns tensors into the structs of ../args.h; cuda_bindings.cpp calls the launchers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "../args.h"

namespace rcekd {
namespace cuda {

// The argument structs (Params, Dense, Mask, SelectArgs, SubsetArgs, FusedBwdArgs) are shared
// with the CPU kernels: ../args.h.
using rcekd::Dense;
using rcekd::FusedBwdArgs;
using rcekd::Mask;
using rcekd::SelectArgs;
using rcekd::SubsetArgs;
using rcekd::kBF16;
using rcekd::kF16;
using rcekd::kF32;
using rcekd::kF64;

// Workspace sizes (bytes) and launchers. Every launcher returns the first CUDA
// error met (cudaSuccess when all kernels were queued on `stream`).
size_t select_workspace_bytes(const SelectArgs& a);
cudaError_t select_launch(const SelectArgs& a, void* workspace, cudaStream_t stream);

cudaError_t subset_fwd_launch(const SubsetArgs& a, cudaStream_t stream);
cudaError_t subset_bwd_launch(const SubsetArgs& a, cudaStream_t stream);

size_t fused_bwd_workspace_bytes(const FusedBwdArgs& a);
cudaError_t fused_bwd_launch(const FusedBwdArgs& a, void* workspace, cudaStream_t stream);

// Fields of the build info JSON for the CUDA part (no braces), e.g.
// "cuda_archs": [90], "cuda_runtime": "13.0", "nvcc": "13.0"
std::string build_info_json();

}  // namespace cuda
}  // namespace rcekd
