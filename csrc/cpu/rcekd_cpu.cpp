// CPU kernels of the RCE-KD ops.
//
// One row of the batch is one unit of work; rows run in parallel with
// at::parallel_for. For each row:
//   * the student's top-M pool and the teacher's top-K are selected with
//     std::nth_element on 64-bit (128-bit for float64) composite keys
//     (order-preserving bits of the score, then the inverted item id), so the
//     order "score descending, item ascending" is one integer comparison; only
//     the M (K) selected keys are then sorted, never the whole row;
//   * excluded items get the smallest key, so they rank below every other item;
//   * the positions of the teacher's items in the pool are found by binary
//     search of their composite keys in the sorted pool;
//   * the integer counts of both modes are suffix counts over the M positions;
//   * the Gumbel keys float32(c/T + g) use the spec's counter-based RNG; u and
//     g = -log(-log u) are float64, g computed with at::log on a (rows, M) buffer
//     (the reference's torch.log), c/T and the sum in float64, rounded once;
//   * top-L of the keys again by nth_element + sort of the L winners.
// Arithmetic of the losses is float32 for float16/bfloat16/float32 inputs and
// float64 for float64 inputs. No temporary of size B x N is made: inputs are
// read through their strides, and the only (B, N) tensor is fused_bwd's output.
#include "rcekd_cpu.h"

#include "../binding.h"
#include "../rng.h"
#include "../spec.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/log.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

namespace rcekd {
namespace cpu {
namespace {

using u32 = uint32_t;
using u64 = uint64_t;
using u128 = unsigned __int128;

constexpr int64_t kOfficialCap = spec::kOfficialCap;  // ../spec.h

// ------------------------------------------------------------------ RNG (spec 4): csrc/rng.h
using rng::row_key;
using rng::uniform01;

// ------------------------------------------------------- order-preserving keys
// Branch-free (the signs of scores are random: a branch would mispredict half the time).
inline u32 ord32(float f) {
  f = f + 0.0f;  // -0 -> +0: ties with +0
  u32 u;
  std::memcpy(&u, &f, 4);
  return u ^ (static_cast<u32>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
}

inline u64 ord64(double d) {
  d = d + 0.0;
  u64 u;
  std::memcpy(&u, &d, 8);
  return u ^ (static_cast<u64>(static_cast<int64_t>(u) >> 63) | (u64{1} << 63));
}

// Composite key of item j: larger means ranked higher (score desc, then id asc).
// Excluded items get ord = 0, below every real score.
template <typename S>
struct Rank {  // float16 / bfloat16 / float32: compared as float32
  using comp_t = u64;
  static comp_t make(S v, int64_t j, bool excluded) {
    const u64 o = ord32(static_cast<float>(v)) & (u64{0} - static_cast<u64>(!excluded));
    return (o << 32) | static_cast<u64>(0xFFFFFFFFu - static_cast<u32>(j));
  }
  static int64_t item(comp_t c) { return static_cast<int64_t>(0xFFFFFFFFu - static_cast<u32>(c)); }
};

template <>
struct Rank<double> {
  using comp_t = u128;
  static comp_t make(double v, int64_t j, bool excluded) {
    const u64 o = ord64(v) & (u64{0} - static_cast<u64>(!excluded));
    return (static_cast<u128>(o) << 64) | static_cast<u128>(~static_cast<u64>(j));
  }
  static int64_t item(comp_t c) { return static_cast<int64_t>(~static_cast<u64>(c)); }
};

// Per-thread buffers, reused across the rows of a thread.
struct Scratch {
  std::vector<u64> s64, t64, c64;       // composite keys of a row (student, teacher, candidates)
  std::vector<u128> s128, t128, c128;  // the same for float64 scores
  std::vector<u64> keys, work;   // Gumbel keys of the pool
  std::vector<int32_t> mark;
  template <typename C>
  std::vector<C>& sbuf();
  template <typename C>
  std::vector<C>& tbuf();
  template <typename C>
  std::vector<C>& cbuf();
};
template <>
std::vector<u64>& Scratch::sbuf<u64>() { return s64; }
template <>
std::vector<u128>& Scratch::sbuf<u128>() { return s128; }
template <>
std::vector<u64>& Scratch::tbuf<u64>() { return t64; }
template <>
std::vector<u64>& Scratch::cbuf<u64>() { return c64; }
template <>
std::vector<u128>& Scratch::cbuf<u128>() { return c128; }
template <>
std::vector<u128>& Scratch::tbuf<u128>() { return t128; }

template <typename F>
void dispatch_float(int code, F&& f) {  // code: a dtype code of args.h
  switch (code) {
    case kF32: f(float{}); break;
    case kF64: f(double{}); break;
    case kF16: f(c10::Half{}); break;
    case kBF16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "rcekd: unsupported score dtype");
  }
}

// The first k items of one row in ranking order, as sorted composite keys in buf[0, k).
//
// When k is small against N, a threshold estimated from an even sample of the keys
// first drops most of the row in one pass that keeps only the keys >= the estimate
// (no buffer of N keys is written): if at least k keys pass, the top k of the row are
// all among them (exact, keys are unique) and only those few are partitioned; else the
// whole row is (rare: the estimate keeps ~1.5 k + 16 N / 1024 keys).
template <typename S>
void ranked_topk_row(const S* x, int64_t sx, const bool* ex, int64_t sex, int64_t N, int64_t k,
                     std::vector<typename Rank<S>::comp_t>& buf, std::vector<typename Rank<S>::comp_t>& cand) {
  using C = typename Rank<S>::comp_t;
  constexpr int64_t kSample = 1024;
  if (N >= 4 * kSample && k * 8 <= N) {
    const int64_t step = N / kSample;
    cand.resize(kSample);
    for (int64_t i = 0; i < kSample; ++i)
      cand[i] = Rank<S>::make(x[i * step * sx], i * step, ex != nullptr && ex[i * step * sex]);
    const int64_t r = std::min<int64_t>(kSample - 1, (k * kSample) / N * 3 / 2 + 16);
    std::nth_element(cand.begin(), cand.begin() + r, cand.end(), std::greater<C>());
    const C tau = cand[r];
    cand.clear();
    const u32 o_tau = static_cast<u32>(tau >> (8 * sizeof(C) / 2));  // the score part of the key
    if constexpr (std::is_same_v<C, u64>) {
      if (o_tau != 0) {  // tau is not an excluded item's key: prefilter on the float score
        // inverse of ord32: the float32 whose key has the score part o_tau
        const u32 bits = (o_tau & 0x80000000u) ? (o_tau ^ 0x80000000u) : ~o_tau;
        float tf;
        std::memcpy(&tf, &bits, 4);
        for (int64_t j = 0; j < N; ++j) {
          const float v = static_cast<float>(x[j * sx]);
          if (!(v < tf)) {  // scores below tf have keys below tau (NaN goes on to the exact test)
            const C c = Rank<S>::make(x[j * sx], j, ex != nullptr && ex[j * sex]);
            if (c >= tau) cand.push_back(c);
          }
        }
        goto filtered;
      }
    }
    if (ex == nullptr) {
      for (int64_t j = 0; j < N; ++j) {
        const C c = Rank<S>::make(x[j * sx], j, false);
        if (c >= tau) cand.push_back(c);
      }
    } else {
      for (int64_t j = 0; j < N; ++j) {
        const C c = Rank<S>::make(x[j * sx], j, ex[j * sex]);
        if (c >= tau) cand.push_back(c);
      }
    }
  filtered:
    if (static_cast<int64_t>(cand.size()) >= k) {
      if (static_cast<int64_t>(cand.size()) > k)
        std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), std::greater<C>());
      std::sort(cand.begin(), cand.begin() + k, std::greater<C>());
      if (static_cast<int64_t>(buf.size()) < k) buf.resize(k);
      std::copy(cand.begin(), cand.begin() + k, buf.begin());
      return;
    }
  }
  buf.resize(N);
  C* b = buf.data();
  if (ex == nullptr) {
    for (int64_t j = 0; j < N; ++j) b[j] = Rank<S>::make(x[j * sx], j, false);
  } else {
    for (int64_t j = 0; j < N; ++j) b[j] = Rank<S>::make(x[j * sx], j, ex[j * sex]);
  }
  if (k < N) std::nth_element(b, b + (k - 1), b + N, std::greater<C>());
  std::sort(b, b + k, std::greater<C>());
}

// Everything a selection needs, shared by select and fused_fwd: the arguments (args.h)
// and the buffers of one chunk of rows.
struct SelCtx : SelectArgs {
  int64_t c0 = 0;             // first row of the chunk
  int64_t* pool = nullptr;    // (rows, M)
  int32_t* pos_t = nullptr;   // (rows, K)
  double* cf = nullptr;       // (rows, M): c / T
  double* g = nullptr;        // (rows, M): u, then the Gumbel numbers (float64, as the spec's RNG)
};

// Phase A of one row: pool, teacher top-K, positions, counts, uniforms.
template <typename S>
void select_phase_a_row(const SelCtx& c, int64_t r, Scratch& sc) {
  using R = Rank<S>;
  using C = typename R::comp_t;
  const int64_t N = c.N, K = c.K, M = c.M;
  const int64_t rr = r - c.c0;
  const S* srow = static_cast<const S*>(c.s.data) + r * c.s.s0;
  const bool* exrow = c.exclude.data ? c.exclude.data + r * c.exclude.s0 : nullptr;
  std::vector<C>& buf = sc.sbuf<C>();
  ranked_topk_row<S>(srow, c.s.s1, exrow, c.exclude.s1, N, M, buf, sc.cbuf<C>());
  int64_t* pool = c.pool + rr * M;
  for (int64_t p = 0; p < M; ++p) pool[p] = R::item(buf[p]);

  int64_t* qt = c.qt + r * c.qt_stride;
  if (c.given_qt != nullptr) {
    const int64_t* g = c.given_qt + r * K;
    for (int64_t i = 0; i < K; ++i) {
      TORCH_CHECK(g[i] >= 0 && g[i] < N,
                  msg("teacher_topk ids must lie in [0, N) = [0, ", N, "), got ", g[i], " in row ", r));
      qt[i] = g[i];
    }
  } else {
    dispatch_float(c.t.dtype, [&](auto tag) {
      using TT = decltype(tag);
      using RT = Rank<TT>;
      std::vector<typename RT::comp_t>& tb = sc.tbuf<typename RT::comp_t>();
      ranked_topk_row<TT>(static_cast<const TT*>(c.t.data) + r * c.t.s0, c.t.s1, exrow, c.exclude.s1, N, K, tb,
                          sc.cbuf<typename RT::comp_t>());
      for (int64_t i = 0; i < K; ++i) qt[i] = RT::item(tb[i]);
    });
  }

  // pool positions of the teacher's items
  int32_t* pos = c.pos_t + rr * K;
  const C* b = buf.data();
  for (int64_t i = 0; i < K; ++i) {
    const int64_t j = qt[i];
    const C cj = R::make(srow[j * c.s.s1], j, exrow ? exrow[j * c.exclude.s1] : false);
    const C* it = std::lower_bound(b, b + M, cj, std::greater<C>());
    pos[i] = (it != b + M && *it == cj) ? static_cast<int32_t>(it - b) : static_cast<int32_t>(M);
  }

  // integer counts of every pool position (spec 3)
  std::vector<int32_t>& mark = sc.mark;
  mark.assign(M, 0);
  int64_t n_out = 0;
  for (int64_t i = 0; i < K; ++i) {
    const int64_t p = pos[i];
    if (c.paper) {
      if (p >= M) ++n_out;
      else if (p >= K) mark[p] = 1;
    } else if (p < M) {
      mark[p] = 1;
    }
  }
  double* cf = c.cf + rr * M;
  double* u = c.g + rr * M;
  const u32 k2 = row_key(c.seed, c.row_ids[r]);
  int64_t run = 0;
  for (int64_t p = M - 1; p >= 0; --p) {
    int64_t cnt;
    if (c.paper) {
      cnt = n_out + run;  // Q2 items strictly below p
      run += mark[p];
    } else {
      run += mark[p];  // QT items in the pool at p or below
      cnt = std::min<int64_t>(kOfficialCap, run);
    }
    cf[p] = static_cast<double>(cnt) / c.T;
    u[p] = uniform01(k2, pool[p]);
  }
}

// Phase C of one row: Gumbel top-L, membership, q2_mask, counts.
void select_phase_c_row(const SelCtx& c, int64_t r, Scratch& sc) {
  const int64_t K = c.K, M = c.M, L = c.L;
  const int64_t rr = r - c.c0;
  const int64_t* pool = c.pool + rr * M;
  const double* cf = c.cf + rr * M;
  const double* g = c.g + rr * M;
  std::vector<u64>& keys = sc.keys;
  std::vector<u64>& work = sc.work;
  keys.resize(M);
  work.resize(M);
  for (int64_t p = 0; p < M; ++p) {
    const float key = static_cast<float>(cf[p] + g[p]);  // float32(c / T + g), sum in float64
    keys[p] = (static_cast<u64>(ord32(key)) << 32) | static_cast<u64>(0xFFFFFFFFu - static_cast<u32>(pool[p]));
  }
  std::copy(keys.begin(), keys.end(), work.begin());
  if (L < M) std::nth_element(work.begin(), work.begin() + (L - 1), work.end(), std::greater<u64>());
  std::sort(work.begin(), work.begin() + L, std::greater<u64>());
  const u64 thr = work[L - 1];  // the L-th largest key
  int64_t* qs = c.qs + r * c.qs_stride;
  int64_t* a = c.sampled + r * c.a_stride;
  for (int64_t i = 0; i < K; ++i) qs[i] = pool[i];
  for (int64_t l = 0; l < L; ++l) a[l] = static_cast<int64_t>(0xFFFFFFFFu - static_cast<u32>(work[l]));
  const int32_t* pos = c.pos_t + rr * K;
  bool* q2 = c.q2 + r * K;
  int64_t n_q1 = 0, n_qa = 0;
  for (int64_t i = 0; i < K; ++i) {
    const int64_t p = pos[i];
    const bool in_a = p < M && keys[p] >= thr;
    q2[i] = p >= K && !in_a;
    n_q1 += p < K;
    n_qa += in_a;
  }
  c.counts[2 * r] = n_q1;
  c.counts[2 * r + 1] = n_qa;
}

// Runs the selection of all rows, in chunks of rows that bound the (rows, M) buffers.
// `after_row(r, scratch)` runs at the end of phase C of row r (the fused loss).
template <typename AfterRow>
void run_selection(SelCtx& c, AfterRow&& after_row) {
  const int64_t B = c.B, M = c.M, K = c.K;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(B, (int64_t{1} << 20) / M));
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  Tensor pool = at::empty({chunk, M}, i64);
  Tensor pos = at::empty({chunk, K}, at::TensorOptions().dtype(at::kInt));
  Tensor cf = at::empty({chunk, M}, at::TensorOptions().dtype(at::kDouble));
  Tensor gum = at::empty({chunk, M}, at::TensorOptions().dtype(at::kDouble));
  c.pool = pool.data_ptr<int64_t>();
  c.pos_t = pos.data_ptr<int32_t>();
  c.cf = cf.data_ptr<double>();
  c.g = gum.data_ptr<double>();
  for (int64_t c0 = 0; c0 < B; c0 += chunk) {
    const int64_t c1 = std::min(B, c0 + chunk);
    c.c0 = c0;
    dispatch_float(c.s.dtype, [&](auto tag) {
      using S = decltype(tag);
      at::parallel_for(c0, c1, 1, [&](int64_t r0, int64_t r1) {
        Scratch sc;
        for (int64_t r = r0; r < r1; ++r) select_phase_a_row<S>(c, r, sc);
      });
    });
    // g = -log(-log(u)) with torch's own log (bit-identical to the reference)
    Tensor gv = gum.narrow(0, 0, c1 - c0);
    gv.log_();
    gv.neg_();
    gv.log_();
    gv.neg_();
    at::parallel_for(c0, c1, 1, [&](int64_t r0, int64_t r1) {
      Scratch sc;
      for (int64_t r = r0; r < r1; ++r) {
        select_phase_c_row(c, r, sc);
        after_row(r, sc);
      }
    });
  }
}

// ------------------------------------------------------------------ the losses
// out[w] = score(row r, item idx[w]) / tau, in the compute dtype A.
template <typename A>
void gather_row(const Dense& d, int64_t r, const int64_t* idx, int64_t W, A tau, A* out) {
  dispatch_float(d.dtype, [&](auto tag) {
    using S = decltype(tag);
    const S* row = static_cast<const S*>(d.data) + r * d.s0;
    for (int64_t w = 0; w < W; ++w) out[w] = static_cast<A>(row[idx[w] * d.s1]) / tau;
  });
}

// exp(x) for x <= 0, the exponentials of the softmaxes. float: a branch-free polynomial
// (the Cephes expf reduction and coefficients; relative error below 2e-7 on [-87, 0],
// exp(x < -87) flushed to exp(-87) ~ 1.6e-38) that the compiler can vectorise, unlike a
// libm call; double: std::exp.
inline float exp_le0(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.44269504088896341f;
  const int n = static_cast<int>(t - 0.5f);  // round to nearest for t <= 0
  const float fn = static_cast<float>(n);
  const float r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}
inline double exp_le0(double x) { return std::exp(x); }

// Softmax statistics of a set: max and sum of exp(v - max) over the members.
template <typename A>
struct SoftStats {
  A mx, sum;
};

// The members of a set are given by weights m (1 member, 0 not). e[i] = exp(v[i] - max) for the
// members and 0 for the others; returns the max and the sum over the members. One exp per
// value, in a loop without branches.
template <typename A>
SoftStats<A> soft_exp(const A* v, const A* m, int64_t n, A* e) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  // max and sum with four independent chains (no loop-carried dependency on one register)
  A mx4[4] = {kNegInf, kNegInf, kNegInf, kNegInf};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) mx4[j] = std::max(mx4[j], m[i + j] != 0 ? v[i + j] : kNegInf);
  for (; i < n; ++i) mx4[0] = std::max(mx4[0], m[i] != 0 ? v[i] : kNegInf);
  const A mx = std::max(std::max(mx4[0], mx4[1]), std::max(mx4[2], mx4[3]));
  for (i = 0; i < n; ++i) e[i] = m[i] * exp_le0(std::min(v[i] - mx, A(0)));  // vectorised (float)
  A s4[4] = {0, 0, 0, 0};
  for (i = 0; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) s4[j] += e[i + j];
  for (; i < n; ++i) s4[0] += e[i];
  return {mx, (s4[0] + s4[1]) + (s4[2] + s4[3])};
}

// Per-thread scratch of the loss of a row: membership weights and the two exp buffers.
template <typename A>
struct RowScratch {
  std::vector<A> m, ex, ey;
  // weights of [QS (K) | U = A (L) + QT (K) with q2]: QS all, A all, QT where q2
  void prepare(const bool* q2, int64_t K, int64_t L) {
    const size_t W = static_cast<size_t>(2 * K + L);
    if (m.size() < W) {
      m.resize(W);
      ex.resize(W);
      ey.resize(W);
    }
    std::fill(m.begin(), m.begin() + K + L, A(1));
    for (int64_t i = 0; i < K; ++i) m[K + L + i] = q2[i] ? A(1) : A(0);
  }
};

template <typename A>
RowScratch<A>& row_scratch() {
  thread_local RowScratch<A> sc;
  return sc;
}

// Cross-entropy -sum softmax(y) * log_softmax(x) over the members (m), with ex, ey filled:
// log(sum ex) - sum(ey * (x - max x)) / sum ey.
template <typename A>
A set_ce(const A* x, const A* y, const A* m, int64_t n, A* ex, A* ey) {
  const SoftStats<A> sx = soft_exp<A>(x, m, n, ex);
  const SoftStats<A> sy = soft_exp<A>(y, m, n, ey);
  A acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += ey[i] * (x[i] - sx.mx);  // ey = 0 off the set
  return std::log(sx.sum) - acc / sy.sum;
}

// (L1, L2) of one row from x, y = scores / tau at [QS (K) | A (L) | QT (K)].
template <typename A>
std::pair<A, A> row_losses(const A* x, const A* y, const bool* q2, int64_t K, int64_t L) {
  RowScratch<A>& sc = row_scratch<A>();
  sc.prepare(q2, K, L);
  const A l1 = set_ce<A>(x, y, sc.m.data(), K, sc.ex.data(), sc.ey.data());
  const A l2 = set_ce<A>(x + K, y + K, sc.m.data() + K, L + K, sc.ex.data() + K, sc.ey.data() + K);
  return {l1, l2};
}

// d loss_row / d x at the W positions, times w = grad_row / tau.
template <typename A>
void row_grads(const A* x, const A* y, const bool* q2, int64_t K, int64_t L, A gamma, A w, A* d) {
  RowScratch<A>& sc = row_scratch<A>();
  sc.prepare(q2, K, L);
  A* ex = sc.ex.data();
  A* ey = sc.ey.data();
  const SoftStats<A> s1x = soft_exp<A>(x, sc.m.data(), K, ex), s1y = soft_exp<A>(y, sc.m.data(), K, ey);
  const A ax = (1 - gamma) * w / s1x.sum, ay = (1 - gamma) * w / s1y.sum;
  for (int64_t i = 0; i < K; ++i) d[i] = ex[i] * ax - ey[i] * ay;
  const int64_t n2 = L + K;
  const SoftStats<A> s2x = soft_exp<A>(x + K, sc.m.data() + K, n2, ex + K);
  const SoftStats<A> s2y = soft_exp<A>(y + K, sc.m.data() + K, n2, ey + K);
  const A bx = gamma * w / s2x.sum, by = gamma * w / s2y.sum;
  for (int64_t i = K; i < K + n2; ++i) d[i] = ex[i] * bx - ey[i] * by;  // 0 off U
}

template <typename F>
void dispatch_acc(bool is_double, F&& f) {
  if (is_double) f(double{});
  else f(float{});
}

// The rows of the gathered loss: for each row r, x and y = the scores at [QS | A | QT] / tau
// (compute dtype A), then row_fn(r, x, y). Rows in parallel; shared by forward and backward.
template <typename A, typename RowFn>
void for_gathered_rows(const SubsetArgs& a, RowFn&& row_fn) {
  const int64_t W = 2 * a.K + a.L;
  const A* xp = static_cast<const A*>(a.s_g);
  const A* yp = static_cast<const A*>(a.t_g);
  const A tau = static_cast<A>(a.tau);
  at::parallel_for(0, a.B, 16, [&](int64_t r0, int64_t r1) {
    std::vector<A> x(W), y(W);
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t w = 0; w < W; ++w) {
        x[w] = xp[r * W + w] / tau;
        y[w] = yp[r * W + w] / tau;
      }
      row_fn(r, x.data(), y.data());
    }
  });
}

}  // namespace

// ======================================================================== ops
void Kernels::select(const SelectArgs& a, const Tensor&) {
  SelCtx c;
  static_cast<SelectArgs&>(c) = a;
  run_selection(c, [](int64_t, Scratch&) {});
}

void Kernels::fused_fwd(const SelectArgs& a, const Tensor& like) {
  const int64_t B = a.B, K = a.K, L = a.L, W = 2 * K + L;
  const bool is_double = a.s.dtype == kF64;
  const at::ScalarType acc = is_double ? at::kDouble : at::kFloat;
  Tensor counts = at::empty({B, 2}, like.options().dtype(at::kLong));
  Tensor parts = at::empty({B, 2}, like.options().dtype(acc));
  SelCtx c;
  static_cast<SelectArgs&>(c) = a;
  c.counts = counts.data_ptr<int64_t>();
  const int64_t* ip = a.qs;  // idx: the rows [QS | A | QT] of stride W
  const Dense ds = c.s, dt = c.t;
  dispatch_acc(is_double, [&](auto tag) {
    using A = decltype(tag);
    A* pp = parts.data_ptr<A>();
    const A tau_a = static_cast<A>(a.tau);
    run_selection(c, [&](int64_t r, Scratch&) {
      thread_local std::vector<A> x, y;
      x.resize(W);
      y.resize(W);
      const int64_t* ir = ip + r * W;
      gather_row<A>(ds, r, ir, W, tau_a, x.data());
      gather_row<A>(dt, r, ir, W, tau_a, y.data());
      const auto pr = row_losses<A>(x.data(), y.data(), c.q2 + r * K, K, L);
      pp[2 * r] = pr.first;
      pp[2 * r + 1] = pr.second;
    });
  });
  // gamma = exp(-(beta * n) / K) in float32 with torch's own exp, as the reference
  Tensor n = counts.select(1, a.paper ? 0 : 1).to(at::kFloat);
  Tensor gamma = n.mul(a.beta).neg().div(K).exp().contiguous();
  const float* gp = gamma.data_ptr<float>();
  const int64_t* cp = c.counts;
  float* st = a.stats;
  dispatch_acc(is_double, [&](auto tag) {
    using A = decltype(tag);
    const A* pp = parts.data_ptr<A>();
    A* lp = static_cast<A*>(a.loss);
    for (int64_t r = 0; r < B; ++r) {
      const A g = static_cast<A>(gp[r]);
      lp[r] = (1 - g) * pp[2 * r] + g * pp[2 * r + 1];
      float* sr = st + 5 * r;
      sr[0] = static_cast<float>(pp[2 * r]);
      sr[1] = static_cast<float>(pp[2 * r + 1]);
      sr[2] = gp[r];
      sr[3] = static_cast<float>(cp[2 * r]);
      sr[4] = static_cast<float>(cp[2 * r + 1]);
    }
  });
}

void Kernels::subset_fwd(const SubsetArgs& a, const Tensor&) {
  dispatch_acc(a.is_double, [&](auto tag) {
    using A = decltype(tag);
    const bool* qp = a.q2;
    const A* gp = static_cast<const A*>(a.gamma);
    A* lp = static_cast<A*>(a.loss);
    A* pp = static_cast<A*>(a.parts);
    for_gathered_rows<A>(a, [&](int64_t r, const A* x, const A* y) {
      const auto pr = row_losses<A>(x, y, qp + r * a.K, a.K, a.L);
      const A g = gp[r];
      lp[r] = (1 - g) * pr.first + g * pr.second;
      pp[2 * r] = pr.first;
      pp[2 * r + 1] = pr.second;
    });
  });
}

void Kernels::subset_bwd(const SubsetArgs& a, const Tensor&) {
  const int64_t W = 2 * a.K + a.L;
  dispatch_acc(a.is_double, [&](auto tag) {
    using A = decltype(tag);
    const bool* qp = a.q2;
    const A* gp = static_cast<const A*>(a.gamma);
    const A* wp = static_cast<const A*>(a.grad_rows);
    A* op = static_cast<A*>(a.grad);
    const A tau = static_cast<A>(a.tau);
    for_gathered_rows<A>(a, [&](int64_t r, const A* x, const A* y) {
      row_grads<A>(x, y, qp + r * a.K, a.K, a.L, gp[r], wp[r] / tau, op + r * W);
    });
  });
}

void Kernels::fused_bwd(const FusedBwdArgs& a, const Tensor&) {
  const int64_t B = a.B, N = a.N, K = a.K, L = a.L, W = 2 * K + L;
  const bool is_double = a.s.dtype == kF64;
  const Dense ds = a.s, dt = a.t;
  dispatch_acc(is_double, [&](auto atag) {
    using A = decltype(atag);
    const int64_t* ip = a.idx;
    const bool* qp = a.q2;
    const A* gp = static_cast<const A*>(a.gamma);
    const A* wp = static_cast<const A*>(a.grad_rows);
    const A tau_a = static_cast<A>(a.tau);
    dispatch_float(a.s.dtype, [&](auto otag) {
      using O = decltype(otag);
      O* op = static_cast<O*>(a.out);
      at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
        std::vector<A> x(W), y(W), d(W);
        std::vector<u64> order;
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t* ir = ip + r * W;
          for (int64_t w = 0; w < W; ++w)
            TORCH_CHECK(ir[w] >= 0 && ir[w] < N, msg("idx must lie in [0, N) = [0, ", N, "), got ", ir[w]));
          gather_row<A>(ds, r, ir, W, tau_a, x.data());
          gather_row<A>(dt, r, ir, W, tau_a, y.data());
          row_grads<A>(x.data(), y.data(), qp + r * K, K, L, gp[r], wp[r] / tau_a, d.data());
          O* orow = op + r * N;
          std::memset(static_cast<void*>(orow), 0, sizeof(O) * N);
          // items that appear more than once (QS and A share items) add up in position
          // order, as the reference's scatter_add into a zero row of the compute dtype
          if constexpr (std::is_same_v<O, A>) {
            for (int64_t w = 0; w < W; ++w) orow[ir[w]] += d[w];
          } else {  // sum in the compute dtype, round once
            order.resize(W);
            for (int64_t w = 0; w < W; ++w) order[w] = (static_cast<u64>(ir[w]) << 32) | static_cast<u64>(w);
            std::sort(order.begin(), order.end());
            for (int64_t w = 0; w < W;) {
              const u64 item = order[w] >> 32;
              A sum = 0;
              for (; w < W && (order[w] >> 32) == item; ++w) sum += d[order[w] & 0xFFFFFFFFu];
              orow[item] = static_cast<O>(sum);
            }
          }
        }
      });
    });
  });
}

}  // namespace cpu
}  // namespace rcekd
