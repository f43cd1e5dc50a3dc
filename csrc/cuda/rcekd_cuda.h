// Launchers of the CUDA kernels of RCE-KD. Plain C++ and the CUDA runtime only:
// no torch header, so that rcekd_cuda.cu compiles with nvcc alone, in seconds.
// cuda_bindings.cpp turns tensors into these structs and calls the launchers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace rcekd {
namespace cuda {

// dtype codes of score tensors
enum : int { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3 };

// A strided (B, N) score tensor on the device. Offsets are 64-bit.
struct Dense {
  const void* data = nullptr;
  int dtype = kF32;
  int64_t s0 = 0, s1 = 0;
};

// A strided (B, N) bool mask; data == nullptr means no mask.
struct Mask {
  const bool* data = nullptr;
  int64_t s0 = 0, s1 = 0;
};

// select (loss == nullptr) and fused_fwd (loss != nullptr).
struct SelectArgs {
  int64_t B = 0, N = 0, K = 0, M = 0, L = 0;
  bool paper = true;
  double T = 10.0;  // sampling temperature (the keys are computed in float64)
  uint32_t seed = 0;            // seed mod 2^32
  Dense s, t;                   // t.data may be null when given_qt is set
  Mask exclude;
  const int64_t* given_qt = nullptr;  // contiguous (B, K) or null
  const int64_t* row_ids = nullptr;   // contiguous (B,)
  // outputs (int64 / bool, contiguous rows of the given strides)
  int64_t* qs = nullptr;
  int64_t qs_stride = 0;
  int64_t* sampled = nullptr;
  int64_t a_stride = 0;
  int64_t* qt = nullptr;
  int64_t qt_stride = 0;
  bool* q2 = nullptr;           // (B, K)
  int64_t* counts = nullptr;    // (B, 2), select only
  // fused_fwd only
  void* loss = nullptr;         // (B,): float, or double when s is float64
  float* stats = nullptr;       // (B, 5): L1, L2, gamma, |Q1|, |QT & A|
  double tau = 1.0;
  double beta = 5.0;
};

// subset_ce_fwd / subset_ce_bwd on gathered scores, already contiguous in the
// compute dtype (double when is_double, else float).
struct SubsetArgs {
  int64_t B = 0, K = 0, L = 0;
  bool is_double = false;
  const void* s_g = nullptr;    // (B, 2K + L)
  const void* t_g = nullptr;    // (B, 2K + L)
  const bool* q2 = nullptr;     // (B, K)
  const void* gamma = nullptr;  // (B,)
  const void* grad_rows = nullptr;  // (B,), bwd only
  double tau = 1.0;
  void* loss = nullptr;         // (B,), fwd
  void* parts = nullptr;        // (B, 2), fwd
  void* grad = nullptr;         // (B, 2K + L), bwd
};

// fused_bwd: writes the rows' gradients into `out` (contiguous (B, N), dtype of s,
// zero-filled by the caller).
struct FusedBwdArgs {
  int64_t B = 0, N = 0, K = 0, L = 0;
  Dense s, t;
  const int64_t* idx = nullptr;     // contiguous (B, 2K + L)
  const bool* q2 = nullptr;         // contiguous (B, K)
  const void* gamma = nullptr;      // (B,) compute dtype
  const void* grad_rows = nullptr;  // (B,) compute dtype
  double tau = 1.0;
  void* out = nullptr;
};

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
