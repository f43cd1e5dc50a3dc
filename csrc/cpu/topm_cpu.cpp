// rcekd_C::topm_dot on the CPU: each row's first M items of the scores
// s[b, j] = user_vecs[b] . item_vecs[j] in ranking order (larger score first, ties to
// the smaller item id), excluded items (CSR lists) never taken, without the (B, N)
// scores (rcekd_kernels/backends/reference.py: topm_dot defines the op).
//
// Work: users in blocks of UB rows, items in a fixed grid of tiles of TN items. For a
// (user block, item tile) the UB x TN scores are one GEMM (at::mm_out, MKL on x86) into
// a per-thread buffer that stays in L2 (128 x 512 float32 = 256 KB), then one pass per
// row compares them with the row's running threshold, the score of its M-th best item so
// far: 16 scores are compared at once (SSE2, a bit mask) and only the set bits, the rare
// survivors, go on one by one to the row's candidate buffer of CAP = 3M keys, which
// is cut back to M by a branchless quickselect when full. A key is the order-preserving image of the
// score followed by the inverted item id (one integer comparison = the ranking order).
// Items reach a row's buffer in ascending id, so an item whose score equals the threshold
// has a larger id than the threshold item and loses: the test is a strict "above".
// Excluded items are dropped when they survive the filter (a cursor on the row's sorted
// list of in-shard excluded ids), so they never count towards the threshold.
//
// Parallelism: tasks = (user block, item segment); a segment is a contiguous run of
// tiles, several only when there are too few user blocks for the threads. Threads take
// tasks from an atomic counter; each task has its own rows' state, and a final pass
// merges a row's segments. The GEMM calls are the same (same shapes, same operands,
// 64-byte aligned output) whatever the number of threads, and a row's result is the
// unique top-M of its keys, so the output does not depend on the number of threads.
// Memory besides the (B, M) outputs: per thread a UB x TN score block and UB x CAP keys;
// with segments, B x M keys per segment; the sorted exclusion lists (O(nnz)).
#include <torch/library.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../binding.h"

namespace rcekd {
namespace cpu {
namespace {

using u32 = uint32_t;
using u64 = uint64_t;
using u128 = unsigned __int128;

// ------------------------------------------------------- order-preserving keys
inline u32 ord32(float f) {
  f = f + 0.0f;  // -0 -> +0
  u32 u;
  std::memcpy(&u, &f, 4);
  return u ^ (static_cast<u32>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
}
inline float unord32(u32 o) {
  const u32 u = (o & 0x80000000u) ? (o ^ 0x80000000u) : ~o;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline u64 ord64(double d) {
  d = d + 0.0;
  u64 u;
  std::memcpy(&u, &d, 8);
  return u ^ (static_cast<u64>(static_cast<int64_t>(u) >> 63) | (u64{1} << 63));
}
inline double unord64(u64 o) {
  const u64 u = (o & (u64{1} << 63)) ? (o ^ (u64{1} << 63)) : ~o;
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}

// Key of local item j (j < 2^31) with score v: larger key = earlier in ranking order.
template <typename S>
struct TopKey;
template <>
struct TopKey<float> {
  using K = u64;
  static K make(float v, u32 j) { return (static_cast<u64>(ord32(v)) << 32) | static_cast<u64>(0xFFFFFFFFu - j); }
  static float score(K k) { return unord32(static_cast<u32>(k >> 32)); }
  static u32 item(K k) { return 0xFFFFFFFFu - static_cast<u32>(k); }
};
template <>
struct TopKey<double> {
  using K = u128;
  static K make(double v, u32 j) {
    return (static_cast<u128>(ord64(v)) << 64) | static_cast<u128>(0xFFFFFFFFu - j);
  }
  static double score(K k) { return unord64(static_cast<u64>(k >> 64)); }
  static u32 item(K k) { return 0xFFFFFFFFu - static_cast<u32>(k); }
};

// One row's running state inside a task.
template <typename S>
struct RowState {
  using K = typename TopKey<S>::K;
  K* buf = nullptr;     // CAP keys
  K* tmp = nullptr;     // CAP keys of scratch for the selection
  int64_t cnt = 0;      // keys in buf
  bool full = false;    // M keys were seen: thr_key is the M-th best key so far
  K thr_key = 0;
  S thr = std::numeric_limits<S>::quiet_NaN();  // once full: scores with !(x <= thr) are offered
  const int32_t* ex = nullptr;                  // the row's sorted excluded local ids not yet passed
  const int32_t* ex_end = nullptr;
};

struct Plan {
  int64_t B = 0, N = 0, M = 0;  // M: min(M asked, N), the number of real entries at most
  int64_t CAP = 0;              // candidate buffer of a row
  int64_t UB = 0, TN = 0;       // user block, item tile
  int64_t n_ub = 0, n_tiles = 0, n_seg = 1;
};

// True when local item j is excluded for the row (j ascending from call to call).
template <typename S>
inline bool excluded(RowState<S>& r, u32 j) {
  while (r.ex != r.ex_end && *r.ex < static_cast<int32_t>(j)) ++r.ex;
  return r.ex != r.ex_end && *r.ex == static_cast<int32_t>(j);
}

// Rearranges a[0, n) so that a[0, M) holds its M largest keys (in no order; keys are
// unique, 1 <= M <= n) and returns the M-th largest. A quickselect whose partition has no
// data-dependent branch (every key is written to both ends of tmp, the counters advance by
// the comparison): std::nth_element's branches mispredict on random keys, and this
// selection runs on every cut of the candidate buffers. tmp holds n keys.
template <typename K>
K select_top(K* a, int64_t n, int64_t M, K* tmp) {
  int64_t lo = 0, hi = n, need = M;  // the `need` largest of a[lo, hi) are still to be placed at a[lo, ...)
  while (hi - lo > 48) {
    const int64_t len = hi - lo;
    K s0 = a[lo], s1 = a[lo + len / 2], s2 = a[hi - 1];  // median of three
    if (s0 > s1) std::swap(s0, s1);
    if (s1 > s2) std::swap(s1, s2);
    if (s0 > s1) std::swap(s0, s1);
    const K p = s1;
    int64_t ng = 0, nl = 0;
    K* top = tmp + len;
    for (int64_t i = lo; i < hi; ++i) {
      const K v = a[i];
      const bool ge = v >= p;
      tmp[ng] = v;
      top[-1 - nl] = v;
      ng += ge;
      nl += !ge;
    }
    // tmp[0, ng): the keys >= p (p among them); tmp[len - nl, len): the keys < p
    std::copy(tmp, tmp + ng, a + lo);
    if (ng >= need) {
      hi = lo + ng;
      if (ng == len) break;  // no key below the pivot (cannot happen with unique keys)
    } else {
      std::copy(tmp + len - nl, tmp + len, a + lo + ng);
      lo += ng;
      need -= ng;
    }
  }
  std::nth_element(a + lo, a + lo + (need - 1), a + hi, std::greater<K>());
  return a[lo + need - 1];  // every key left of lo is larger: the M-th largest
}

// Keep the M best of the row's cnt >= M keys; the M-th becomes the threshold.
template <typename S>
inline void cut(RowState<S>& r, int64_t M) {
  using TK = TopKey<S>;
  r.thr_key = select_top(r.buf, r.cnt, M, r.tmp);
  r.cnt = M;
  r.full = true;
  r.thr = TK::score(r.thr_key);
}

// An item survived the filter of a full row: drop it if excluded, else add its key; cut
// back to M when the buffer is full.
template <typename S>
inline void offer(RowState<S>& r, S v, u32 j, int64_t M, int64_t CAP) {
  using TK = TopKey<S>;
  if (excluded(r, j)) return;
  const typename TK::K k = TK::make(v, j);
  if (!(k > r.thr_key)) return;  // a NaN score, or a bit of a mask made before a raise
  r.buf[r.cnt++] = k;
  if (r.cnt == CAP) cut(r, M);
}

inline int lowest_bit(u32 m) {  // m != 0
#if defined(_MSC_VER) && !defined(__clang__)
  unsigned long i;
  _BitScanForward(&i, m);
  return static_cast<int>(i);
#else
  return __builtin_ctz(m);
#endif
}

// Bit q of the result: !(x[q] <= thr) for q in [0, 16) floats / [0, 8) doubles (a NaN score
// or threshold sets it). SSE2 (every x86-64 CPU) or a plain loop.
inline u32 above_mask(const float* x, float thr) {
#if defined(__SSE2__)
  const __m128 t = _mm_set1_ps(thr);
  const u32 m0 = static_cast<u32>(_mm_movemask_ps(_mm_cmpnle_ps(_mm_loadu_ps(x), t)));
  const u32 m1 = static_cast<u32>(_mm_movemask_ps(_mm_cmpnle_ps(_mm_loadu_ps(x + 4), t)));
  const u32 m2 = static_cast<u32>(_mm_movemask_ps(_mm_cmpnle_ps(_mm_loadu_ps(x + 8), t)));
  const u32 m3 = static_cast<u32>(_mm_movemask_ps(_mm_cmpnle_ps(_mm_loadu_ps(x + 12), t)));
  return m0 | (m1 << 4) | (m2 << 8) | (m3 << 12);
#else
  u32 m = 0;
  for (int q = 0; q < 16; ++q) m |= static_cast<u32>(!(x[q] <= thr)) << q;
  return m;
#endif
}
inline u32 above_mask(const double* x, double thr) {
#if defined(__SSE2__)
  const __m128d t = _mm_set1_pd(thr);
  const u32 m0 = static_cast<u32>(_mm_movemask_pd(_mm_cmpnle_pd(_mm_loadu_pd(x), t)));
  const u32 m1 = static_cast<u32>(_mm_movemask_pd(_mm_cmpnle_pd(_mm_loadu_pd(x + 2), t)));
  const u32 m2 = static_cast<u32>(_mm_movemask_pd(_mm_cmpnle_pd(_mm_loadu_pd(x + 4), t)));
  const u32 m3 = static_cast<u32>(_mm_movemask_pd(_mm_cmpnle_pd(_mm_loadu_pd(x + 6), t)));
  return m0 | (m1 << 2) | (m2 << 4) | (m3 << 6);
#else
  u32 m = 0;
  for (int q = 0; q < 8; ++q) m |= static_cast<u32>(!(x[q] <= thr)) << q;
  return m;
#endif
}

// The scores x[0, tn) of one row for the local items j0 + [0, tn): groups of W scores are
// tested against the threshold at once, and only the set bits of the mask are offered
// (an offer may raise the threshold: the later bits of the group are then checked again
// by offer's exact key test). A row with no threshold yet (fewer than M eligible items
// seen) takes every eligible item without a test until its buffer is full or the tile
// ends, then is cut back to its M best: one selection instead of M offers.
template <typename S>
void filter_row(const S* x, int64_t tn, u32 j0, RowState<S>& r, int64_t M, int64_t CAP) {
  using TK = TopKey<S>;
  constexpr int64_t W = 64 / sizeof(S);  // 16 floats, 8 doubles
  int64_t j = 0;
  if (!r.full) {
    for (; j < tn && !r.full; ++j) {
      const u32 id = j0 + static_cast<u32>(j);
      if (excluded(r, id)) continue;
      r.buf[r.cnt++] = TK::make(x[j], id);
      if (r.cnt == CAP) cut(r, M);
    }
    if (!r.full && r.cnt >= M) cut(r, M);
  }
  for (; j + W <= tn; j += W) {
    u32 m = above_mask(x + j, r.thr);
    while (m != 0) {
      const int q = lowest_bit(m);
      m &= m - 1;
      offer(r, x[j + q], j0 + static_cast<u32>(j + q), M, CAP);
    }
  }
  for (; j < tn; ++j)
    if (!(x[j] <= r.thr)) offer(r, x[j], j0 + static_cast<u32>(j), M, CAP);
}

// Writes the first n keys of k (sorted here) as ids and scores of one output row of width W.
template <typename S>
void write_row(typename TopKey<S>::K* k, int64_t n, int64_t W, int64_t item_offset, int64_t* ids, S* sc) {
  using TK = TopKey<S>;
  std::sort(k, k + n, std::greater<typename TK::K>());
  for (int64_t p = 0; p < n; ++p) {
    ids[p] = item_offset + static_cast<int64_t>(TK::item(k[p]));
    sc[p] = TK::score(k[p]);
  }
  for (int64_t p = n; p < W; ++p) {
    ids[p] = -1;
    sc[p] = -std::numeric_limits<S>::infinity();
  }
}

template <typename S>
void run(const Tensor& U, const Tensor& V, const Plan& P, const std::vector<int64_t>& ex_start,
         const std::vector<int32_t>& ex_ids, int64_t item_offset, int64_t M_out, Tensor& ids_t, Tensor& sc_t) {
  using K = typename TopKey<S>::K;
  int64_t* ids = ids_t.data_ptr<int64_t>();
  S* sc = sc_t.data_ptr<S>();
  const int64_t B = P.B, N = P.N, M = P.M;
  const bool has_ex = !ex_start.empty();
  if (M == 0) {  // no items: every row is padding
    for (int64_t b = 0; b < B; ++b) write_row<S>(nullptr, 0, M_out, item_offset, ids + b * M_out, sc + b * M_out);
    return;
  }
  // per segment's candidates of every row when the segments must be merged
  std::vector<K> part;
  std::vector<int64_t> part_cnt;
  if (P.n_seg > 1) {
    part.resize(static_cast<size_t>(P.n_seg * B * M));
    part_cnt.assign(static_cast<size_t>(P.n_seg * B), 0);
  }
  const int64_t n_tasks = P.n_ub * P.n_seg;
  std::atomic<int64_t> next{0};
  const auto opts = U.options();
  at::parallel_for(0, std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tasks)), 1,
                   [&](int64_t, int64_t) {
    std::vector<K> keys(static_cast<size_t>(P.UB * P.CAP)), tmp(static_cast<size_t>(P.CAP));
    std::vector<RowState<S>> rows(static_cast<size_t>(P.UB));
    Tensor blk = at::empty({P.UB * P.TN}, opts);  // 64-byte aligned, as every GEMM output
    S* bp = blk.data_ptr<S>();
    for (int64_t task = next.fetch_add(1); task < n_tasks; task = next.fetch_add(1)) {
      const int64_t ub = task / P.n_seg, seg = task % P.n_seg;
      const int64_t b0 = ub * P.UB, nb = std::min(P.UB, B - b0);
      const int64_t t_lo = seg * P.n_tiles / P.n_seg, t_hi = (seg + 1) * P.n_tiles / P.n_seg;
      const int32_t j_lo = static_cast<int32_t>(t_lo * P.TN);
      for (int64_t r = 0; r < nb; ++r) {
        RowState<S>& st = rows[r];
        st = RowState<S>();
        st.buf = keys.data() + r * P.CAP;
        st.tmp = tmp.data();
        if (has_ex) {
          const int32_t* e0 = ex_ids.data() + ex_start[b0 + r];
          st.ex_end = ex_ids.data() + ex_start[b0 + r + 1];
          st.ex = std::lower_bound(e0, st.ex_end, j_lo);
        }
      }
      const Tensor ublk = U.narrow(0, b0, nb);
      for (int64_t t = t_lo; t < t_hi; ++t) {
        const int64_t j0 = t * P.TN, tn = std::min(P.TN, N - j0);
        Tensor out = at::from_blob(bp, {nb, tn}, opts);
        at::mm_out(out, ublk, V.narrow(0, j0, tn).t());
        for (int64_t r = 0; r < nb; ++r) filter_row<S>(bp + r * tn, tn, static_cast<u32>(j0), rows[r], M, P.CAP);
      }
      for (int64_t r = 0; r < nb; ++r) {
        RowState<S>& st = rows[r];
        const int64_t n = std::min(st.cnt, M);
        if (st.cnt > M) select_top(st.buf, st.cnt, M, st.tmp);
        const int64_t b = b0 + r;
        if (P.n_seg == 1) {
          write_row<S>(st.buf, n, M_out, item_offset, ids + b * M_out, sc + b * M_out);
        } else {
          std::copy(st.buf, st.buf + n, part.data() + (seg * B + b) * M);
          part_cnt[seg * B + b] = n;
        }
      }
    }
  });
  if (P.n_seg > 1) {
    at::parallel_for(0, B, 16, [&](int64_t r0, int64_t r1) {
      std::vector<K> all;
      for (int64_t b = r0; b < r1; ++b) {
        all.clear();
        for (int64_t s = 0; s < P.n_seg; ++s) {
          const K* p = part.data() + (s * B + b) * M;
          all.insert(all.end(), p, p + part_cnt[s * B + b]);
        }
        const int64_t n = std::min<int64_t>(static_cast<int64_t>(all.size()), M);
        if (static_cast<int64_t>(all.size()) > M)
          std::nth_element(all.begin(), all.begin() + (M - 1), all.end(), std::greater<K>());
        write_row<S>(all.data(), n, M_out, item_offset, ids + b * M_out, sc + b * M_out);
      }
    });
  }
}

// The in-shard excluded local ids of each row, sorted: row b's are ids[start[b], start[b + 1]).
void exclusion_lists(const Tensor& offsets_in, const Tensor& ids_in, int64_t B, int64_t N, int64_t item_offset,
                     std::vector<int64_t>& start, std::vector<int32_t>& out) {
  const Tensor offsets = offsets_in.contiguous(), ids_t = ids_in.contiguous();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t nnz = ids_t.size(0);
  const int64_t* ids = ids_t.data_ptr<int64_t>();
  TORCH_CHECK(off[0] >= 0 && off[B] <= nnz,
              msg("topm_dot: exclude_offsets must lie in [0, len(exclude_ids)] = [0, ", nnz, "], got first ", off[0],
                  ", last ", off[B]));
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(off[b] <= off[b + 1], msg("topm_dot: exclude_offsets must be non-decreasing, but offsets[", b,
                                          "] = ", off[b], " > offsets[", b + 1, "] = ", off[b + 1]));
  auto in_shard = [&](int64_t id) { return id >= item_offset && id - item_offset < N; };
  start.assign(static_cast<size_t>(B + 1), 0);
  at::parallel_for(0, B, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t b = r0; b < r1; ++b) {
      int64_t c = 0;
      for (int64_t i = off[b]; i < off[b + 1]; ++i) c += in_shard(ids[i]);
      start[b + 1] = c;
    }
  });
  for (int64_t b = 0; b < B; ++b) start[b + 1] += start[b];
  out.resize(static_cast<size_t>(start[B]));
  at::parallel_for(0, B, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t b = r0; b < r1; ++b) {
      int32_t* o = out.data() + start[b];
      int64_t c = 0;
      for (int64_t i = off[b]; i < off[b + 1]; ++i)
        if (in_shard(ids[i])) o[c++] = static_cast<int32_t>(ids[i] - item_offset);
      std::sort(o, o + c);
    }
  });
}

std::tuple<Tensor, Tensor> topm_dot(const Tensor& user_vecs, const Tensor& item_vecs, int64_t M,
                                    const std::optional<Tensor>& exclude_offsets,
                                    const std::optional<Tensor>& exclude_ids, int64_t item_offset,
                                    int64_t block_users, int64_t tile_items) {
  TORCH_CHECK(user_vecs.dim() == 2 && item_vecs.dim() == 2,
              msg("topm_dot: user_vecs (B, D) and item_vecs (N, D) must be 2-D, got ", user_vecs.dim(), "-D and ",
                  item_vecs.dim(), "-D"));
  TORCH_CHECK(user_vecs.device().is_cpu() && item_vecs.device().is_cpu(),
              "topm_dot (cpp): user_vecs and item_vecs must be CPU tensors");
  const at::ScalarType st = user_vecs.scalar_type();
  TORCH_CHECK(item_vecs.scalar_type() == st, msg("topm_dot: user_vecs (", c10::toString(st), ") and item_vecs (",
                                                 c10::toString(item_vecs.scalar_type()), ") must have one dtype"));
  TORCH_CHECK(st == at::kFloat || st == at::kDouble,
              msg("topm_dot (cpp): the vectors must be float32 or float64, got ", c10::toString(st)));
  TORCH_CHECK(user_vecs.size(1) == item_vecs.size(1), msg("topm_dot: user_vecs has D = ", user_vecs.size(1),
                                                         " but item_vecs has D = ", item_vecs.size(1)));
  const int64_t B = user_vecs.size(0), N = item_vecs.size(0);
  TORCH_CHECK(M >= 1, msg("topm_dot: M must be >= 1, got ", M));
  TORCH_CHECK(N <= kMaxN, msg("topm_dot (cpp): N must be below 2^31, got ", N));
  TORCH_CHECK(item_offset >= 0 && item_offset <= std::numeric_limits<int64_t>::max() - N,
              msg("topm_dot: item_offset must be >= 0 with item_offset + N in int64, got ", item_offset));
  TORCH_CHECK(exclude_offsets.has_value() == exclude_ids.has_value(),
              "topm_dot: exclude_offsets and exclude_ids must be given together");
  TORCH_CHECK(block_users >= 0 && block_users <= (1 << 16) && tile_items >= 0 && tile_items <= (1 << 20),
              msg("topm_dot: block_users must lie in [0, 65536] and tile_items in [0, 2^20] (0: default), got ",
                  block_users, " and ", tile_items));
  std::vector<int64_t> ex_start;
  std::vector<int32_t> ex_ids;
  if (exclude_offsets.has_value()) {
    const Tensor& o = *exclude_offsets;
    const Tensor& e = *exclude_ids;
    TORCH_CHECK(o.device().is_cpu() && e.device().is_cpu(), "topm_dot (cpp): the exclusion must be CPU tensors");
    TORCH_CHECK(o.scalar_type() == at::kLong && o.dim() == 1 && o.size(0) == B + 1,
                msg("topm_dot: exclude_offsets must be int64 of shape (B + 1,) = (", B + 1, ",)"));
    TORCH_CHECK(e.scalar_type() == at::kLong && e.dim() == 1, "topm_dot: exclude_ids must be a 1-D int64 tensor");
    exclusion_lists(o, e, B, N, item_offset, ex_start, ex_ids);
  }
  const int64_t M_eff = std::min(M, N);
  Tensor ids = at::empty({B, M}, user_vecs.options().dtype(at::kLong));
  Tensor scores = at::empty({B, M}, user_vecs.options());
  if (B == 0) return {ids, scores};

  Plan P;
  P.B = B;
  P.N = N;
  P.M = M_eff;
  // the candidate buffer: 3M keys (the fastest of 2M .. 6M at B = 512, N = 25,181, M = 200: the
  // threshold is raised at every cut, so a larger buffer means a staler threshold and more offers)
  P.CAP = M_eff + std::max<int64_t>(2 * M_eff, 64);
  // the block of scores: 256 KB, a quarter of a 1 MB L2 (the fastest of 64..512 x 256..1024 measured
  // at B = 1024, D = 64, M = 200 on 2 Zen 5 cores)
  P.UB = std::min<int64_t>(B, block_users > 0 ? block_users : 128);
  P.TN = tile_items > 0 ? tile_items : (st == at::kFloat ? 512 : 256);
  P.n_ub = (B + P.UB - 1) / P.UB;
  P.n_tiles = (N + P.TN - 1) / P.TN;
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && P.n_tiles > 1 && P.n_ub < 4 * threads)  // too few user blocks: split the items too
    P.n_seg = std::min<int64_t>(P.n_tiles, (4 * threads + P.n_ub - 1) / P.n_ub);
  if (st == at::kFloat)
    run<float>(user_vecs, item_vecs, P, ex_start, ex_ids, item_offset, M, ids, scores);
  else
    run<double>(user_vecs, item_vecs, P, ex_start, ex_ids, item_offset, M, ids, scores);
  return {ids, scores};
}

}  // namespace
}  // namespace cpu
}  // namespace rcekd

TORCH_LIBRARY_FRAGMENT(rcekd_C, m) {
  m.def(
      "topm_dot(Tensor user_vecs, Tensor item_vecs, int M, Tensor? exclude_offsets, Tensor? exclude_ids, "
      "int item_offset=0, int block_users=0, int tile_items=0) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rcekd_C, CPU, m) { m.impl("topm_dot", &rcekd::cpu::topm_dot); }
