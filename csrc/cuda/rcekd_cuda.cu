// CUDA kernels of RCE-KD. No torch header here: only the CUDA runtime, so that
// nvcc compiles this file alone, in seconds (tests/test_native.py does so).
//
// Pipeline of select / fused_fwd, on a chunk of rows at a time (the chunk
// bounds the workspace):
//   1. top-k selection of a row (teacher top-K when not given, student top-M):
//      radix select on order-preserving bits of the scores (32-bit keys for
//      float16/bfloat16/float32 compared as float32, 64-bit for float64;
//      excluded items get key 0, below every score), 8 bits per pass. A long
//      row is split across several blocks (grid.y): each block histograms its
//      slice into the row's global histogram, a one-block-per-row kernel picks
//      the digit. Then every slice counts its items above / equal to the
//      threshold and writes them, in index order, to the row's k slots; ties
//      at the threshold are taken from the smallest item ids, as the spec says.
//   2. one block per row ("finish"), with the row's work in shared memory where
//      it fits (else in a global scratch row): bitonic sort of the M pool items
//      by (score desc, id asc); pool positions of the teacher's items by binary
//      search; integer counts of both modes by a block prefix scan; Gumbel keys
//      float32(c/T + g) with the spec's counter-based RNG (float64 u, log, sum);
//      bitonic sort of the keys (ties to the smaller id) for the top-L;
//      membership, q2_mask, counts; and for fused_fwd the two cross-entropies
//      by block reductions over the gathered scores.
// Offsets into the (B, N) inputs are 64-bit.
#include "rcekd_cuda.h"
#include "../rng.h"
#include "../spec.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#define RCEKD_XSTR2(...) #__VA_ARGS__
#define RCEKD_XSTR(...) RCEKD_XSTR2(__VA_ARGS__)

namespace rcekd {
namespace cuda {
namespace {

typedef unsigned long long u64;
typedef unsigned int u32;

constexpr int kThreads = 256;                            // threads of every block (a multiple of 32)
constexpr size_t kSmemCap = 40 * 1024;                   // dynamic shared memory used per block, at most
constexpr size_t kWorkspaceBudget = size_t(512) << 20;   // workspace of one chunk of rows, at most
constexpr int64_t kMinSlice = 2048;                      // items per block of a split row, at least
constexpr int kOfficialCap = spec::kOfficialCap;  // ../spec.h

// ------------------------------------------------------------------ RNG (spec 4): csrc/rng.h
using rng::lowbias32;

// ------------------------------------------------------------------ loads / keys
__device__ __forceinline__ float load_f32(const void* p, int dt, int64_t off) {
  switch (dt) {
    case kF16: return __half2float(static_cast<const __half*>(p)[off]);
    case kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[off]);
    case kF32: return static_cast<const float*>(p)[off];
    default: return static_cast<float>(static_cast<const double*>(p)[off]);
  }
}

template <typename A>
__device__ __forceinline__ A load_acc(const void* p, int dt, int64_t off);
template <>
__device__ __forceinline__ float load_acc<float>(const void* p, int dt, int64_t off) {
  return load_f32(p, dt, off);
}
template <>
__device__ __forceinline__ double load_acc<double>(const void* p, int dt, int64_t off) {
  return dt == kF64 ? static_cast<const double*>(p)[off] : static_cast<double>(load_f32(p, dt, off));
}

__device__ __forceinline__ u64 ord32(float f) {
  if (f == 0.0f) f = 0.0f;  // -0 ties with +0
  const u32 u = __float_as_uint(f);
  return static_cast<u64>((u & 0x80000000u) ? ~u : (u | 0x80000000u));
}

__device__ __forceinline__ u64 ord64(double d) {
  if (d == 0.0) d = 0.0;
  const u64 u = static_cast<u64>(__double_as_longlong(d));
  return (u >> 63) ? ~u : (u | (1ull << 63));
}

// Ranking key of item j of a row: larger ranks higher; excluded items get 0.
__device__ __forceinline__ u64 item_key(const Dense& d, const Mask& m, int64_t row, int64_t j) {
  if (m.data != nullptr && m.data[row * m.s0 + j * m.s1]) return 0;
  const int64_t off = row * d.s0 + j * d.s1;
  if (d.dtype == kF64) return ord64(static_cast<const double*>(d.data)[off]);
  return ord32(load_f32(d.data, d.dtype, off));
}

// (key desc, id asc): a comes before b
__device__ __forceinline__ bool before(u64 ka, u32 ia, u64 kb, u32 ib) {
  return ka > kb || (ka == kb && ia < ib);
}

__device__ __forceinline__ float xexp(float v) { return expf(v); }
__device__ __forceinline__ double xexp(double v) { return exp(v); }
__device__ __forceinline__ float xlog(float v) { return logf(v); }
__device__ __forceinline__ double xlog(double v) { return log(v); }

// ------------------------------------------------------------------ block helpers
// Exclusive prefix sum over the block (all threads must call it); total = block sum.
__device__ int block_excl_scan(int v, int& total) {
  __shared__ int warp_sums[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[wid] = x;
  __syncthreads();
  if (wid == 0) {
    int w = lane < nw ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    warp_sums[lane] = w;  // inclusive scan of the warp sums
  }
  __syncthreads();
  total = warp_sums[nw - 1];
  const int res = (wid > 0 ? warp_sums[wid - 1] : 0) + x - v;
  __syncthreads();  // warp_sums is reused by the next call
  return res;
}

// Sum or max over the block, returned to every thread (all threads must call it).
template <typename A>
__device__ A block_reduce(A v, bool is_max) {
  __shared__ A red[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A y = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? (y > v ? y : v) : v + y;
  }
  if (lane == 0) red[wid] = v;
  __syncthreads();
  A r = red[0];
  for (int i = 1; i < nw; ++i) r = is_max ? (red[i] > r ? red[i] : r) : r + red[i];
  __syncthreads();
  return r;
}

// Sorts P (a power of two) entries (key, id) into "before" order. Called by the
// whole block; works on shared or global memory alike.
__device__ void bitonic_sort(u64* key, u32* idx, int P) {
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int i = threadIdx.x; i < P; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const u64 ka = key[i], kb = key[j];
          const u32 ia = idx[i], ib = idx[j];
          const bool up = (i & size) == 0;
          if (up ? before(kb, ib, ka, ia) : before(ka, ia, kb, ib)) {
            key[i] = kb;
            key[j] = ka;
            idx[i] = ib;
            idx[j] = ia;
          }
        }
      }
    }
  }
  __syncthreads();
}

// Softmax statistics of one set of gathered positions (both score vectors).
template <typename A>
struct SetStats {
  A mx, my, sx, sy;
};

// get(w, x, y) loads the scores / tau at position w; mem(w) says whether w is in the set.
template <typename A, typename Get, typename Mem>
__device__ SetStats<A> block_set_stats(int64_t n, Get get, Mem mem) {
  A mx = -INFINITY, my = -INFINITY;
  for (int64_t w = threadIdx.x; w < n; w += blockDim.x) {
    if (!mem(w)) continue;
    A x, y;
    get(w, x, y);
    mx = x > mx ? x : mx;
    my = y > my ? y : my;
  }
  mx = block_reduce<A>(mx, true);
  my = block_reduce<A>(my, true);
  A sx = 0, sy = 0;
  for (int64_t w = threadIdx.x; w < n; w += blockDim.x) {
    if (!mem(w)) continue;
    A x, y;
    get(w, x, y);
    sx += xexp(x - mx);
    sy += xexp(y - my);
  }
  sx = block_reduce<A>(sx, false);
  sy = block_reduce<A>(sy, false);
  return {mx, my, sx, sy};
}

// -sum softmax(y) * log_softmax(x) over the set.
template <typename A, typename Get, typename Mem>
__device__ A block_set_ce(int64_t n, Get get, Mem mem) {
  const SetStats<A> st = block_set_stats<A>(n, get, mem);
  const A lsx = xlog(st.sx);
  A acc = 0;
  for (int64_t w = threadIdx.x; w < n; w += blockDim.x) {
    if (!mem(w)) continue;
    A x, y;
    get(w, x, y);
    acc += xexp(y - st.my) * ((x - st.mx) - lsx);
  }
  acc = block_reduce<A>(acc, false);
  return -acc / st.sy;
}

// ================================================================ top-k selection
// Per row of a chunk: prefix (the threshold's bits found so far), want (items still
// to take at the threshold's prefix), hist (256 counts of the current digit).
__global__ void sel_init_kernel(u64* prefix, long long* want, u32* hist, int64_t k) {
  const int64_t r = blockIdx.x;
  if (threadIdx.x == 0) {
    prefix[r] = 0;
    want[r] = k;
  }
  for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[r * 256 + i] = 0;
}

__global__ void __launch_bounds__(kThreads)
    radix_hist_kernel(Dense d, Mask m, int64_t row0, int64_t N, int64_t slice, int shift, const u64* prefix,
                      u32* hist) {
  __shared__ u32 h[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) h[i] = 0;
  __syncthreads();
  const int64_t lr = blockIdx.x, row = row0 + lr;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * slice;
  const int64_t j1 = min(N, j0 + slice);
  const u64 pre = prefix[lr];
  const int hs = shift + 8;  // bits above the current digit must match the prefix
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    const u64 k = item_key(d, m, row, j);
    if (hs >= 64 || (k >> hs) == (pre >> hs)) atomicAdd(&h[(k >> shift) & 255u], 1u);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += blockDim.x)
    if (h[i] != 0) atomicAdd(&hist[lr * 256 + i], h[i]);
}

__global__ void radix_pick_kernel(int shift, u64* prefix, long long* want, u32* hist) {
  const int64_t lr = blockIdx.x;
  u32* hr = hist + lr * 256;
  if (threadIdx.x == 0) {
    const long long w = want[lr];
    long long above = 0;
    int d = 255;
    for (; d > 0; --d) {
      const long long c = hr[d];
      if (above + c >= w) break;
      above += c;
    }
    prefix[lr] |= static_cast<u64>(d) << shift;
    want[lr] = w - above;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += blockDim.x) hr[i] = 0;
}

// Items above / equal to the threshold in each slice: cnt[(lr * S + s) * 2 + {0, 1}].
__global__ void __launch_bounds__(kThreads)
    sel_count_kernel(Dense d, Mask m, int64_t row0, int64_t N, int64_t slice, const u64* prefix, int* cnt) {
  __shared__ int n_gt, n_eq;
  if (threadIdx.x == 0) n_gt = n_eq = 0;
  __syncthreads();
  const int64_t lr = blockIdx.x, row = row0 + lr;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * slice;
  const int64_t j1 = min(N, j0 + slice);
  const u64 thr = prefix[lr];
  int gt = 0, eq = 0;
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    const u64 k = item_key(d, m, row, j);
    gt += k > thr;
    eq += k == thr;
  }
  if (gt) atomicAdd(&n_gt, gt);
  if (eq) atomicAdd(&n_eq, eq);
  __syncthreads();
  if (threadIdx.x == 0) {
    const int64_t c = (lr * gridDim.y + blockIdx.y) * 2;
    cnt[c] = n_gt;
    cnt[c + 1] = n_eq;
  }
}

// Writes the k selected items of each row (unsorted keys and ids) to out_key/out_idx:
// first the items above the threshold, then the smallest-id items at it.
__global__ void __launch_bounds__(kThreads)
    sel_compact_kernel(Dense d, Mask m, int64_t row0, int64_t N, int64_t slice, const u64* prefix,
                       const long long* want, const int* cnt, int64_t k, u64* out_key, u32* out_idx) {
  __shared__ int base_sh[2];
  const int64_t lr = blockIdx.x, row = row0 + lr;
  const int S = gridDim.y, s = blockIdx.y;
  if (threadIdx.x == 0) {
    int bg = 0, be = 0;
    for (int q = 0; q < s; ++q) {
      bg += cnt[(lr * S + q) * 2];
      be += cnt[(lr * S + q) * 2 + 1];
    }
    base_sh[0] = bg;
    base_sh[1] = be;
  }
  __syncthreads();
  int base_gt = base_sh[0], base_eq = base_sh[1];
  const long long need = want[lr];  // items to take at the threshold
  const long long n_gt_row = k - need;
  const int my_gt = cnt[(lr * S + s) * 2];
  if (my_gt == 0 && base_eq >= need) return;  // nothing of this slice is taken (uniform)
  const u64 thr = prefix[lr];
  const int64_t j0 = static_cast<int64_t>(s) * slice;
  const int64_t j1 = min(N, j0 + slice);
  u64* ok = out_key + lr * k;
  u32* oi = out_idx + lr * k;
  for (int64_t t0 = j0; t0 < j1; t0 += blockDim.x) {
    const int64_t j = t0 + threadIdx.x;
    u64 key = 0;
    int gt = 0, eq = 0;
    if (j < j1) {
      key = item_key(d, m, row, j);
      gt = key > thr;
      eq = key == thr;
    }
    int tot;
    const int off = block_excl_scan((gt << 16) | eq, tot);  // tile counts < 2^16
    if (gt) {
      const int64_t p = base_gt + (off >> 16);
      ok[p] = key;
      oi[p] = static_cast<u32>(j);
    } else if (eq) {
      const long long r = base_eq + (off & 0xFFFF);
      if (r < need) {
        ok[n_gt_row + r] = key;
        oi[n_gt_row + r] = static_cast<u32>(j);
      }
    }
    base_gt += tot >> 16;
    base_eq += tot & 0xFFFF;
  }
}

// Sorts the K selected teacher items of each row and writes their ids to qt.
__global__ void __launch_bounds__(kThreads)
    teacher_sort_kernel(const u64* in_key, const u32* in_idx, int64_t K, int P, bool use_smem, unsigned char* gwork,
                        size_t work_stride, int64_t row0, int64_t* qt, int64_t qt_stride) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t lr = blockIdx.x, row = row0 + lr;
  unsigned char* work = use_smem ? smem : gwork + lr * work_stride;
  u64* key = reinterpret_cast<u64*>(work);
  u32* idx = reinterpret_cast<u32*>(key + P);
  for (int i = threadIdx.x; i < P; i += blockDim.x) {
    if (i < K) {
      key[i] = in_key[lr * K + i];
      idx[i] = in_idx[lr * K + i];
    } else {
      key[i] = 0;
      idx[i] = 0xFFFFFFFFu;
    }
  }
  bitonic_sort(key, idx, P);
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x) qt[row * qt_stride + i] = idx[i];
}

struct FinishParams {
  int64_t row0, N, K, M, L;
  int P;
  bool paper;
  double T;     // sampling temperature (float64, as the keys)
  float inv_K;  // 1 / K in float32
  u32 seed;
  Dense s, t;
  Mask ex;
  const int64_t* row_ids;
  const u64* pool_key;
  const u32* pool_idx;
  bool use_smem;
  unsigned char* gwork;
  size_t work_stride;
  int64_t* qs;
  int64_t qs_stride;
  int64_t* sampled;
  int64_t a_stride;
  const int64_t* qt;
  int64_t qt_stride;
  bool* q2;
  int64_t* counts;
  void* loss;
  float* stats;
  double tau, beta;
};

inline size_t finish_bytes(int64_t K, int64_t M, int P) {
  const size_t b = 8 * (static_cast<size_t>(P) + K) + 4 * (static_cast<size_t>(P) + K + M);
  return (b + 15) & ~size_t(15);
}

template <typename A>
__global__ void __launch_bounds__(kThreads) finish_kernel(FinishParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int sh_n_out, sh_n_q1, sh_n_qa;
  const int64_t lr = blockIdx.x, row = p.row0 + lr;
  const int64_t K = p.K, M = p.M, L = p.L;
  const int P = p.P;
  const int tid = threadIdx.x, nt = blockDim.x;
  unsigned char* work = p.use_smem ? smem : p.gwork + lr * p.work_stride;
  u64* key = reinterpret_cast<u64*>(work);  // P
  u64* qkey = key + P;                        // K
  u32* idx = reinterpret_cast<u32*>(qkey + K);  // P
  int* pos_t = reinterpret_cast<int*>(idx + P);  // K
  int* mark = pos_t + K;                         // M

  // 1. the pool in student order
  for (int i = tid; i < P; i += nt) {
    if (i < M) {
      key[i] = p.pool_key[lr * M + i];
      idx[i] = p.pool_idx[lr * M + i];
    } else {
      key[i] = 0;
      idx[i] = 0xFFFFFFFFu;
    }
  }
  if (tid == 0) sh_n_out = sh_n_q1 = sh_n_qa = 0;
  bitonic_sort(key, idx, P);
  for (int64_t i = tid; i < K; i += nt) p.qs[row * p.qs_stride + i] = idx[i];

  // 2. pool positions of the teacher's items (M when outside the pool)
  const int64_t* qt = p.qt + row * p.qt_stride;
  for (int64_t i = tid; i < K; i += nt) {
    const int64_t j = qt[i];
    int pos = static_cast<int>(M);
    if (j >= 0 && j < p.N) {
      const u64 kj = item_key(p.s, p.ex, row, j);
      const u32 ij = static_cast<u32>(j);
      int lo = 0, hi = static_cast<int>(M);
      while (lo < hi) {  // first entry not before (kj, ij)
        const int mid = (lo + hi) >> 1;
        if (before(key[mid], idx[mid], kj, ij)) lo = mid + 1;
        else hi = mid;
      }
      if (lo < M && key[lo] == kj && idx[lo] == ij) pos = lo;
    }
    pos_t[i] = pos;
  }
  for (int64_t q = tid; q < M; q += nt) mark[q] = 0;
  __syncthreads();
  for (int64_t i = tid; i < K; i += nt) {
    const int pos = pos_t[i];
    if (p.paper) {
      if (pos >= M) atomicAdd(&sh_n_out, 1);
      else if (pos >= K) mark[pos] = 1;
    } else if (pos < M) {
      mark[pos] = 1;
    }
  }
  __syncthreads();

  // 3. inclusive prefix counts of the marked positions, in place
  int carry = 0;
  for (int64_t base = 0; base < M; base += nt) {
    const int64_t q = base + tid;
    const int v = q < M ? mark[q] : 0;
    int tot;
    const int ex = block_excl_scan(v, tot);
    if (q < M) mark[q] = carry + ex + v;
    carry += tot;
  }
  __syncthreads();
  const int total = carry;
  const int n_out = sh_n_out;

  // 4. Gumbel keys of the pool: c / T + g
  const u32 k2 = rng::row_key(static_cast<int64_t>(p.seed), p.row_ids[row]);
  for (int64_t q = tid; q < M; q += nt) {
    const int incl = mark[q];
    const int excl = q > 0 ? mark[q - 1] : 0;
    const int c = p.paper ? n_out + (total - incl) : min(kOfficialCap, total - excl);
    // key = float32(c / T + g): u exact and g = -log(-log u) in float64, the sum in
    // float64 rounded once (the _rn intrinsics forbid FMA contraction)
    const u32 h = lowbias32(k2 ^ idx[q]);
    const double u = (static_cast<double>(h >> 8) + 0.5) * 5.9604644775390625e-08;
    const double g = -log(-log(u));
    key[q] = ord32(__double2float_rn(__dadd_rn(__ddiv_rn(static_cast<double>(c), p.T), g)));
  }
  __syncthreads();
  for (int64_t i = tid; i < K; i += nt) {
    const int pos = pos_t[i];
    qkey[i] = pos < M ? key[pos] : 0;
  }
  // 5. top-L of the keys (ties to the smaller id)
  bitonic_sort(key, idx, P);
  for (int64_t l = tid; l < L; l += nt) p.sampled[row * p.a_stride + l] = idx[l];
  const u64 tk = key[L - 1];
  const u32 ti = idx[L - 1];
  for (int64_t i = tid; i < K; i += nt) {
    const int pos = pos_t[i];
    const bool in_a = pos < M && !before(tk, ti, qkey[i], static_cast<u32>(qt[i]));
    p.q2[row * K + i] = pos >= K && !in_a;
    if (pos < K) atomicAdd(&sh_n_q1, 1);
    if (in_a) atomicAdd(&sh_n_qa, 1);
  }
  __syncthreads();
  const int n_q1 = sh_n_q1, n_qa = sh_n_qa;
  if (p.counts != nullptr && tid == 0) {
    p.counts[2 * row] = n_q1;
    p.counts[2 * row + 1] = n_qa;
  }
  if (p.loss == nullptr) return;

  // 6. fused: the loss on [QS | A | QT]
  const int64_t* qs = p.qs + row * p.qs_stride;
  const int64_t* sa = p.sampled + row * p.a_stride;
  const bool* q2 = p.q2 + row * K;
  const A tau = static_cast<A>(p.tau);
  const Dense ds = p.s, dt = p.t;
  auto id_at = [&](int64_t w) -> int64_t { return w < K ? qs[w] : (w < K + L ? sa[w - K] : qt[w - K - L]); };
  auto get = [&](int64_t w, A& x, A& y) {
    int64_t j = id_at(w);
    if (j < 0 || j >= p.N) j = 0;  // only with invalid teacher ids (validate=False)
    x = load_acc<A>(ds.data, ds.dtype, row * ds.s0 + j * ds.s1) / tau;
    y = load_acc<A>(dt.data, dt.dtype, row * dt.s0 + j * dt.s1) / tau;
  };
  const A l1 = block_set_ce<A>(K, get, [&](int64_t w) { return w < K; });
  auto get2 = [&](int64_t w, A& x, A& y) { get(w + K, x, y); };
  const A l2 = block_set_ce<A>(L + K, get2, [&](int64_t w) { return w < L || q2[w - L]; });
  if (tid == 0) {
    const int n = p.paper ? n_q1 : n_qa;
    // as the reference on CUDA tensors: exp(-(beta * n) * (1/K)) in float32
    const float bn = __fmul_rn(static_cast<float>(p.beta), static_cast<float>(n));
    const float gm = expf(__fmul_rn(-bn, p.inv_K));
    const A g = static_cast<A>(gm);
    static_cast<A*>(p.loss)[row] = (1 - g) * l1 + g * l2;
    float* st = p.stats + 5 * row;
    st[0] = static_cast<float>(l1);
    st[1] = static_cast<float>(l2);
    st[2] = gm;
    st[3] = static_cast<float>(n_q1);
    st[4] = static_cast<float>(n_qa);
  }
}

// ================================================================ gathered losses
template <typename A>
__global__ void __launch_bounds__(kThreads) subset_fwd_kernel(SubsetArgs a) {
  const int64_t row = blockIdx.x, K = a.K, L = a.L, W = 2 * K + L;
  const A* xs = static_cast<const A*>(a.s_g) + row * W;
  const A* ys = static_cast<const A*>(a.t_g) + row * W;
  const bool* q2 = a.q2 + row * K;
  const A tau = static_cast<A>(a.tau);
  auto get = [&](int64_t w, A& x, A& y) {
    x = xs[w] / tau;
    y = ys[w] / tau;
  };
  const A l1 = block_set_ce<A>(K, get, [&](int64_t w) { return w < K; });
  auto get2 = [&](int64_t w, A& x, A& y) { get(w + K, x, y); };
  const A l2 = block_set_ce<A>(L + K, get2, [&](int64_t w) { return w < L || q2[w - L]; });
  if (threadIdx.x == 0) {
    const A g = static_cast<const A*>(a.gamma)[row];
    static_cast<A*>(a.loss)[row] = (1 - g) * l1 + g * l2;
    static_cast<A*>(a.parts)[2 * row] = l1;
    static_cast<A*>(a.parts)[2 * row + 1] = l2;
  }
}

// d(grad_row * loss_row)/d x at the W positions of one row, by callback out(w, value).
template <typename A, typename Get, typename Out>
__device__ void block_row_grads(int64_t K, int64_t L, const bool* q2, A gamma, A w_row, Get get, Out out) {
  const int64_t W = 2 * K + L;
  auto m1 = [&](int64_t w) { return w < K; };
  auto get2 = [&](int64_t w, A& x, A& y) { get(w + K, x, y); };
  auto m2 = [&](int64_t w) { return w < L || q2[w - L]; };
  const SetStats<A> s1 = block_set_stats<A>(K, get, m1);
  const SetStats<A> s2 = block_set_stats<A>(L + K, get2, m2);
  const A f1 = (1 - gamma) * w_row, f2 = gamma * w_row;
  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) {
    A x, y;
    get(w, x, y);
    A v;
    if (w < K) v = (xexp(x - s1.mx) / s1.sx - xexp(y - s1.my) / s1.sy) * f1;
    else if (m2(w - K)) v = (xexp(x - s2.mx) / s2.sx - xexp(y - s2.my) / s2.sy) * f2;
    else v = 0;
    out(w, v);
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads) subset_bwd_kernel(SubsetArgs a) {
  const int64_t row = blockIdx.x, K = a.K, L = a.L, W = 2 * K + L;
  const A* xs = static_cast<const A*>(a.s_g) + row * W;
  const A* ys = static_cast<const A*>(a.t_g) + row * W;
  A* gr = static_cast<A*>(a.grad) + row * W;
  const A tau = static_cast<A>(a.tau);
  auto get = [&](int64_t w, A& x, A& y) {
    x = xs[w] / tau;
    y = ys[w] / tau;
  };
  const A gamma = static_cast<const A*>(a.gamma)[row];
  const A w_row = static_cast<const A*>(a.grad_rows)[row] / tau;
  block_row_grads<A>(K, L, a.q2 + row * K, gamma, w_row, get, [&](int64_t w, A v) { gr[w] = v; });
}

struct FusedBwdParams {
  FusedBwdArgs a;
  int P;
  bool use_smem;
  unsigned char* gwork;
  size_t work_stride;
  int64_t row0;
};

template <typename A>
inline size_t bwd_bytes(int64_t W, int P) {
  const size_t b = 12 * static_cast<size_t>(P) + sizeof(A) * static_cast<size_t>(W) + 16;
  return (b + 15) & ~size_t(15);
}

__device__ __forceinline__ void store_out(void* out, int dt, int64_t off, float v) {
  switch (dt) {
    case kF16: static_cast<__half*>(out)[off] = __float2half_rn(v); break;
    case kBF16: static_cast<__nv_bfloat16*>(out)[off] = __float2bfloat16_rn(v); break;
    case kF32: static_cast<float*>(out)[off] = v; break;
    default: static_cast<double*>(out)[off] = v; break;
  }
}
__device__ __forceinline__ void store_out(void* out, int dt, int64_t off, double v) {
  if (dt == kF64) static_cast<double*>(out)[off] = v;
  else store_out(out, dt, off, static_cast<float>(v));
}

template <typename A>
__global__ void __launch_bounds__(kThreads) fused_bwd_kernel(FusedBwdParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const FusedBwdArgs& a = p.a;
  const int64_t lr = blockIdx.x, row = p.row0 + lr;
  const int64_t K = a.K, L = a.L, W = 2 * K + L, N = a.N;
  const int P = p.P;
  unsigned char* work = p.use_smem ? smem : p.gwork + lr * p.work_stride;
  u64* key = reinterpret_cast<u64*>(work);        // P: ~item (sorts by item ascending)
  A* d = reinterpret_cast<A*>(key + P);           // W
  u32* pos = reinterpret_cast<u32*>(d + W);       // P: position in the row
  const int64_t* ids = a.idx + row * W;
  const A tau = static_cast<A>(a.tau);
  auto get = [&](int64_t w, A& x, A& y) {
    int64_t j = ids[w];
    if (j < 0 || j >= N) j = 0;  // invalid ids get no gradient (see below)
    x = load_acc<A>(a.s.data, a.s.dtype, row * a.s.s0 + j * a.s.s1) / tau;
    y = load_acc<A>(a.t.data, a.t.dtype, row * a.t.s0 + j * a.t.s1) / tau;
  };
  const A gamma = static_cast<const A*>(a.gamma)[row];
  const A w_row = static_cast<const A*>(a.grad_rows)[row] / tau;
  block_row_grads<A>(K, L, a.q2 + row * K, gamma, w_row, get, [&](int64_t w, A v) { d[w] = v; });
  for (int i = threadIdx.x; i < P; i += blockDim.x) {
    if (i < W) {
      key[i] = ~static_cast<u64>(ids[i]);
      pos[i] = static_cast<u32>(i);
    } else {
      key[i] = 0;
      pos[i] = 0xFFFFFFFFu;
    }
  }
  bitonic_sort(key, pos, P);  // by item ascending, then position ascending
  // each item once: the sum of its positions' values, in position order
  for (int64_t e = threadIdx.x; e < W; e += blockDim.x) {
    if (e > 0 && key[e] == key[e - 1]) continue;
    A sum = 0;
    for (int64_t f = e; f < W && key[f] == key[e]; ++f)
      if (pos[f] < W) sum += d[pos[f]];
    const int64_t item = static_cast<int64_t>(~key[e]);
    if (item >= 0 && item < N) store_out(a.out, a.s.dtype, row * N + item, sum);
  }
}

// ================================================================ host side
int next_pow2(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

size_t align256(size_t b) { return (b + 255) & ~size_t(255); }

int num_sms() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 80;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) return 80;
  return n;
}

// The workspace of select / fused_fwd, for a chunk of R rows.
struct SelLayout {
  int64_t R = 1;    // rows per chunk
  int S = 1;        // blocks per row in the radix kernels
  int64_t slice = 1;
  int P_M = 1, P_K = 1;
  bool need_teacher = false;
  bool fin_smem = true, ts_smem = true;
  size_t fin_bytes = 0, ts_bytes = 0;
  // offsets in bytes
  size_t o_pkey = 0, o_pidx = 0, o_tkey = 0, o_tidx = 0, o_prefix = 0, o_want = 0, o_hist = 0, o_cnt = 0,
         o_fin = 0, o_ts = 0, total = 0;
};

SelLayout sel_layout(const SelectArgs& a) {
  SelLayout l;
  l.need_teacher = a.given_qt == nullptr;
  l.P_M = next_pow2(a.M);
  l.P_K = next_pow2(a.K);
  l.fin_bytes = finish_bytes(a.K, a.M, l.P_M);
  l.fin_smem = l.fin_bytes <= kSmemCap;
  l.ts_bytes = align256(12 * static_cast<size_t>(l.P_K));
  l.ts_smem = l.ts_bytes <= kSmemCap;
  const size_t base = 12 * static_cast<size_t>(a.M) + (l.need_teacher ? 12 * static_cast<size_t>(a.K) : 0) +
                      2 * 8 + 256 * 4 + (l.fin_smem ? 0 : l.fin_bytes) +
                      (l.need_teacher && !l.ts_smem ? l.ts_bytes : 0) + 64;
  const int64_t R0 = std::max<int64_t>(1, std::min<int64_t>(a.B, static_cast<int64_t>(kWorkspaceBudget / base)));
  const int64_t target = 8 * static_cast<int64_t>(num_sms());
  const int64_t max_split = std::min<int64_t>(65535, std::max<int64_t>(1, (a.N + kMinSlice - 1) / kMinSlice));
  l.S = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_split, (target + R0 - 1) / R0)));
  l.slice = (a.N + l.S - 1) / l.S;
  const size_t per_row = base + 8 * static_cast<size_t>(l.S);
  l.R = std::max<int64_t>(1, std::min<int64_t>(a.B, static_cast<int64_t>(kWorkspaceBudget / per_row)));
  const size_t R = static_cast<size_t>(l.R);
  size_t o = 0;
  l.o_pkey = o; o = align256(o + R * a.M * 8);
  l.o_pidx = o; o = align256(o + R * a.M * 4);
  l.o_tkey = o; o = align256(o + (l.need_teacher ? R * a.K * 8 : 0));
  l.o_tidx = o; o = align256(o + (l.need_teacher ? R * a.K * 4 : 0));
  l.o_prefix = o; o = align256(o + R * 8);
  l.o_want = o; o = align256(o + R * 8);
  l.o_hist = o; o = align256(o + R * 256 * 4);
  l.o_cnt = o; o = align256(o + R * l.S * 2 * 4);
  l.o_fin = o; o = align256(o + (l.fin_smem ? 0 : R * l.fin_bytes));
  l.o_ts = o; o = align256(o + (l.need_teacher && !l.ts_smem ? R * l.ts_bytes : 0));
  l.total = o;
  return l;
}

// Top-k (unsorted) of `rows` rows starting at row0 into out_key/out_idx (rows, k).
cudaError_t run_topk(const Dense& d, const Mask& m, int64_t row0, int64_t rows, int64_t N, int64_t k,
                     const SelLayout& l, unsigned char* ws, u64* out_key, u32* out_idx, cudaStream_t st) {
  u64* prefix = reinterpret_cast<u64*>(ws + l.o_prefix);
  long long* want = reinterpret_cast<long long*>(ws + l.o_want);
  u32* hist = reinterpret_cast<u32*>(ws + l.o_hist);
  int* cnt = reinterpret_cast<int*>(ws + l.o_cnt);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(l.S));
  sel_init_kernel<<<static_cast<unsigned>(rows), kThreads, 0, st>>>(prefix, want, hist, k);
  const int nbits = d.dtype == kF64 ? 64 : 32;
  for (int shift = nbits - 8; shift >= 0; shift -= 8) {
    radix_hist_kernel<<<grid, kThreads, 0, st>>>(d, m, row0, N, l.slice, shift, prefix, hist);
    radix_pick_kernel<<<static_cast<unsigned>(rows), kThreads, 0, st>>>(shift, prefix, want, hist);
  }
  sel_count_kernel<<<grid, kThreads, 0, st>>>(d, m, row0, N, l.slice, prefix, cnt);
  sel_compact_kernel<<<grid, kThreads, 0, st>>>(d, m, row0, N, l.slice, prefix, want, cnt, k, out_key, out_idx);
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------- launchers
size_t select_workspace_bytes(const SelectArgs& a) {
  if (a.B == 0) return 0;
  return sel_layout(a).total;
}

cudaError_t select_launch(const SelectArgs& a, void* workspace, cudaStream_t st) {
  if (a.B == 0) return cudaSuccess;
  const SelLayout l = sel_layout(a);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  u64* pkey = reinterpret_cast<u64*>(ws + l.o_pkey);
  u32* pidx = reinterpret_cast<u32*>(ws + l.o_pidx);
  u64* tkey = reinterpret_cast<u64*>(ws + l.o_tkey);
  u32* tidx = reinterpret_cast<u32*>(ws + l.o_tidx);
  const bool is_double = a.s.dtype == kF64;
  cudaError_t err = cudaSuccess;
  for (int64_t row0 = 0; row0 < a.B; row0 += l.R) {
    const int64_t rows = std::min<int64_t>(l.R, a.B - row0);
    const unsigned nb = static_cast<unsigned>(rows);
    if (l.need_teacher) {
      err = run_topk(a.t, a.exclude, row0, rows, a.N, a.K, l, ws, tkey, tidx, st);
      if (err != cudaSuccess) return err;
      teacher_sort_kernel<<<nb, kThreads, l.ts_smem ? l.ts_bytes : 0, st>>>(
          tkey, tidx, a.K, l.P_K, l.ts_smem, ws + l.o_ts, l.ts_bytes, row0, a.qt, a.qt_stride);
    } else {
      err = cudaMemcpy2DAsync(a.qt + row0 * a.qt_stride, a.qt_stride * sizeof(int64_t), a.given_qt + row0 * a.K,
                              a.K * sizeof(int64_t), a.K * sizeof(int64_t), rows, cudaMemcpyDeviceToDevice, st);
      if (err != cudaSuccess) return err;
    }
    err = run_topk(a.s, a.exclude, row0, rows, a.N, a.M, l, ws, pkey, pidx, st);
    if (err != cudaSuccess) return err;
    FinishParams p;
    p.row0 = row0;
    p.N = a.N;
    p.K = a.K;
    p.M = a.M;
    p.L = a.L;
    p.P = l.P_M;
    p.paper = a.paper;
    p.T = static_cast<double>(a.T);
    p.inv_K = static_cast<float>(1.0 / static_cast<double>(a.K));
    p.seed = a.seed;
    p.s = a.s;
    p.t = a.t;
    p.ex = a.exclude;
    p.row_ids = a.row_ids;
    p.pool_key = pkey;
    p.pool_idx = pidx;
    p.use_smem = l.fin_smem;
    p.gwork = ws + l.o_fin;
    p.work_stride = l.fin_bytes;
    p.qs = a.qs;
    p.qs_stride = a.qs_stride;
    p.sampled = a.sampled;
    p.a_stride = a.a_stride;
    p.qt = a.qt;
    p.qt_stride = a.qt_stride;
    p.q2 = a.q2;
    p.counts = a.counts;
    p.loss = a.loss;
    p.stats = a.stats;
    p.tau = a.tau;
    p.beta = a.beta;
    const size_t sm = l.fin_smem ? l.fin_bytes : 0;
    if (is_double) finish_kernel<double><<<nb, kThreads, sm, st>>>(p);
    else finish_kernel<float><<<nb, kThreads, sm, st>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return err;
}

cudaError_t subset_fwd_launch(const SubsetArgs& a, cudaStream_t st) {
  if (a.B == 0) return cudaSuccess;
  const unsigned nb = static_cast<unsigned>(a.B);
  if (a.is_double) subset_fwd_kernel<double><<<nb, kThreads, 0, st>>>(a);
  else subset_fwd_kernel<float><<<nb, kThreads, 0, st>>>(a);
  return cudaGetLastError();
}

cudaError_t subset_bwd_launch(const SubsetArgs& a, cudaStream_t st) {
  if (a.B == 0) return cudaSuccess;
  const unsigned nb = static_cast<unsigned>(a.B);
  if (a.is_double) subset_bwd_kernel<double><<<nb, kThreads, 0, st>>>(a);
  else subset_bwd_kernel<float><<<nb, kThreads, 0, st>>>(a);
  return cudaGetLastError();
}

namespace {
struct BwdLayout {
  int P = 1;
  size_t bytes = 0;
  bool smem = true;
  int64_t R = 1;
  size_t total = 0;
};
BwdLayout bwd_layout(const FusedBwdArgs& a) {
  BwdLayout l;
  const int64_t W = 2 * a.K + a.L;
  l.P = next_pow2(W);
  l.bytes = a.s.dtype == kF64 ? bwd_bytes<double>(W, l.P) : bwd_bytes<float>(W, l.P);
  l.smem = l.bytes <= kSmemCap;
  l.R = l.smem ? std::max<int64_t>(a.B, 1)
               : std::max<int64_t>(1, std::min<int64_t>(a.B, static_cast<int64_t>(kWorkspaceBudget / l.bytes)));
  l.total = l.smem ? 0 : static_cast<size_t>(l.R) * l.bytes;
  return l;
}
}  // namespace

size_t fused_bwd_workspace_bytes(const FusedBwdArgs& a) {
  if (a.B == 0) return 0;
  return bwd_layout(a).total;
}

cudaError_t fused_bwd_launch(const FusedBwdArgs& a, void* workspace, cudaStream_t st) {
  if (a.B == 0) return cudaSuccess;
  const BwdLayout l = bwd_layout(a);
  for (int64_t row0 = 0; row0 < a.B; row0 += l.R) {
    const int64_t rows = std::min<int64_t>(l.R, a.B - row0);
    FusedBwdParams p;
    p.a = a;
    p.P = l.P;
    p.use_smem = l.smem;
    p.gwork = static_cast<unsigned char*>(workspace);
    p.work_stride = l.bytes;
    p.row0 = row0;
    const size_t sm = l.smem ? l.bytes : 0;
    const unsigned nb = static_cast<unsigned>(rows);
    if (a.s.dtype == kF64) fused_bwd_kernel<double><<<nb, kThreads, sm, st>>>(p);
    else fused_bwd_kernel<float><<<nb, kThreads, sm, st>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

std::string build_info_json() {
  std::string s = "\"cuda_archs\": [";
#ifdef __CUDA_ARCH_LIST__
  s += RCEKD_XSTR(__CUDA_ARCH_LIST__);
#endif
  s += "], \"cuda_runtime\": \"" + std::to_string(CUDART_VERSION / 1000) + "." +
       std::to_string((CUDART_VERSION % 1000) / 10) + "\"";
  s += ", \"nvcc\": \"" + std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__) + "\"";
  return s;
}

}  // namespace cuda
}  // namespace rcekd
