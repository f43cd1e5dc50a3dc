// Argument checks of the compiled ops, shared by the CPU and CUDA backends.
// The Python layer (rcekd_kernels/_checks.py) checks everything first with
// precise messages; these keep a direct call of torch.ops.rcekd_C.* memory-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <string_view>

namespace rcekd {

using at::Tensor;

// Error messages are built with std::to_string, not c10::str: c10::str formats numbers
// through a std::ostringstream instantiated in this library, and that crashed (a
// segmentation fault in ostream::_M_insert<long>) in the GPU image's build (gcc 13.3,
// torch 2.11). A single std::string argument makes TORCH_CHECK skip the ostream.
namespace detail {
inline void put(std::string& o, const char* v) { o += v; }
inline void put(std::string& o, const std::string& v) { o += v; }
inline void put(std::string& o, int64_t v) { o += std::to_string(v); }
inline void put(std::string& o, int v) { o += std::to_string(v); }
}  // namespace detail

template <typename... A>
std::string msg(const A&... a) {
  std::string o;
  (detail::put(o, a), ...);
  return o;
}

constexpr int64_t kMaxN = (int64_t{1} << 31) - 1;  // item ids fit 32-bit key fields

inline void check_dense_args(const Tensor& s, const std::optional<Tensor>& t, const std::optional<Tensor>& teacher_topk,
                      const std::optional<Tensor>& exclude, const Tensor& row_ids, int64_t K, int64_t M, int64_t L,
                      std::string_view mode) {
  TORCH_CHECK(s.dim() == 2, msg("student_scores must be 2-D (B, N), got ", s.dim(), "-D"));
  TORCH_CHECK(s.is_floating_point(), "student_scores must have a floating dtype");
  const int64_t B = s.size(0), N = s.size(1);
  TORCH_CHECK(N <= kMaxN, msg("rcekd compiled backends: N must be below 2^31, got ", N));
  TORCH_CHECK(1 <= K && K <= M && M <= N,
              msg("K, M must satisfy 1 <= K <= M <= N, got K = ", K, ", M = ", M, ", N = ", N));
  TORCH_CHECK(1 <= L && L <= M, msg("L must satisfy 1 <= L <= M, got L = ", L));
  TORCH_CHECK(mode == "paper" || mode == "official", "mode must be 'paper' or 'official'");
  if (t.has_value()) {
    TORCH_CHECK(t->sizes() == s.sizes(), "teacher_scores must have the shape of student_scores");
    TORCH_CHECK(t->is_floating_point(), "teacher_scores must have a floating dtype");
  } else {
    TORCH_CHECK(teacher_topk.has_value(), "teacher_scores is required when teacher_topk is not given");
  }
  if (teacher_topk.has_value()) {
    TORCH_CHECK(teacher_topk->scalar_type() == at::kLong && teacher_topk->dim() == 2 &&
                    teacher_topk->size(0) == B && teacher_topk->size(1) == K,
                "teacher_topk must be int64 of shape (B, K)");
  }
  if (exclude.has_value()) {
    TORCH_CHECK(exclude->scalar_type() == at::kBool && exclude->sizes() == s.sizes(),
                "exclude must be bool of the shape of student_scores");
  }
  TORCH_CHECK(row_ids.dim() == 1 && row_ids.size(0) == B, "row_ids must have shape (B,)");
}


inline void check_gathered_args(const Tensor& s_g, const Tensor& t_g, const Tensor& q2_mask, const Tensor& gamma, int64_t K,
                         int64_t L) {
  TORCH_CHECK(s_g.dim() == 2 && s_g.is_floating_point(), "student_gathered must be a 2-D float tensor");
  TORCH_CHECK(t_g.sizes() == s_g.sizes() && t_g.is_floating_point(),
              "teacher_gathered must be a float tensor of the shape of student_gathered");
  TORCH_CHECK(K >= 1 && L >= 1 && s_g.size(1) == 2 * K + L, "student_gathered must have 2K + L columns");
  TORCH_CHECK(q2_mask.scalar_type() == at::kBool && q2_mask.dim() == 2 && q2_mask.size(0) == s_g.size(0) &&
                  q2_mask.size(1) == K,
              "q2_mask must be a bool tensor of shape (B, K)");
  TORCH_CHECK(gamma.dim() == 1 && gamma.size(0) == s_g.size(0), "gamma must have shape (B,)");
}


inline void check_fused_bwd_args(const Tensor& grad_rows, const Tensor& s, const Tensor& t, const Tensor& idx,
                                 const Tensor& q2_mask, const Tensor& gamma, int64_t K, int64_t L) {
  TORCH_CHECK(s.dim() == 2 && s.is_floating_point(), "student_scores must be a 2-D float tensor");
  TORCH_CHECK(t.sizes() == s.sizes() && t.is_floating_point(), "teacher_scores must match student_scores");
  const int64_t B = s.size(0), N = s.size(1), W = 2 * K + L;
  TORCH_CHECK(N <= kMaxN, msg("rcekd compiled backends: N must be below 2^31, got ", N));
  TORCH_CHECK(K >= 1 && L >= 1, "K and L must be >= 1");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == B && idx.size(1) == W,
              "idx must be int64 of shape (B, 2K + L)");
  TORCH_CHECK(q2_mask.scalar_type() == at::kBool && q2_mask.dim() == 2 && q2_mask.size(0) == B &&
                  q2_mask.size(1) == K,
              "q2_mask must be a bool tensor of shape (B, K)");
  TORCH_CHECK(gamma.dim() == 1 && gamma.size(0) == B, "gamma must have shape (B,)");
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == B, "grad_rows must have shape (B,)");
}

}  // namespace rcekd
