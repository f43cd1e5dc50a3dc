// CPU kernels of the gathered dot product out[b, w] = <u[b], v[idx[b, w]]> and its
// gradient (rcekd_kernels/gathered.py defines them; its torch version is the oracle).
//
// Neither direction makes the (B, W, D) tensor of gathered item vectors that
// index_select + bmm would make (and its (B, W, D) gradient): the forward reads
// the item rows in place, the backward accumulates grad_v straight into its rows.
// grad_u runs rows in parallel; grad_v sorts the (b, w) terms by item (a stable counting
// sort) and runs items in parallel, so every grad_v row is summed in the same (b, w) order
// whatever the number of threads: deterministic results.
#include "rcekd_cpu.h"

#include "../binding.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>
#include <type_traits>

namespace rcekd {
namespace cpu {
namespace {

template <typename F>
void dispatch_real(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    default: TORCH_CHECK(false, msg("gathered_dot: vectors must be float32 or float64, got ", c10::toString(st)));
  }
}

void check_args(const Tensor& u, const Tensor& v, const Tensor& idx) {
  TORCH_CHECK(u.dim() == 2 && v.dim() == 2, "gathered_dot: user_vecs (B, D) and item_vecs (N, D) must be 2-D");
  TORCH_CHECK(u.size(1) == v.size(1), msg("gathered_dot: user_vecs has D = ", u.size(1), " but item_vecs has D = ",
                                          v.size(1)));
  TORCH_CHECK(u.scalar_type() == v.scalar_type(), "gathered_dot: user_vecs and item_vecs must have one dtype");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == u.size(0),
              "gathered_dot: idx must be int64 of shape (B, W)");
  const int64_t N = v.size(0);
  const int64_t* p = idx.data_ptr<int64_t>();
  const int64_t n = idx.numel();
  int64_t lo = 0, hi = 0;
  for (int64_t i = 0; i < n; ++i) {  // a bad id is an error here, not a read out of bounds below
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
  }
  TORCH_CHECK(n == 0 || (lo >= 0 && hi < N),
              msg("gathered_dot: idx holds ids outside [0, ", N, "): min ", lo, ", max ", hi));
}

// The dot product of two rows: 8 independent partial sums (vectorised, and no chain of D
// dependent additions), joined in a fixed order: the same result for the same inputs on
// every call and thread count.
template <typename T>
inline T dot(const T* a, const T* b, int64_t D) {
  constexpr int64_t L = 8;
  T acc[L] = {};
  int64_t d = 0;
  for (; d + L <= D; d += L)
    for (int64_t k = 0; k < L; ++k) acc[k] += a[d + k] * b[d + k];
  T tail = 0;
  for (; d < D; ++d) tail += a[d] * b[d];
  return (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))) + tail;
}

// Columns are summed in chunks of C kept in registers over a whole loop of terms.
constexpr int64_t C = 16;

// out[0:n] = sum_k coef(k) * rows(k)[0:n] over k = 0..count-1 in order, each column starting at 0 (the order
// and the rounding of a plain loop `out[d] += coef * row[d]`: bit for bit the same sums).
template <typename T, typename Coef, typename Row>
inline void axpy_sum(T* out, int64_t D, int64_t count, Coef coef, Row row) {
  for (int64_t d0 = 0; d0 < D; d0 += C) {
    T acc[C] = {};
    if (d0 + C <= D) {
      for (int64_t k = 0; k < count; ++k) {
        const T c = coef(k);
        const T* r = row(k) + d0;
        for (int64_t j = 0; j < C; ++j) acc[j] += c * r[j];
      }
      std::copy(acc, acc + C, out + d0);
    } else {
      const int64_t n = D - d0;
      for (int64_t k = 0; k < count; ++k) {
        const T c = coef(k);
        const T* r = row(k) + d0;
        for (int64_t j = 0; j < n; ++j) acc[j] += c * r[j];
      }
      std::copy(acc, acc + n, out + d0);
    }
  }
}

}  // namespace

Tensor gathered_dot(const Tensor& user_vecs, const Tensor& item_vecs, const Tensor& idx_in) {
  const Tensor u = user_vecs.contiguous(), v = item_vecs.contiguous(), idx = idx_in.contiguous();
  check_args(u, v, idx);
  const int64_t B = idx.size(0), W = idx.size(1), D = u.size(1);
  Tensor out = at::empty({B, W}, u.options());
  dispatch_real(u.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* up = u.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t w = 0; w < W; ++w) {
          if (w + 8 < W) __builtin_prefetch(vp + ip[b * W + w + 8] * D);  // rows are read at random
          op[b * W + w] = dot(up + b * D, vp + ip[b * W + w] * D, D);
        }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> gathered_dot_bwd(const Tensor& grad_in, const Tensor& user_vecs, const Tensor& item_vecs,
                                            const Tensor& idx_in) {
  const Tensor u = user_vecs.contiguous(), v = item_vecs.contiguous(), idx = idx_in.contiguous();
  check_args(u, v, idx);
  const Tensor g = grad_in.to(u.scalar_type()).contiguous();
  TORCH_CHECK(g.sizes() == idx.sizes(), "gathered_dot_bwd: grad must have the shape of idx");
  const int64_t B = idx.size(0), W = idx.size(1), D = u.size(1), N = v.size(0);
  TORCH_CHECK(B < (int64_t{1} << 31) && (N == 0 || B * W <= std::numeric_limits<int64_t>::max() / N),
              msg("gathered_dot_bwd (cpp): B = ", B, " rows of W = ", W, " items over N = ", N,
                  " items is too large"));
  Tensor gu = at::empty({B, D}, u.options());
  Tensor gv = at::zeros({N, D}, v.options());
  dispatch_real(u.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* up = u.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    const T* gp = g.data_ptr<T>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    T* gup = gu.data_ptr<T>();
    T* gvp = gv.data_ptr<T>();
    // grad_u[b] = sum_w g[b, w] v[idx[b, w]], w in order
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const T* gb = gp + b * W;
        const int64_t* ib = ip + b * W;
        axpy_sum(gup + b * D, D, W, [&](int64_t w) { return gb[w]; }, [&](int64_t w) { return vp + ib[w] * D; });
      }
    });
    // grad_v[i] = sum over (b, w) with idx[b, w] = i of g[b, w] u[b], in (b, w) order: the terms are put in
    // order of their item (a stable counting sort, or a sort of (item, position) keys when the catalogue is
    // much larger than the terms), then the items that have terms run in parallel, each summing its own
    // contiguous terms; the same sums whatever the number of threads
    const int64_t n = B * W;
    std::vector<int32_t> term_user(n);
    std::vector<T> term_coef(n);
    std::vector<int64_t> run_item, run_start;  // the items with terms, ascending, and where their terms start
    if (N <= 4 * n) {
      std::vector<int64_t> start(N + 1, 0);
      for (int64_t e = 0; e < n; ++e) ++start[ip[e] + 1];
      for (int64_t i = 0; i < N; ++i) start[i + 1] += start[i];
      std::vector<int64_t> next(start.begin(), start.end() - 1);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t e = b * W; e < (b + 1) * W; ++e) {
          const int64_t slot = next[ip[e]]++;
          term_user[slot] = static_cast<int32_t>(b);
          term_coef[slot] = gp[e];
        }
      for (int64_t i = 0; i < N; ++i)
        if (start[i + 1] > start[i]) {
          run_item.push_back(i);
          run_start.push_back(start[i]);
        }
    } else {
      std::vector<int64_t> key(n);  // item * n + position: sorted, the terms of an item in (b, w) order
      for (int64_t e = 0; e < n; ++e) key[e] = ip[e] * n + e;
      std::sort(key.begin(), key.end());
      for (int64_t k = 0; k < n; ++k) {
        const int64_t item = key[k] / n, e = key[k] - item * n;
        if (run_item.empty() || run_item.back() != item) {
          run_item.push_back(item);
          run_start.push_back(k);
        }
        term_user[k] = static_cast<int32_t>(e / W);
        term_coef[k] = gp[e];
      }
    }
    run_start.push_back(n);
    const int64_t runs = static_cast<int64_t>(run_item.size());
    at::parallel_for(0, runs, 512, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t s0 = run_start[r], cnt = run_start[r + 1] - s0;
        const int32_t* tu = term_user.data() + s0;
        const T* tc = term_coef.data() + s0;
        axpy_sum(gvp + run_item[r] * D, D, cnt, [&](int64_t k) { return tc[k]; },
                 [&](int64_t k) { return up + tu[k] * D; });
      }
    });
  });
  return {gu, gv};
}

}  // namespace cpu
}  // namespace rcekd
