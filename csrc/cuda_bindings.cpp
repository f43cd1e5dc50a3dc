// CUDA implementations of the ops rcekd_C::*: tensors in, launcher structs out.
// The kernels themselves are in cuda/rcekd_cuda.cu (no torch headers there).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "checks.h"
#include "cuda/rcekd_cuda.h"

namespace rcekd {
namespace cuda {
namespace {

int dtype_code(at::ScalarType st) {
  switch (st) {
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    default: TORCH_CHECK(false, msg("rcekd cuda: unsupported score dtype ", c10::toString(st)));
  }
  return kF32;
}

Dense dense_of(const Tensor& x) {
  Dense d;
  d.data = x.data_ptr();
  d.dtype = dtype_code(x.scalar_type());
  d.s0 = x.stride(0);
  d.s1 = x.stride(1);
  return d;
}

Mask mask_of(const std::optional<Tensor>& m) {
  Mask k;
  if (m.has_value()) {
    k.data = m->data_ptr<bool>();
    k.s0 = m->stride(0);
    k.s1 = m->stride(1);
  }
  return k;
}

void check_cuda(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, msg("rcekd cuda: ", what, " failed: ", cudaGetErrorString(e)));
}

void check_on_cuda(const Tensor& s) { TORCH_CHECK(s.is_cuda(), "rcekd cuda backend: tensors must be on a CUDA device"); }

at::ScalarType acc_dtype(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

void fill_select(SelectArgs& a, const Tensor& s, const std::optional<Tensor>& t, const Tensor& given,
                 const std::optional<Tensor>& exclude, const Tensor& rows, int64_t K, int64_t M, int64_t L, double T,
                 std::string_view mode, int64_t seed) {
  a.B = s.size(0);
  a.N = s.size(1);
  a.K = K;
  a.M = M;
  a.L = L;
  a.paper = mode == "paper";
  a.T = T;
  a.seed = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  a.s = dense_of(s);
  if (t.has_value()) a.t = dense_of(*t);
  a.exclude = mask_of(exclude);
  a.given_qt = given.defined() ? given.data_ptr<int64_t>() : nullptr;
  a.row_ids = rows.data_ptr<int64_t>();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> select_cuda(
    const Tensor& s, const std::optional<Tensor>& t, const std::optional<Tensor>& teacher_topk,
    const std::optional<Tensor>& exclude, const Tensor& row_ids, int64_t K, int64_t M, int64_t L, double T,
    std::string_view mode, int64_t seed) {
  check_dense_args(s, t, teacher_topk, exclude, row_ids, K, M, L, mode);
  check_on_cuda(s);
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t B = s.size(0);
  const auto i64 = s.options().dtype(at::kLong);
  Tensor qs = at::empty({B, K}, i64), a = at::empty({B, L}, i64), qt = at::empty({B, K}, i64);
  Tensor q2 = at::empty({B, K}, s.options().dtype(at::kBool));
  Tensor counts = at::empty({B, 2}, i64);
  if (B == 0) return {qs, a, qt, q2, counts};
  Tensor given = teacher_topk.has_value() ? teacher_topk->contiguous() : Tensor();
  Tensor rows = row_ids.to(at::kLong).contiguous();
  SelectArgs args;
  fill_select(args, s, t, given, exclude, rows, K, M, L, T, mode, seed);
  args.qs = qs.data_ptr<int64_t>();
  args.qs_stride = K;
  args.sampled = a.data_ptr<int64_t>();
  args.a_stride = L;
  args.qt = qt.data_ptr<int64_t>();
  args.qt_stride = K;
  args.q2 = q2.data_ptr<bool>();
  args.counts = counts.data_ptr<int64_t>();
  Tensor ws = workspace(select_workspace_bytes(args), s);
  check_cuda(select_launch(args, ws.data_ptr(), c10::cuda::getCurrentCUDAStream()), "select");
  return {qs, a, qt, q2, counts};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_fwd_cuda(
    const Tensor& s, const Tensor& t, const std::optional<Tensor>& teacher_topk,
    const std::optional<Tensor>& exclude, const Tensor& row_ids, int64_t K, int64_t M, int64_t L, double tau,
    double T, double beta, std::string_view mode, int64_t seed) {
  check_dense_args(s, t, teacher_topk, exclude, row_ids, K, M, L, mode);
  check_on_cuda(s);
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t B = s.size(0), W = 2 * K + L;
  Tensor loss = at::empty({B}, s.options().dtype(acc_dtype(s)));
  Tensor stats = at::empty({B, 5}, s.options().dtype(at::kFloat));
  Tensor idx = at::empty({B, W}, s.options().dtype(at::kLong));
  Tensor q2 = at::empty({B, K}, s.options().dtype(at::kBool));
  if (B == 0) return {loss, stats, idx, q2};
  Tensor given = teacher_topk.has_value() ? teacher_topk->contiguous() : Tensor();
  Tensor rows = row_ids.to(at::kLong).contiguous();
  SelectArgs args;
  fill_select(args, s, std::optional<Tensor>(t), given, exclude, rows, K, M, L, T, mode, seed);
  int64_t* ip = idx.data_ptr<int64_t>();
  args.qs = ip;
  args.sampled = ip + K;
  args.qt = ip + K + L;
  args.qs_stride = args.a_stride = args.qt_stride = W;
  args.q2 = q2.data_ptr<bool>();
  args.loss = loss.data_ptr();
  args.stats = stats.data_ptr<float>();
  args.tau = tau;
  args.beta = beta;
  Tensor ws = workspace(select_workspace_bytes(args), s);
  check_cuda(select_launch(args, ws.data_ptr(), c10::cuda::getCurrentCUDAStream()), "fused_fwd");
  return {loss, stats, idx, q2};
}

SubsetArgs subset_args(const Tensor& xs, const Tensor& ys, const Tensor& q2, const Tensor& gm, int64_t K,
                       int64_t L, double tau) {
  SubsetArgs a;
  a.B = xs.size(0);
  a.K = K;
  a.L = L;
  a.is_double = xs.scalar_type() == at::kDouble;
  a.s_g = xs.data_ptr();
  a.t_g = ys.data_ptr();
  a.q2 = q2.data_ptr<bool>();
  a.gamma = gm.data_ptr();
  a.tau = tau;
  return a;
}

std::tuple<Tensor, Tensor> subset_ce_fwd_cuda(const Tensor& s_g, const Tensor& t_g, const Tensor& q2_mask,
                                              const Tensor& gamma, int64_t K, int64_t L, double tau) {
  check_gathered_args(s_g, t_g, q2_mask, gamma, K, L);
  check_on_cuda(s_g);
  const c10::cuda::CUDAGuard guard(s_g.device());
  const int64_t B = s_g.size(0);
  const at::ScalarType acc = acc_dtype(s_g);
  Tensor loss = at::empty({B}, s_g.options().dtype(acc));
  Tensor parts = at::empty({B, 2}, s_g.options().dtype(acc));
  if (B == 0) return {loss, parts};
  Tensor xs = s_g.to(acc).contiguous(), ys = t_g.to(acc).contiguous();
  Tensor q2 = q2_mask.contiguous(), gm = gamma.to(acc).contiguous();
  SubsetArgs a = subset_args(xs, ys, q2, gm, K, L, tau);
  a.loss = loss.data_ptr();
  a.parts = parts.data_ptr();
  check_cuda(subset_fwd_launch(a, c10::cuda::getCurrentCUDAStream()), "subset_ce_fwd");
  return {loss, parts};
}

Tensor subset_ce_bwd_cuda(const Tensor& grad_rows, const Tensor& s_g, const Tensor& t_g, const Tensor& q2_mask,
                          const Tensor& gamma, int64_t K, int64_t L, double tau) {
  check_gathered_args(s_g, t_g, q2_mask, gamma, K, L);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == s_g.size(0), "grad_rows must have shape (B,)");
  check_on_cuda(s_g);
  const c10::cuda::CUDAGuard guard(s_g.device());
  const int64_t B = s_g.size(0), W = s_g.size(1);
  const at::ScalarType acc = acc_dtype(s_g);
  Tensor out = at::empty({B, W}, s_g.options().dtype(acc));
  if (B == 0) return out;
  Tensor xs = s_g.to(acc).contiguous(), ys = t_g.to(acc).contiguous();
  Tensor q2 = q2_mask.contiguous(), gm = gamma.to(acc).contiguous(), gr = grad_rows.to(acc).contiguous();
  SubsetArgs a = subset_args(xs, ys, q2, gm, K, L, tau);
  a.grad_rows = gr.data_ptr();
  a.grad = out.data_ptr();
  check_cuda(subset_bwd_launch(a, c10::cuda::getCurrentCUDAStream()), "subset_ce_bwd");
  return out;
}

Tensor fused_bwd_cuda(const Tensor& grad_rows, const Tensor& s, const Tensor& t, const Tensor& idx,
                      const Tensor& q2_mask, const Tensor& gamma, int64_t K, int64_t L, double tau) {
  check_fused_bwd_args(grad_rows, s, t, idx, q2_mask, gamma, K, L);
  check_on_cuda(s);
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t B = s.size(0);
  Tensor out = at::zeros({B, s.size(1)}, s.options());  // the gradient: the only (B, N) tensor
  if (B == 0) return out;
  const at::ScalarType acc = acc_dtype(s);
  Tensor ix = idx.contiguous(), q2 = q2_mask.contiguous();
  Tensor gm = gamma.to(acc).contiguous(), gr = grad_rows.to(acc).contiguous();
  FusedBwdArgs a;
  a.B = B;
  a.N = s.size(1);
  a.K = K;
  a.L = L;
  a.s = dense_of(s);
  a.t = dense_of(t);
  a.idx = ix.data_ptr<int64_t>();
  a.q2 = q2.data_ptr<bool>();
  a.gamma = gm.data_ptr();
  a.grad_rows = gr.data_ptr();
  a.tau = tau;
  a.out = out.data_ptr();
  Tensor ws = workspace(fused_bwd_workspace_bytes(a), s);
  check_cuda(fused_bwd_launch(a, ws.data_ptr(), c10::cuda::getCurrentCUDAStream()), "fused_bwd");
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace rcekd

TORCH_LIBRARY_IMPL(rcekd_C, CUDA, m) {
  m.impl("select", &rcekd::cuda::select_cuda);
  m.impl("subset_ce_fwd", &rcekd::cuda::subset_ce_fwd_cuda);
  m.impl("subset_ce_bwd", &rcekd::cuda::subset_ce_bwd_cuda);
  m.impl("fused_fwd", &rcekd::cuda::fused_fwd_cuda);
  m.impl("fused_bwd", &rcekd::cuda::fused_bwd_cuda);
}
