// The spec's counter-based RNG (section 4), shared by the CPU and CUDA kernels.
// No torch header: the CUDA sources include it too.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define RCEKD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RCEKD_HOST_DEVICE inline
#endif

namespace rcekd {
namespace rng {

RCEKD_HOST_DEVICE uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// k2 of a row: lowbias32(lowbias32(seed ^ 0x9E3779B9) ^ row_id), both taken mod 2^32
RCEKD_HOST_DEVICE uint32_t row_key(int64_t seed, int64_t row_id) {
  const uint32_t k1 = lowbias32(static_cast<uint32_t>(static_cast<uint64_t>(seed)) ^ 0x9E3779B9u);
  return lowbias32(k1 ^ static_cast<uint32_t>(static_cast<uint64_t>(row_id)));
}

// u = ((h >> 8) + 0.5) * 2^-24 for h = lowbias32(k2 ^ item), exact in float64
RCEKD_HOST_DEVICE double uniform01(uint32_t k2, int64_t item) {
  const uint32_t h = lowbias32(k2 ^ static_cast<uint32_t>(static_cast<uint64_t>(item)));
  return (static_cast<double>(h >> 8) + 0.5) * 5.9604644775390625e-08;
}

}  // namespace rng
}  // namespace rcekd
