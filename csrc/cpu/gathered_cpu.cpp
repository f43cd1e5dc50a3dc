// CPU kernels of the gathered dot product out[b, w] = <u[b], v[idx[b, w]]> and its
// gradient (rcekd_kernels/gathered.py defines them; its torch version is the oracle).
//
// Neither direction makes the (B, W, D) tensor of gathered item vectors that
// index_select + bmm would make (and its (B, W, D) gradient): the forward reads
// the item rows in place, the backward accumulates grad_v straight into its rows.
// grad_v is one scatter in (b, w) order on one thread while the others run grad_u's rows,
// so every gradient row is summed in the same order whatever the number of threads:
// deterministic results.
#include "rcekd_cpu.h"

#include "../binding.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
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
    // grad_u[b] = sum_w g[b, w] v[idx[b, w]], w in order (rows b0..b1)
    auto grad_u_rows = [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T* o = gup + b * D;
        std::fill(o, o + D, T(0));
        for (int64_t w = 0; w < W; ++w) {
          if (w + 8 < W) __builtin_prefetch(vp + ip[b * W + w + 8] * D);  // rows are read at random
          const T c = gp[b * W + w];
          const T* row = vp + ip[b * W + w] * D;
          for (int64_t d = 0; d < D; ++d) o[d] += c * row[d];
        }
      }
    };
    // grad_v[i] = sum over (b, w) with idx[b, w] = i of g[b, w] u[b], one scatter in (b, w) order: the same sums
    // whatever the number of threads (faster than sorting the terms by item: measured at B = 2048, W = 250)
    auto grad_v_all = [&]() {
      for (int64_t b = 0; b < B; ++b) {
        const T* ub = up + b * D;
        for (int64_t w = 0; w < W; ++w) {
          if (w + 8 < W) __builtin_prefetch(gvp + ip[b * W + w + 8] * D, 1);  // rows are updated at random
          const T c = gp[b * W + w];
          T* o = gvp + ip[b * W + w] * D;
          for (int64_t d = 0; d < D; ++d) o[d] += c * ub[d];
        }
      }
    };
    // task 0 runs the scatter, then a small share of the rows (the scatter costs about 0.6 of the rows' work);
    // the other tasks split the remaining rows
    const int64_t T_ = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B + 1));
    if (T_ == 1) {
      grad_u_rows(0, B);
      grad_v_all();
    } else {
      const double share0 = std::max(0.0, 1.6 / static_cast<double>(T_) - 0.6);  // of the rows (cost 1)
      const int64_t rows0 = std::min<int64_t>(B, static_cast<int64_t>(share0 * static_cast<double>(B)));
      at::parallel_for(0, T_, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          if (t == 0) {
            grad_v_all();
            grad_u_rows(0, rows0);
          } else {
            const int64_t lo = rows0 + (B - rows0) * (t - 1) / (T_ - 1), hi = rows0 + (B - rows0) * t / (T_ - 1);
            grad_u_rows(lo, hi);
          }
        }
      });
    }
  });
  return {gu, gv};
}

}  // namespace cpu
}  // namespace rcekd
