// The one binding of the loss ops rcekd_C::* to a device's kernels, shared by the CPU
// (rcekd.cpp) and CUDA (cuda_bindings.cpp) registrations:
//
//   * RCEKD_HPARAMS: the hyperparameters of every op's schema, in the order of the table
//     HPARAMS of rcekd_kernels/ops.py (then the seed); make_params checks them and builds
//     the one Params struct (args.h);
//   * the argument checks: shapes, dtypes and devices (metadata only), so that a direct call
//     of torch.ops.rcekd_C.* is memory-safe; the Python layer (rcekd_kernels/_checks.py and
//     rcekd_kernels/config.py) has already checked everything with precise messages;
//   * the outputs, allocated here for every device, and the argument structs filled here;
//   * register_ops<Impl>(m): the registration of the five ops for one dispatch key.
//
// A device's kernels are a struct Impl with static members
//   select(const SelectArgs&, const Tensor& like)        fills idx, q2_mask, counts
//   fused_fwd(const SelectArgs&, const Tensor& like)     fills loss, stats, idx, q2_mask
//   subset_fwd(const SubsetArgs&, const Tensor& like)    fills loss, parts
//   subset_bwd(const SubsetArgs&, const Tensor& like)    fills grad
//   fused_bwd(const FusedBwdArgs&, const Tensor& like)   fills the dense gradient
//   kZeroFilledGrad                                      fused_bwd's output is zero-filled here
//   kDevice                                              the device type of its tensors
// (`like` gives the device and options for a kernel's own scratch tensors).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "args.h"

namespace rcekd {

using at::Tensor;

// ------------------------------------------------------------------ the hyperparameters
// X(C++ type, name, schema type): one line per hyperparameter, in the order of ops.py HPARAMS.
#define RCEKD_HPARAMS(X)               \
  X(int64_t, K, "int")                 \
  X(int64_t, M, "int")                 \
  X(int64_t, L, "int")                 \
  X(double, tau, "float")              \
  X(double, T, "float")                \
  X(double, beta, "float")             \
  X(c10::string_view, mode, "str")     \
  X(int64_t, seed, "int")

#define RCEKD_HP_PARAM(type, name, schema) , type name
#define RCEKD_HP_NAME(type, name, schema) , name
#define RCEKD_HP_SCHEMA_ITEM(type, name, schema) ", " schema " " #name
// ", int K, int M, ..., int seed": the hyperparameters' part of every schema
#define RCEKD_HP_SCHEMA RCEKD_HPARAMS(RCEKD_HP_SCHEMA_ITEM)

// Error messages are built with std::to_string, not c10::str: c10::str formats numbers
// through a std::ostringstream instantiated in this library, and that crashed (a
// segmentation fault in ostream::_M_insert<long>) in the GPU image's build (gcc 13.3,
// torch 2.11). A single std::string argument makes TORCH_CHECK skip the ostream.
namespace detail {
inline void put(std::string& o, const char* v) { o += v; }
inline void put(std::string& o, const std::string& v) { o += v; }
inline void put(std::string& o, int64_t v) { o += std::to_string(v); }
inline void put(std::string& o, int v) { o += std::to_string(v); }
inline void put(std::string& o, double v) { o += std::to_string(v); }
}  // namespace detail

template <typename... A>
std::string msg(const A&... a) {
  std::string o;
  (detail::put(o, a), ...);
  return o;
}

constexpr int64_t kMaxN = (int64_t{1} << 31) - 1;  // item ids fit 32-bit key fields

// The checked hyperparameters (the C++ twin of RCEKDConfig.__post_init__).
inline Params make_params(std::nullptr_t RCEKD_HPARAMS(RCEKD_HP_PARAM)) {
  TORCH_CHECK(1 <= K && K <= M, msg("K, M must satisfy 1 <= K <= M, got K = ", K, ", M = ", M));
  TORCH_CHECK(1 <= L && L <= M, msg("L must satisfy 1 <= L <= M, got L = ", L, ", M = ", M));
  TORCH_CHECK(std::isfinite(tau) && tau > 0, msg("tau must be finite and > 0, got ", tau));
  TORCH_CHECK(std::isfinite(T) && T > 0, msg("T must be finite and > 0, got ", T));
  TORCH_CHECK(std::isfinite(beta) && beta >= 0, msg("beta must be finite and >= 0, got ", beta));
  TORCH_CHECK(mode == "paper" || mode == "official", "mode must be 'paper' or 'official'");
  Params p;
  p.K = K;
  p.M = M;
  p.L = L;
  p.tau = tau;
  p.T = T;
  p.beta = beta;
  p.paper = mode == "paper";
  p.seed = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  return p;
}

// ------------------------------------------------------------------ tensors -> structs
inline int dtype_code(at::ScalarType st) {
  switch (st) {
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    default: TORCH_CHECK(false, "rcekd: scores must be float16, bfloat16, float32 or float64");
  }
  return kF32;
}

inline Dense dense_of(const Tensor& x) {
  Dense d;
  d.data = x.data_ptr();
  d.dtype = dtype_code(x.scalar_type());
  d.s0 = x.stride(0);
  d.s1 = x.stride(1);
  return d;
}

inline Mask mask_of(const std::optional<Tensor>& m) {
  Mask k;
  if (m.has_value()) {
    k.data = m->data_ptr<bool>();
    k.s0 = m->stride(0);
    k.s1 = m->stride(1);
  }
  return k;
}

inline at::ScalarType acc_dtype(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// ------------------------------------------------------------------ checks (metadata only)
inline void check_float2d(const Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, msg(name, " must be 2-D, got ", x.dim(), "-D"));
  TORCH_CHECK(x.is_floating_point(), msg(name, " must have a floating dtype"));
}

inline void check_device(const Tensor& x, const Tensor& like, const char* name) {
  TORCH_CHECK(x.device() == like.device(), msg(name, " must be on the device of the scores"));
}

inline void check_dense_args(const Tensor& s, const std::optional<Tensor>& t, const std::optional<Tensor>& teacher_topk,
                             const std::optional<Tensor>& exclude, const Tensor& row_ids, const Params& p) {
  check_float2d(s, "student_scores");
  const int64_t B = s.size(0), N = s.size(1);
  TORCH_CHECK(N <= kMaxN, msg("rcekd compiled backends: N must be below 2^31, got ", N));
  TORCH_CHECK(p.M <= N, msg("M must satisfy K <= M <= N, got M = ", p.M, ", N = ", N));
  if (t.has_value()) {
    check_float2d(*t, "teacher_scores");
    TORCH_CHECK(t->sizes() == s.sizes(), "teacher_scores must have the shape of student_scores");
    check_device(*t, s, "teacher_scores");
  } else {
    TORCH_CHECK(teacher_topk.has_value(), "teacher_scores is required when teacher_topk is not given");
  }
  if (teacher_topk.has_value()) {
    TORCH_CHECK(teacher_topk->scalar_type() == at::kLong && teacher_topk->dim() == 2 &&
                    teacher_topk->size(0) == B && teacher_topk->size(1) == p.K,
                "teacher_topk must be int64 of shape (B, K)");
    check_device(*teacher_topk, s, "teacher_topk");
  }
  if (exclude.has_value()) {
    TORCH_CHECK(exclude->scalar_type() == at::kBool && exclude->sizes() == s.sizes(),
                "exclude must be bool of the shape of student_scores");
    check_device(*exclude, s, "exclude");
  }
  TORCH_CHECK(row_ids.dim() == 1 && row_ids.size(0) == B, "row_ids must have shape (B,)");
  TORCH_CHECK(!row_ids.is_floating_point() && !row_ids.is_complex() && row_ids.scalar_type() != at::kBool,
              "row_ids must have an integer dtype");
  check_device(row_ids, s, "row_ids");
}

inline void check_sets(const Tensor& q2_mask, const Tensor& gamma, const Tensor& like, int64_t B, const Params& p) {
  TORCH_CHECK(q2_mask.scalar_type() == at::kBool && q2_mask.dim() == 2 && q2_mask.size(0) == B &&
                  q2_mask.size(1) == p.K,
              "q2_mask must be a bool tensor of shape (B, K)");
  TORCH_CHECK(gamma.is_floating_point() && gamma.dim() == 1 && gamma.size(0) == B,
              "gamma must be a float tensor of shape (B,)");
  check_device(q2_mask, like, "q2_mask");
  check_device(gamma, like, "gamma");
}

inline void check_grad_rows(const Tensor& grad_rows, const Tensor& like, int64_t B) {
  TORCH_CHECK(grad_rows.is_floating_point() && grad_rows.dim() == 1 && grad_rows.size(0) == B,
              "grad_rows must be a float tensor of shape (B,)");
  check_device(grad_rows, like, "grad_rows");
}

inline void check_gathered_args(const Tensor& s_g, const Tensor& t_g, const Tensor& q2_mask, const Tensor& gamma,
                                const Params& p) {
  check_float2d(s_g, "student_gathered");
  TORCH_CHECK(t_g.sizes() == s_g.sizes() && t_g.is_floating_point(),
              "teacher_gathered must be a float tensor of the shape of student_gathered");
  check_device(t_g, s_g, "teacher_gathered");
  TORCH_CHECK(s_g.size(1) == 2 * p.K + p.L, "student_gathered must have 2K + L columns");
  check_sets(q2_mask, gamma, s_g, s_g.size(0), p);
}

inline void check_fused_bwd_args(const Tensor& grad_rows, const Tensor& s, const Tensor& t, const Tensor& idx,
                                 const Tensor& q2_mask, const Tensor& gamma, const Params& p) {
  check_float2d(s, "student_scores");
  TORCH_CHECK(t.sizes() == s.sizes() && t.is_floating_point(), "teacher_scores must match student_scores");
  check_device(t, s, "teacher_scores");
  const int64_t B = s.size(0), N = s.size(1);
  TORCH_CHECK(N <= kMaxN, msg("rcekd compiled backends: N must be below 2^31, got ", N));
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == B && idx.size(1) == 2 * p.K + p.L,
              "idx must be int64 of shape (B, 2K + L)");
  check_device(idx, s, "idx");
  check_sets(q2_mask, gamma, s, B, p);
  check_grad_rows(grad_rows, s, B);
}

// ------------------------------------------------------------------ the ops, for one device
template <class Impl>
void check_on_device(const Tensor& x) {
  TORCH_CHECK(x.device().type() == Impl::kDevice,
              msg("rcekd_C: this kernel runs on ", c10::DeviceTypeName(Impl::kDevice), " tensors"));
}

// Fills the selection's inputs (the outputs are set by the caller).
inline void fill_select(SelectArgs& a, const Params& p, const Tensor& s, const std::optional<Tensor>& t,
                        const Tensor& given, const std::optional<Tensor>& exclude, const Tensor& rows) {
  static_cast<Params&>(a) = p;
  a.B = s.size(0);
  a.N = s.size(1);
  a.s = dense_of(s);
  if (t.has_value()) a.t = dense_of(*t);
  a.exclude = mask_of(exclude);
  a.given_qt = given.defined() ? given.data_ptr<int64_t>() : nullptr;
  a.row_ids = rows.data_ptr<int64_t>();
}

// The [QS | A | QT] rows of idx (B, 2K + L) as the selection's three outputs.
inline void set_idx_outputs(SelectArgs& a, int64_t* ip) {
  const int64_t W = 2 * a.K + a.L;
  a.qs = ip;
  a.sampled = ip + a.K;
  a.qt = ip + a.K + a.L;
  a.qs_stride = a.a_stride = a.qt_stride = W;
}

template <class Impl>
std::tuple<Tensor, Tensor, Tensor> select_op(const Tensor& s, const std::optional<Tensor>& t,
                                             const std::optional<Tensor>& teacher_topk,
                                             const std::optional<Tensor>& exclude,
                                             const Tensor& row_ids RCEKD_HPARAMS(RCEKD_HP_PARAM)) {
  const Params p = make_params(nullptr RCEKD_HPARAMS(RCEKD_HP_NAME));
  check_dense_args(s, t, teacher_topk, exclude, row_ids, p);
  check_on_device<Impl>(s);
  const c10::DeviceGuard guard(s.device());
  const int64_t B = s.size(0);
  Tensor idx = at::empty({B, 2 * p.K + p.L}, s.options().dtype(at::kLong));
  Tensor q2 = at::empty({B, p.K}, s.options().dtype(at::kBool));
  Tensor counts = at::empty({B, 2}, s.options().dtype(at::kLong));
  if (B == 0) return {idx, q2, counts};
  Tensor given = teacher_topk.has_value() ? teacher_topk->contiguous() : Tensor();
  Tensor rows = row_ids.to(at::kLong).contiguous();
  SelectArgs a;
  fill_select(a, p, s, t, given, exclude, rows);
  set_idx_outputs(a, idx.data_ptr<int64_t>());
  a.q2 = q2.data_ptr<bool>();
  a.counts = counts.data_ptr<int64_t>();
  Impl::select(a, s);
  return {idx, q2, counts};
}

template <class Impl>
std::tuple<Tensor, Tensor, Tensor, Tensor> fused_fwd_op(const Tensor& s, const Tensor& t,
                                                        const std::optional<Tensor>& teacher_topk,
                                                        const std::optional<Tensor>& exclude,
                                                        const Tensor& row_ids RCEKD_HPARAMS(RCEKD_HP_PARAM)) {
  const Params p = make_params(nullptr RCEKD_HPARAMS(RCEKD_HP_NAME));
  const std::optional<Tensor> t_opt(t);
  check_dense_args(s, t_opt, teacher_topk, exclude, row_ids, p);
  check_on_device<Impl>(s);
  const c10::DeviceGuard guard(s.device());
  const int64_t B = s.size(0);
  Tensor loss = at::empty({B}, s.options().dtype(acc_dtype(s)));
  Tensor stats = at::empty({B, 5}, s.options().dtype(at::kFloat));
  Tensor idx = at::empty({B, 2 * p.K + p.L}, s.options().dtype(at::kLong));
  Tensor q2 = at::empty({B, p.K}, s.options().dtype(at::kBool));
  if (B == 0) return {loss, stats, idx, q2};
  Tensor given = teacher_topk.has_value() ? teacher_topk->contiguous() : Tensor();
  Tensor rows = row_ids.to(at::kLong).contiguous();
  SelectArgs a;
  fill_select(a, p, s, t_opt, given, exclude, rows);
  set_idx_outputs(a, idx.data_ptr<int64_t>());
  a.q2 = q2.data_ptr<bool>();
  a.loss = loss.data_ptr();
  a.stats = stats.data_ptr<float>();
  Impl::fused_fwd(a, s);
  return {loss, stats, idx, q2};
}

// The gathered scores, sets and per-row scalars in the compute dtype, contiguous; `keep` holds
// the converted tensors alive while the kernels read them.
struct SubsetInputs {
  Tensor xs, ys, q2, gm, gr;
};

inline SubsetArgs subset_args(SubsetInputs& in, const Tensor& s_g, const Tensor& t_g, const Tensor& q2_mask,
                              const Tensor& gamma, const Tensor* grad_rows, const Params& p) {
  const at::ScalarType acc = acc_dtype(s_g);
  in.xs = s_g.to(acc).contiguous();
  in.ys = t_g.to(acc).contiguous();
  in.q2 = q2_mask.contiguous();
  in.gm = gamma.to(acc).contiguous();
  SubsetArgs a;
  static_cast<Params&>(a) = p;
  a.B = s_g.size(0);
  a.is_double = acc == at::kDouble;
  a.s_g = in.xs.data_ptr();
  a.t_g = in.ys.data_ptr();
  a.q2 = in.q2.data_ptr<bool>();
  a.gamma = in.gm.data_ptr();
  if (grad_rows != nullptr) {
    in.gr = grad_rows->to(acc).contiguous();
    a.grad_rows = in.gr.data_ptr();
  }
  return a;
}

template <class Impl>
std::tuple<Tensor, Tensor> subset_ce_fwd_op(const Tensor& s_g, const Tensor& t_g, const Tensor& q2_mask,
                                            const Tensor& gamma RCEKD_HPARAMS(RCEKD_HP_PARAM)) {
  const Params p = make_params(nullptr RCEKD_HPARAMS(RCEKD_HP_NAME));
  check_gathered_args(s_g, t_g, q2_mask, gamma, p);
  check_on_device<Impl>(s_g);
  const c10::DeviceGuard guard(s_g.device());
  const int64_t B = s_g.size(0);
  Tensor loss = at::empty({B}, s_g.options().dtype(acc_dtype(s_g)));
  Tensor parts = at::empty({B, 2}, s_g.options().dtype(acc_dtype(s_g)));
  if (B == 0) return {loss, parts};
  SubsetInputs in;
  SubsetArgs a = subset_args(in, s_g, t_g, q2_mask, gamma, nullptr, p);
  a.loss = loss.data_ptr();
  a.parts = parts.data_ptr();
  Impl::subset_fwd(a, s_g);
  return {loss, parts};
}

template <class Impl>
Tensor subset_ce_bwd_op(const Tensor& grad_rows, const Tensor& s_g, const Tensor& t_g, const Tensor& q2_mask,
                        const Tensor& gamma RCEKD_HPARAMS(RCEKD_HP_PARAM)) {
  const Params p = make_params(nullptr RCEKD_HPARAMS(RCEKD_HP_NAME));
  check_gathered_args(s_g, t_g, q2_mask, gamma, p);
  check_grad_rows(grad_rows, s_g, s_g.size(0));
  check_on_device<Impl>(s_g);
  const c10::DeviceGuard guard(s_g.device());
  Tensor out = at::empty(s_g.sizes(), s_g.options().dtype(acc_dtype(s_g)));
  if (s_g.size(0) == 0) return out;
  SubsetInputs in;
  SubsetArgs a = subset_args(in, s_g, t_g, q2_mask, gamma, &grad_rows, p);
  a.grad = out.data_ptr();
  Impl::subset_bwd(a, s_g);
  return out;
}

template <class Impl>
Tensor fused_bwd_op(const Tensor& grad_rows, const Tensor& s, const Tensor& t, const Tensor& idx,
                    const Tensor& q2_mask, const Tensor& gamma RCEKD_HPARAMS(RCEKD_HP_PARAM)) {
  const Params p = make_params(nullptr RCEKD_HPARAMS(RCEKD_HP_NAME));
  check_fused_bwd_args(grad_rows, s, t, idx, q2_mask, gamma, p);
  check_on_device<Impl>(s);
  const c10::DeviceGuard guard(s.device());
  const int64_t B = s.size(0);
  // the gradient: the only (B, N) tensor
  Tensor out = Impl::kZeroFilledGrad ? at::zeros({B, s.size(1)}, s.options()) : at::empty({B, s.size(1)}, s.options());
  if (B == 0) return out;
  const at::ScalarType acc = acc_dtype(s);
  Tensor ix = idx.contiguous(), q2 = q2_mask.contiguous();
  Tensor gm = gamma.to(acc).contiguous(), gr = grad_rows.to(acc).contiguous();
  FusedBwdArgs a;
  static_cast<Params&>(a) = p;
  a.B = B;
  a.N = s.size(1);
  a.s = dense_of(s);
  a.t = dense_of(t);
  a.idx = ix.data_ptr<int64_t>();
  a.q2 = q2.data_ptr<bool>();
  a.gamma = gm.data_ptr();
  a.grad_rows = gr.data_ptr();
  a.out = out.data_ptr();
  Impl::fused_bwd(a, s);
  return out;
}

// The schemas of the five loss ops (defined once, in rcekd.cpp).
inline void define_ops(torch::Library& m) {
  m.def("select(Tensor s, Tensor? t, Tensor? teacher_topk, Tensor? exclude, Tensor row_ids" RCEKD_HP_SCHEMA
        ") -> (Tensor, Tensor, Tensor)");
  m.def("subset_ce_fwd(Tensor s_g, Tensor t_g, Tensor q2_mask, Tensor gamma" RCEKD_HP_SCHEMA ") -> (Tensor, Tensor)");
  m.def("subset_ce_bwd(Tensor grad_rows, Tensor s_g, Tensor t_g, Tensor q2_mask, Tensor gamma" RCEKD_HP_SCHEMA
        ") -> Tensor");
  m.def("fused_fwd(Tensor s, Tensor t, Tensor? teacher_topk, Tensor? exclude, Tensor row_ids" RCEKD_HP_SCHEMA
        ") -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("fused_bwd(Tensor grad_rows, Tensor s, Tensor t, Tensor idx, Tensor q2_mask, Tensor gamma" RCEKD_HP_SCHEMA
        ") -> Tensor");
}

// The implementations of the five loss ops for one dispatch key.
template <class Impl>
void register_ops(torch::Library& m) {
  m.impl("select", &select_op<Impl>);
  m.impl("subset_ce_fwd", &subset_ce_fwd_op<Impl>);
  m.impl("subset_ce_bwd", &subset_ce_bwd_op<Impl>);
  m.impl("fused_fwd", &fused_fwd_op<Impl>);
  m.impl("fused_bwd", &fused_bwd_op<Impl>);
}

}  // namespace rcekd
