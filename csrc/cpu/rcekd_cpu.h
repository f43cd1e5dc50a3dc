// CPU kernels of the RCE-KD ops (see rcekd_kernels/backends/reference.py for the
// definition of each op; every output here equals the reference's).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace rcekd {
namespace cpu {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> select(
    const Tensor& s, const std::optional<Tensor>& t, const std::optional<Tensor>& teacher_topk,
    const std::optional<Tensor>& exclude, const Tensor& row_ids, int64_t K, int64_t M, int64_t L,
    double T, std::string_view mode, int64_t seed);

std::tuple<Tensor, Tensor> subset_ce_fwd(const Tensor& s_g, const Tensor& t_g, const Tensor& q2_mask,
                                         const Tensor& gamma, int64_t K, int64_t L, double tau);

Tensor subset_ce_bwd(const Tensor& grad_rows, const Tensor& s_g, const Tensor& t_g, const Tensor& q2_mask,
                     const Tensor& gamma, int64_t K, int64_t L, double tau);

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_fwd(
    const Tensor& s, const Tensor& t, const std::optional<Tensor>& teacher_topk,
    const std::optional<Tensor>& exclude, const Tensor& row_ids, int64_t K, int64_t M, int64_t L,
    double tau, double T, double beta, std::string_view mode, int64_t seed);

Tensor fused_bwd(const Tensor& grad_rows, const Tensor& s, const Tensor& t, const Tensor& idx,
                 const Tensor& q2_mask, const Tensor& gamma, int64_t K, int64_t L, double tau);

// out[b, w] = <user_vecs[b], item_vecs[idx[b, w]]> (gathered_cpu.cpp) and its gradient
Tensor gathered_dot(const Tensor& user_vecs, const Tensor& item_vecs, const Tensor& idx);

std::tuple<Tensor, Tensor> gathered_dot_bwd(const Tensor& grad, const Tensor& user_vecs, const Tensor& item_vecs,
                                            const Tensor& idx);

}  // namespace cpu
}  // namespace rcekd
