// CPU kernels of the RCE-KD ops (see rcekd_kernels/backends/reference.py for the
// definition of each op; every output here equals the reference's). The ops rcekd_C::*
// reach them through the binding helper (../binding.h), which checks the arguments,
// allocates the outputs and fills the argument structs (../args.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <tuple>
#include <vector>

#include "../args.h"

namespace rcekd {
namespace cpu {

using at::Tensor;

// The Impl of register_ops<Impl> (../binding.h) for the CPU dispatch key.
struct Kernels {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  static constexpr bool kZeroFilledGrad = false;  // fused_bwd zeroes each row itself
  static void select(const SelectArgs& a, const Tensor& like);
  static void fused_fwd(const SelectArgs& a, const Tensor& like);
  static void subset_fwd(const SubsetArgs& a, const Tensor& like);
  static void subset_bwd(const SubsetArgs& a, const Tensor& like);
  static void fused_bwd(const FusedBwdArgs& a, const Tensor& like);
};

// out[b, w] = <user_vecs[b], item_vecs[idx[b, w]]> (gathered_cpu.cpp) and its gradient
Tensor gathered_dot(const Tensor& user_vecs, const Tensor& item_vecs, const Tensor& idx);

std::tuple<Tensor, Tensor> gathered_dot_bwd(const Tensor& grad, const Tensor& user_vecs, const Tensor& item_vecs,
                                            const Tensor& idx);

// LightGCN's layer-mean propagation of the rows of `parts` over the CSR matrix (crow, col, val)
// and its gradient (graph_cpu.cpp)
std::vector<Tensor> csr_layer_mean(const Tensor& crow, const Tensor& col, const Tensor& val, at::TensorList parts,
                                   int64_t layers, bool backward);

}  // namespace cpu
}  // namespace rcekd
