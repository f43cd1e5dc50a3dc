// The arguments of the RCE-KD kernels, shared by the CPU and CUDA kernels and filled in one
// place, the binding helper (binding.h). Plain C++: no torch header, so that the CUDA sources
// compile with nvcc alone, in seconds.
#pragma once

#include <cstddef>
#include <cstdint>

namespace rcekd {

// dtype codes of score tensors
enum : int { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3 };

// The hyperparameters (rcekd_kernels.config.RCEKDConfig, flattened in the order of
// rcekd_kernels/ops.py HPARAMS, then the seed), checked once by make_params (binding.h).
struct Params {
  int64_t K = 0, M = 0, L = 0;
  double tau = 1.0;   // logit temperature
  double T = 10.0;    // sampling temperature (the keys are computed in float64)
  double beta = 5.0;  // strength of gamma
  bool paper = true;  // mode: "paper" (true) or "official"
  uint32_t seed = 0;  // seed mod 2^32
};

// A strided (B, N) score tensor. Offsets are 64-bit.
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
struct SelectArgs : Params {
  int64_t B = 0, N = 0;
  Dense s, t;                         // t.data may be null when given_qt is set
  Mask exclude;
  const int64_t* given_qt = nullptr;  // contiguous (B, K) or null
  const int64_t* row_ids = nullptr;   // contiguous (B,)
  // outputs: [QS | A | QT] rows of idx (B, 2K + L), contiguous
  int64_t* qs = nullptr;
  int64_t qs_stride = 0;
  int64_t* sampled = nullptr;
  int64_t a_stride = 0;
  int64_t* qt = nullptr;
  int64_t qt_stride = 0;
  bool* q2 = nullptr;                 // (B, K)
  int64_t* counts = nullptr;          // (B, 2), select only
  // fused_fwd only
  void* loss = nullptr;               // (B,): float, or double when s is float64
  float* stats = nullptr;             // (B, 5): L1, L2, gamma, |Q1|, |QT & A|
};

// subset_ce_fwd / subset_ce_bwd on gathered scores, already contiguous in the compute dtype
// (double when is_double, else float).
struct SubsetArgs : Params {
  int64_t B = 0;
  bool is_double = false;
  const void* s_g = nullptr;        // (B, 2K + L)
  const void* t_g = nullptr;        // (B, 2K + L)
  const bool* q2 = nullptr;         // (B, K)
  const void* gamma = nullptr;      // (B,)
  const void* grad_rows = nullptr;  // (B,), bwd only
  void* loss = nullptr;             // (B,), fwd
  void* parts = nullptr;            // (B, 2), fwd
  void* grad = nullptr;             // (B, 2K + L), bwd
};

// fused_bwd: writes the rows' gradients into `out` (contiguous (B, N), dtype of s; zero-filled
// by the binding when the device's kernels ask for it).
struct FusedBwdArgs : Params {
  int64_t B = 0, N = 0;
  Dense s, t;
  const int64_t* idx = nullptr;     // contiguous (B, 2K + L)
  const bool* q2 = nullptr;         // contiguous (B, K)
  const void* gamma = nullptr;      // (B,) compute dtype
  const void* grad_rows = nullptr;  // (B,) compute dtype
  void* out = nullptr;
};

}  // namespace rcekd
