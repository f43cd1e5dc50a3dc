// CPU kernel of the layer-mean propagation of a graph model (LightGCN):
//
//   forward   out = (x + A x + A^2 x + ... + A^L x) / (L + 1)
//   backward  out = h + A (h + A (h + ... (h + A h))),  h = x / (L + 1)   (A symmetric: the gradient)
//
// for x the rows of `parts` one after the other (users then items) and A a sparse CSR matrix
// (rcekd_kernels/graph.py defines the op; its torch formulation is the oracle). The columns run in
// blocks of 64: a block of every row (7.8 MB for 30,400 rows) stays in the cache through the L
// products, where whole (rows, D) matrices would stream from memory at every product. Within a block,
// one pass per layer computes each row's product with its accumulators in vector registers and adds it
// into the running sum in the same pass (no separate copy, add and divide passes).
//
// Every output element is the sum of its row's terms in CSR order by fused multiply-adds from zero,
// then the layer terms added in order: the values of torch.sparse.mm on a CSR matrix followed by the
// same additions (equal to the bit on an x86-64 CPU with FMA). Rows are split between threads, each
// row computed by one thread: the same result whatever the number of threads.
#include "rcekd_cpu.h"

#include "../binding.h"

#include <ATen/Parallel.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RCEKD_X86 1
#endif

namespace rcekd {
namespace cpu {
namespace {

// What a pass does with the product p = (A y)[r] of row r:
enum class Epilogue {
  kNext,   // forward, not the last layer: next[r] = p, acc[r] += p
  kFinal,  // forward, the last layer:     acc[r] = (acc[r] + p) / div
  kAdd,    // backward:                     next[r] = h[r] + p
};

struct Pass {
  const int64_t* crow;  // (R + 1) row offsets (int64 copies of the CSR's)
  const int32_t* col;   // column ids
  const float* val;     // values
  const float* y;       // (R, W) the layer's input block
  float* next;          // (R, W) the layer's output block (kNext, kAdd)
  float* acc;           // (R, W) the running sum (kNext, kFinal)
  const float* h;       // (R, W) x / (L + 1) (kAdd)
  float div;            // L + 1 (kFinal)
  int64_t W;            // columns of the block
};

// Rows [r0, r1) of one pass, any width (scalar fused multiply-adds: the fallback and the narrow tails).
template <Epilogue E>
void pass_rows_scalar(const Pass& p, int64_t r0, int64_t r1) {
  const int64_t W = p.W;
  std::vector<float> s(static_cast<size_t>(W));
  for (int64_t r = r0; r < r1; ++r) {
    std::fill(s.begin(), s.end(), 0.f);
    for (int64_t j = p.crow[r]; j < p.crow[r + 1]; ++j) {
      const float v = p.val[j];
      const float* row = p.y + static_cast<int64_t>(p.col[j]) * W;
      for (int64_t k = 0; k < W; ++k) s[k] = std::fma(v, row[k], s[k]);
    }
    const int64_t o = r * W;
    for (int64_t k = 0; k < W; ++k) {
      if (E == Epilogue::kNext) {
        p.next[o + k] = s[k];
        p.acc[o + k] += s[k];
      } else if (E == Epilogue::kFinal) {
        p.acc[o + k] = (p.acc[o + k] + s[k]) / p.div;
      } else {
        p.next[o + k] = p.h[o + k] + s[k];
      }
    }
  }
}

#ifdef RCEKD_X86
// Rows [r0, r1) of one pass with a block of W = 16 V columns held in V 512-bit registers. The rows
// read are prefetched a few non-zeros ahead (they are read at random).
template <Epilogue E, int V>
__attribute__((target("avx512f"))) void pass_rows_avx512(const Pass& p, int64_t r0, int64_t r1) {
  constexpr int64_t W = 16 * V;
  constexpr int64_t kAhead = 8;
  const int64_t end = p.crow[r1];
  const __m512 div = _mm512_set1_ps(p.div);
  for (int64_t r = r0; r < r1; ++r) {
    __m512 s[V];
    for (int v = 0; v < V; ++v) s[v] = _mm512_setzero_ps();
    for (int64_t j = p.crow[r]; j < p.crow[r + 1]; ++j) {
      if (j + kAhead < end) {
        const char* q = reinterpret_cast<const char*>(p.y + static_cast<int64_t>(p.col[j + kAhead]) * W);
        for (int v = 0; v < V; ++v) __builtin_prefetch(q + 64 * v);
      }
      const __m512 a = _mm512_set1_ps(p.val[j]);
      const float* row = p.y + static_cast<int64_t>(p.col[j]) * W;
      for (int v = 0; v < V; ++v) s[v] = _mm512_fmadd_ps(a, _mm512_loadu_ps(row + 16 * v), s[v]);
    }
    const int64_t o = r * W;
    for (int v = 0; v < V; ++v) {
      const int64_t at = o + 16 * v;
      if (E == Epilogue::kNext) {
        _mm512_storeu_ps(p.next + at, s[v]);
        _mm512_storeu_ps(p.acc + at, _mm512_add_ps(_mm512_loadu_ps(p.acc + at), s[v]));
      } else if (E == Epilogue::kFinal) {
        _mm512_storeu_ps(p.acc + at, _mm512_div_ps(_mm512_add_ps(_mm512_loadu_ps(p.acc + at), s[v]), div));
      } else {
        _mm512_storeu_ps(p.next + at, _mm512_add_ps(_mm512_loadu_ps(p.h + at), s[v]));
      }
    }
  }
}

// The same with 256-bit registers (W = 8 V columns), for CPUs with AVX2 and FMA but no AVX-512.
template <Epilogue E, int V>
__attribute__((target("avx2,fma"))) void pass_rows_avx2(const Pass& p, int64_t r0, int64_t r1) {
  constexpr int64_t W = 8 * V;
  constexpr int64_t kAhead = 8;
  const int64_t end = p.crow[r1];
  const __m256 div = _mm256_set1_ps(p.div);
  for (int64_t r = r0; r < r1; ++r) {
    __m256 s[V];
    for (int v = 0; v < V; ++v) s[v] = _mm256_setzero_ps();
    for (int64_t j = p.crow[r]; j < p.crow[r + 1]; ++j) {
      if (j + kAhead < end) {
        const char* q = reinterpret_cast<const char*>(p.y + static_cast<int64_t>(p.col[j + kAhead]) * W);
        for (int v = 0; v < V; v += 2) __builtin_prefetch(q + 32 * v);
      }
      const __m256 a = _mm256_set1_ps(p.val[j]);
      const float* row = p.y + static_cast<int64_t>(p.col[j]) * W;
      for (int v = 0; v < V; ++v) s[v] = _mm256_fmadd_ps(a, _mm256_loadu_ps(row + 8 * v), s[v]);
    }
    const int64_t o = r * W;
    for (int v = 0; v < V; ++v) {
      const int64_t at = o + 8 * v;
      if (E == Epilogue::kNext) {
        _mm256_storeu_ps(p.next + at, s[v]);
        _mm256_storeu_ps(p.acc + at, _mm256_add_ps(_mm256_loadu_ps(p.acc + at), s[v]));
      } else if (E == Epilogue::kFinal) {
        _mm256_storeu_ps(p.acc + at, _mm256_div_ps(_mm256_add_ps(_mm256_loadu_ps(p.acc + at), s[v]), div));
      } else {
        _mm256_storeu_ps(p.next + at, _mm256_add_ps(_mm256_loadu_ps(p.h + at), s[v]));
      }
    }
  }
}

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa best_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kScalar;
  }();
  return isa;
}
#endif

template <Epilogue E>
void pass_rows(const Pass& p, int64_t r0, int64_t r1) {
#ifdef RCEKD_X86
  const Isa isa = best_isa();
  if (isa == Isa::kAvx512) {
    switch (p.W) {
      case 64: return pass_rows_avx512<E, 4>(p, r0, r1);
      case 48: return pass_rows_avx512<E, 3>(p, r0, r1);
      case 32: return pass_rows_avx512<E, 2>(p, r0, r1);
      case 16: return pass_rows_avx512<E, 1>(p, r0, r1);
      default: break;
    }
  }
  if (isa != Isa::kScalar) {
    switch (p.W) {
      case 64: return pass_rows_avx2<E, 8>(p, r0, r1);
      case 56: return pass_rows_avx2<E, 7>(p, r0, r1);
      case 48: return pass_rows_avx2<E, 6>(p, r0, r1);
      case 40: return pass_rows_avx2<E, 5>(p, r0, r1);
      case 32: return pass_rows_avx2<E, 4>(p, r0, r1);
      case 24: return pass_rows_avx2<E, 3>(p, r0, r1);
      case 16: return pass_rows_avx2<E, 2>(p, r0, r1);
      case 8: return pass_rows_avx2<E, 1>(p, r0, r1);
      default: break;
    }
  }
#endif
  pass_rows_scalar<E>(p, r0, r1);
}

template <Epilogue E>
void run_pass(const Pass& p, int64_t R) {
  at::parallel_for(0, R, 1024, [&](int64_t r0, int64_t r1) { pass_rows<E>(p, r0, r1); });
}

// The widths of the column blocks: 64 at a time, the rest split into vector widths (multiples of 16,
// then of 8) and a last scalar block, e.g. 2000 = 31 x 64 + 16 and 20 = 16 + 4.
// rows ahead that the block copies prefetch (the gather from and the scatter to the (rows, D) parts)
constexpr int64_t kRowsAhead = 8;

std::vector<std::pair<int64_t, int64_t>> column_blocks(int64_t D) {
  std::vector<std::pair<int64_t, int64_t>> b;
  int64_t c = 0;
  for (; c + 64 <= D; c += 64) b.emplace_back(c, 64);
  const int64_t rest16 = (D - c) / 16 * 16;
  if (rest16) b.emplace_back(c, rest16), c += rest16;
  const int64_t rest8 = (D - c) / 8 * 8;
  if (rest8) b.emplace_back(c, rest8), c += rest8;
  if (c < D) b.emplace_back(c, D - c);
  return b;
}

}  // namespace

std::vector<Tensor> csr_layer_mean(const Tensor& crow_in, const Tensor& col_in, const Tensor& val_in,
                                   at::TensorList parts, int64_t layers, bool backward) {
  TORCH_CHECK(layers >= 0, msg("csr_layer_mean: layers must be >= 0, got ", layers));
  TORCH_CHECK(!parts.empty(), "csr_layer_mean: parts must hold at least one (rows, D) matrix");
  const int64_t D = parts[0].size(1);
  int64_t R = 0;
  for (const Tensor& t : parts) {
    TORCH_CHECK(t.dim() == 2 && t.size(1) == D && t.scalar_type() == at::kFloat && t.device().is_cpu(),
                "csr_layer_mean: parts must be float32 CPU matrices with one number of columns");
    R += t.size(0);
  }
  TORCH_CHECK(crow_in.dim() == 1 && crow_in.numel() == R + 1, msg("csr_layer_mean: crow_indices must have rows + 1 = ",
                                                                  R + 1, " entries, got ", crow_in.numel()));
  TORCH_CHECK(val_in.scalar_type() == at::kFloat && val_in.dim() == 1 && col_in.dim() == 1 &&
                  col_in.numel() == val_in.numel(),
              "csr_layer_mean: values must be float32 and as many as col_indices");
  TORCH_CHECK(R < (int64_t(1) << 31), msg("csr_layer_mean: at most 2^31 - 1 rows, got ", R));
  TORCH_CHECK(at::isIntegralType(crow_in.scalar_type(), /*includeBool=*/false) &&
                  at::isIntegralType(col_in.scalar_type(), /*includeBool=*/false),
              "csr_layer_mean: crow_indices and col_indices must be integer tensors");
  // the ids are checked in their own dtype, before the narrowing to int32 could wrap a bad one into range
  if (col_in.numel() > 0) {
    const auto [lo, hi] = at::aminmax(col_in);  // one pass
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < R,
                msg("csr_layer_mean: col_indices holds ids outside [0, ", R, ")"));
  }
  const Tensor crow = crow_in.to(at::kLong).contiguous();
  const Tensor col = col_in.to(at::kInt).contiguous();
  const Tensor val = val_in.contiguous();
  const int64_t nnz = col.numel();
  const int64_t* cp = crow.data_ptr<int64_t>();
  const int32_t* colp = col.data_ptr<int32_t>();  // every id in [0, R): checked above
  TORCH_CHECK(cp[0] == 0 && cp[R] == nnz, "csr_layer_mean: crow_indices must run from 0 to nnz");
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(cp[r] <= cp[r + 1], "csr_layer_mean: crow_indices must be non-decreasing");

  std::vector<Tensor> in, outs;
  for (const Tensor& t : parts) {
    in.push_back(t.contiguous());
    outs.push_back(at::empty({t.size(0), D}, t.options()));
  }
  if (R == 0 || D == 0) return outs;
  const float div = static_cast<float>(layers + 1);
  std::vector<float> x(static_cast<size_t>(R * 64)), a(x.size()), b(x.size()), acc(x.size());

  for (const auto& [c, W] : column_blocks(D)) {
    const int64_t n = R * W;
    // the block's input, rows of every part one after the other (x: the contiguous copy)
    at::parallel_for(0, R, 4096, [&](int64_t r0, int64_t r1) {
      int64_t base = 0;
      for (const Tensor& t : in) {
        const int64_t lo = std::max(r0, base), hi = std::min(r1, base + t.size(0));
        const float* src = t.data_ptr<float>();
        for (int64_t r = lo; r < hi; ++r) {
          if (r + kRowsAhead < hi)  // rows D apart: beyond the hardware prefetcher's reach
            for (int64_t q = 0; q < W; q += 16) __builtin_prefetch(src + (r + kRowsAhead - base) * D + c + q);
          std::copy_n(src + (r - base) * D + c, W, x.data() + r * W);
        }
        base += t.size(0);
      }
    });
    const float* result = nullptr;
    Pass p{cp, colp, val.data_ptr<float>(), nullptr, nullptr, nullptr, nullptr, div, W};
    if (!backward) {
      std::copy_n(x.data(), n, acc.data());
      p.y = x.data();
      p.acc = acc.data();
      float* bufs[2] = {a.data(), b.data()};
      for (int64_t l = 0; l < layers; ++l) {
        if (l + 1 == layers) {
          run_pass<Epilogue::kFinal>(p, R);
        } else {
          p.next = bufs[l % 2];
          run_pass<Epilogue::kNext>(p, R);
          p.y = p.next;
        }
      }
      if (layers == 0)
        for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] / div;
      result = acc.data();
    } else {
      for (int64_t i = 0; i < n; ++i) acc[i] = x[i] / div;  // h
      p.h = acc.data();
      p.y = acc.data();
      float* bufs[2] = {a.data(), b.data()};
      for (int64_t l = 0; l < layers; ++l) {
        p.next = bufs[l % 2];
        run_pass<Epilogue::kAdd>(p, R);
        p.y = p.next;
      }
      result = p.y;
    }
    at::parallel_for(0, R, 4096, [&](int64_t r0, int64_t r1) {
      int64_t base = 0;
      for (Tensor& t : outs) {
        const int64_t lo = std::max(r0, base), hi = std::min(r1, base + t.size(0));
        float* dst = t.data_ptr<float>();
        for (int64_t r = lo; r < hi; ++r) {
          if (r + kRowsAhead < hi)
            for (int64_t q = 0; q < W; q += 16) __builtin_prefetch(dst + (r + kRowsAhead - base) * D + c + q, 1);
          std::copy_n(result + r * W, W, dst + (r - base) * D + c);
        }
        base += t.size(0);
      }
    });
  }
  return outs;
}

}  // namespace cpu
}  // namespace rcekd
