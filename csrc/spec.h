// The spec's own constants and rules (docs/LOSS.md), shared by the CPU and CUDA kernels:
// the C++ mirror of rcekd_kernels/spec.py. No torch header: the CUDA sources include it.
#pragma once

#include <cstdint>

namespace rcekd {
namespace spec {

// mode="official": a pool item's count is capped at this value (rcekd_kernels.spec.OFFICIAL_CAP).
constexpr int kOfficialCap = 50;

// Ranking order: larger score first, ties to the smaller item id; excluded items below every
// other item. Both kernels compare composite keys (order-preserving bits of the score, then the
// inverted item id), so the order is one integer comparison.

// gamma = exp(-beta * n / K), n = |Q1| (paper) or |QT & A| (official), in float32
// (rcekd_kernels.spec.gamma_from_counts).

}  // namespace spec
}  // namespace rcekd
