// Kernel templates of the divergence family and their typed launchers (no torch include).
// Included once per element type by divergence_{f32,bf16,f16}.cu.
//
// Forward, one row of the comparison per cluster of C blocks (C = 1 off Hopper), the row split in
// C slices of `slice` elements; persistent grid: clusters loop over rows.
//
//   pass 1  16-byte loads of both slices (kept in shared memory when CACHED), per-thread online
//           max / sum-exp of a = p[ref[r]] / T and b = q[r] / T, then a warp-shuffle + shared
//           memory + DSMEM reduction of the two (max, sum) pairs          -> (shift, logsum) a, b
//   pass 2  lp = (a - shift_a) - logsum_a, lq likewise, P, Q, (log M), sums -> S_P, S_Q, loss, stats
//   pass 3  the requested gradients, times 1/T, 16-byte streaming stores
//
// Passes 2-3 read shared memory when CACHED (HBM traffic: each logit read once, each gradient
// written once), else global memory again (the launcher then bounds the rows in flight so that
// they stay in L2). Pass 3 folds into pass 2 when the gradients do not need the row sums
// (kl_forward with only Q's gradient: Q - P; kl_reverse with only P's: P - Q), as in Triton.
//
// Backward: scale_rows (stored gradient times the incoming per-row gradient) and, with ref_index,
// grad_p_shared: one block per (P row, chunk of 16-byte packs), the P chunk held in registers,
// looping over the copies that reference the row (CSR from the torch glue), fp32 accumulation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "common.cuh"
#include "divergence.h"

namespace modkern {
namespace div {

constexpr int kMaxThreads = 512;
// Packs of each row loaded per thread before any is used (memory-level parallelism). 2 keeps
// fwd_kernel within 128 registers without spills; 4 (or 4 in pass 1 only) spilled (csrc/README.md).
constexpr int kUnroll = 2;
constexpr int kBwdThreads = 256;
constexpr int kBwdUnroll = 2;

struct FwdParams {
  const void* p;
  const void* q;
  const int64_t* ref;
  const bool* mask;
  float* loss;
  float* stats;
  void* grad_p;
  void* grad_q;
  int64_t rows, vocab, slice;
  int64_t stride_p, stride_q, stride_gp, stride_gq;
  float inv_t, beta, log_beta, log_1mbeta;
  bool write_gp, write_gq, fused;
};

// ---------------------------------------------------------------------------------------------
// Per-element math (identical formulas to kernels/divergence.py).
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float logaddexp(float x, float y) {
  const float mx = fmaxf(x, y);
  const float mn = fminf(x, y);
  return mx + __logf(1.f + __expf(mn - mx));
}

struct Terms {
  float lp, lq, P, Q, xp, xq;  // log-probs, probs, and what each log is compared with
};

template <int KIND>
__device__ __forceinline__ Terms row_terms(float a, float b, float sh_a, float ls_a, float sh_b, float ls_b,
                                           float log_beta, float log_1mbeta) {
  // lse = shift + ls kept apart: a - shift is exact and ls is O(1), so log P keeps full precision
  // near the top entries (forming shift + ls ~ 20 first rounds at ulp(20) ~ 2e-6; see
  // kernels/divergence.py _lse_finish).
  Terms t;
  t.lp = (a - sh_a) - ls_a;
  t.lq = (b - sh_b) - ls_b;
  t.P = __expf(t.lp);
  t.Q = __expf(t.lq);
  if constexpr (KIND == kJS) {
    const float lm = logaddexp(t.lp + log_beta, t.lq + log_1mbeta);
    t.xp = lm;
    t.xq = lm;
  } else {
    t.xp = t.lq;
    t.xq = t.lp;
  }
  return t;
}

// d loss / d a before 1/T:  js beta P (lp - lm - S_P);  kl_forward P (lp - lq - S_P);
// kl_reverse P - Q;  kl_symmetric both KL rows.  0 where P == 0.
template <int KIND>
__device__ __forceinline__ float grad_a(const Terms& t, float s_p, float beta) {
  const float own = t.P == 0.f ? 0.f : t.P * (t.lp - t.xp - s_p);
  if constexpr (KIND == kJS) return beta * own;
  if constexpr (KIND == kKLForward) return own;
  if constexpr (KIND == kKLReverse) return t.P - t.Q;
  return own + (t.P - t.Q);
}

// d loss / d b before 1/T:  js (1-beta) Q (lq - lm - S_Q);  kl_forward Q - P;
// kl_reverse Q (lq - lp - S_Q);  kl_symmetric both.  0 where Q == 0.
template <int KIND>
__device__ __forceinline__ float grad_b(const Terms& t, float s_q, float beta) {
  const float own = t.Q == 0.f ? 0.f : t.Q * (t.lq - t.xq - s_q);
  if constexpr (KIND == kJS) return (1.f - beta) * own;
  if constexpr (KIND == kKLForward) return t.Q - t.P;
  if constexpr (KIND == kKLReverse) return own;
  return own + (t.Q - t.P);
}

// Running (max, sum exp(x - max)) of one thread, updated with N values at once.
template <int N>
__device__ __forceinline__ void lse_update(float& m, float& s, const float (&x)[N]) {
  float mx = x[0];
#pragma unroll
  for (int i = 1; i < N; ++i) mx = fmaxf(mx, x[i]);
  const float mn = fmaxf(m, mx);
  if (mn == neg_inf()) return;  // nothing finite yet
  float acc = s * rescale(m, mn);
#pragma unroll
  for (int i = 0; i < N; ++i) acc += __expf(x[i] - mn);
  s = acc;
  m = mn;
}

// The running (max, sum) as (shift, log-sum): lse = lse_shift(m) + lse_logsum(m, s).
__device__ __forceinline__ float lse_shift(float m) { return m == neg_inf() ? 0.f : m; }
__device__ __forceinline__ float lse_logsum(float m, float s) { return m == neg_inf() ? neg_inf() : __logf(s); }

// Calls f(i, pack_a, pack_b) for the packs i = threadIdx.x + k * blockDim.x < n of two rows, with
// UNROLL pairs of loads issued before any use (memory-level parallelism).
template <typename T, int VEC, int UNROLL, bool SMEM, bool LAST, class F>
__device__ __forceinline__ void sweep(const T* a, const T* b, int n, F&& f) {
  const int nt = blockDim.x;
  for (int base = threadIdx.x; base < n; base += UNROLL * nt) {
    Pack<T, VEC> ra[UNROLL], rb[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int i = base + u * nt;
      if (i < n) {
        if constexpr (SMEM) {
          ra[u] = ld_shared<T, VEC>(a + static_cast<int64_t>(i) * VEC);
          rb[u] = ld_shared<T, VEC>(b + static_cast<int64_t>(i) * VEC);
        } else {
          ra[u] = ld_global<T, VEC, LAST>(a + static_cast<int64_t>(i) * VEC);
          rb[u] = ld_global<T, VEC, LAST>(b + static_cast<int64_t>(i) * VEC);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int i = base + u * nt;
      if (i < n) f(i, ra[u], rb[u]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename T, int KIND, int VEC, bool CACHED>
__global__ void __launch_bounds__(kMaxThreads, 1) fwd_kernel(const FwdParams prm) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ float warp_buf4[32][4];
  __shared__ float warp_buf2[32][2];
  __shared__ float slot_lse[4];
  __shared__ float slot_sum[2];

  const unsigned csize = cluster_nblocks();
  const unsigned crank = cluster_rank();
  const int64_t first_row = blockIdx.x / csize;
  const int64_t row_step = gridDim.x / csize;
  const int64_t V = prm.vocab;
  const int64_t lo = static_cast<int64_t>(crank) * prm.slice;
  const int64_t hi = min(V, lo + prm.slice);
  const int n = hi > lo ? static_cast<int>((hi - lo) / VEC) : 0;
  const float inv_t = prm.inv_t;
  const float beta = prm.beta;
  constexpr int UNROLL = kUnroll;

  T* sa = reinterpret_cast<T*>(dyn_smem);
  T* sb = sa + prm.slice;
  const T* p = static_cast<const T*>(prm.p);
  const T* q = static_cast<const T*>(prm.q);

  for (int64_t row = first_row; row < prm.rows; row += row_step) {
    const bool active = prm.mask == nullptr || prm.mask[row];
    const int64_t p_row = prm.ref != nullptr ? prm.ref[row] : row;
    const T* pa = p + p_row * prm.stride_p + lo;
    const T* qb = q + row * prm.stride_q + lo;
    T* gp = prm.write_gp ? static_cast<T*>(prm.grad_p) + row * prm.stride_gp + lo : nullptr;
    T* gq = prm.write_gq ? static_cast<T*>(prm.grad_q) + row * prm.stride_gq + lo : nullptr;

    if (!active) {  // uniform over the cluster: every block skips the same rows
      const Pack<T, VEC> z = zero_pack<T, VEC>();
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        if (gp != nullptr) st_global<T, VEC>(gp + static_cast<int64_t>(i) * VEC, z);
        if (gq != nullptr) st_global<T, VEC>(gq + static_cast<int64_t>(i) * VEC, z);
      }
      if (crank == 0 && threadIdx.x == 0) {
        prm.loss[row] = 0.f;
        prm.stats[row * kStatsWidth + 0] = 0.f;
        prm.stats[row * kStatsWidth + 1] = neg_inf();
        prm.stats[row * kStatsWidth + 2] = 0.f;
        prm.stats[row * kStatsWidth + 3] = neg_inf();
        prm.stats[row * kStatsWidth + 4] = 0.f;
        prm.stats[row * kStatsWidth + 5] = 0.f;
      }
      continue;
    }

    // pass 1: online log-sum-exp of both slices (and the shared-memory copy).
    float st[4] = {neg_inf(), 0.f, neg_inf(), 0.f};
    sweep<T, VEC, UNROLL, false, CACHED>(
        pa, qb, n, [&](int i, const Pack<T, VEC>& ra, const Pack<T, VEC>& rb) {
          if constexpr (CACHED) {
            st_shared<T, VEC>(sa + static_cast<int64_t>(i) * VEC, ra);
            st_shared<T, VEC>(sb + static_cast<int64_t>(i) * VEC, rb);
          }
          float x[VEC];
          unpack<T, VEC>(ra, inv_t, x);
          lse_update<VEC>(st[0], st[1], x);
          unpack<T, VEC>(rb, inv_t, x);
          lse_update<VEC>(st[2], st[3], x);
        });
    block_cluster_reduce<4, LseOp<4>>(st, warp_buf4, slot_lse, csize);
    const float sh_a = lse_shift(st[0]), ls_a = lse_logsum(st[0], st[1]);
    const float sh_b = lse_shift(st[2]), ls_b = lse_logsum(st[2], st[3]);

    // pass 2: S_P = sum P (lp - xp), S_Q = sum Q (lq - xq); gradients free of them when fused.
    const T* src_a = CACHED ? sa : pa;
    const T* src_b = CACHED ? sb : qb;
    float sums[2] = {0.f, 0.f};
    const bool fused = prm.fused;
    auto pass2 = [&](int i, const Pack<T, VEC>& ra, const Pack<T, VEC>& rb) {
      Pack<T, VEC> g1, g2;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const Terms t = row_terms<KIND>(to_float(ra.e[e]) * inv_t, to_float(rb.e[e]) * inv_t, sh_a, ls_a, sh_b,
                                          ls_b, prm.log_beta, prm.log_1mbeta);
        sums[0] += t.P == 0.f ? 0.f : t.P * (t.lp - t.xp);
        sums[1] += t.Q == 0.f ? 0.f : t.Q * (t.lq - t.xq);
        if (fused) {
          g1.e[e] = from_float<T>(grad_a<KIND>(t, 0.f, beta) * inv_t);
          g2.e[e] = from_float<T>(grad_b<KIND>(t, 0.f, beta) * inv_t);
        }
      }
      if (fused) {
        if (gp != nullptr) st_global<T, VEC>(gp + static_cast<int64_t>(i) * VEC, g1);
        if (gq != nullptr) st_global<T, VEC>(gq + static_cast<int64_t>(i) * VEC, g2);
      }
    };
    // Streaming: the last global read of the row is pass 2 when pass 3 does not run.
    const bool pass3 = !fused && (gp != nullptr || gq != nullptr);
    if constexpr (CACHED) {
      sweep<T, VEC, UNROLL, true, false>(src_a, src_b, n, pass2);
    } else if (pass3) {
      sweep<T, VEC, UNROLL, false, false>(src_a, src_b, n, pass2);
    } else {
      sweep<T, VEC, UNROLL, false, true>(src_a, src_b, n, pass2);
    }
    block_cluster_reduce<2, SumOp<2>>(sums, warp_buf2, slot_sum, csize);
    const float s_p = sums[0];
    const float s_q = sums[1];
    if (crank == 0 && threadIdx.x == 0) {
      float loss;
      if constexpr (KIND == kJS) {
        loss = beta * s_p + (1.f - beta) * s_q;
      } else if constexpr (KIND == kKLForward) {
        loss = s_p;
      } else if constexpr (KIND == kKLReverse) {
        loss = s_q;
      } else {
        loss = s_p + s_q;
      }
      prm.loss[row] = loss;
      prm.stats[row * kStatsWidth + 0] = sh_a;
      prm.stats[row * kStatsWidth + 1] = ls_a;
      prm.stats[row * kStatsWidth + 2] = sh_b;
      prm.stats[row * kStatsWidth + 3] = ls_b;
      prm.stats[row * kStatsWidth + 4] = s_p;
      prm.stats[row * kStatsWidth + 5] = s_q;
    }

    // pass 3: gradients that need the row sums.
    if (pass3) {
      auto pass3_fn = [&](int i, const Pack<T, VEC>& ra, const Pack<T, VEC>& rb) {
        Pack<T, VEC> g1, g2;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const Terms t = row_terms<KIND>(to_float(ra.e[e]) * inv_t, to_float(rb.e[e]) * inv_t, sh_a, ls_a, sh_b,
                                          ls_b, prm.log_beta, prm.log_1mbeta);
          g1.e[e] = from_float<T>(grad_a<KIND>(t, s_p, beta) * inv_t);
          g2.e[e] = from_float<T>(grad_b<KIND>(t, s_q, beta) * inv_t);
        }
        if (gp != nullptr) st_global<T, VEC>(gp + static_cast<int64_t>(i) * VEC, g1);
        if (gq != nullptr) st_global<T, VEC>(gq + static_cast<int64_t>(i) * VEC, g2);
      };
      sweep<T, VEC, UNROLL, CACHED, true>(src_a, src_b, n, pass3_fn);
    }
  }
  // A block's shared memory must outlive its peers' last DSMEM reads.
  if (csize > 1) cluster_sync();
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

struct ScaleParams {
  const void* src;
  void* dst;
  const float* scale;
  const bool* mask;
  int64_t vocab, stride_src, stride_dst, chunks_per_row;
};

// dst[r, :] = src[r, :] * scale[r] (0 on masked-out rows); block b handles chunk b % cpr of row b / cpr.
template <typename T, int VEC>
__global__ void __launch_bounds__(kBwdThreads) scale_rows_kernel(const ScaleParams prm) {
  const int64_t row = blockIdx.x / prm.chunks_per_row;
  const int64_t chunk = blockIdx.x % prm.chunks_per_row;
  float s = prm.scale[row];
  if (prm.mask != nullptr && !prm.mask[row]) s = 0.f;
  const T* src = static_cast<const T*>(prm.src) + row * prm.stride_src;
  T* dst = static_cast<T*>(prm.dst) + row * prm.stride_dst;
  const int64_t npack = prm.vocab / VEC;
  const int64_t base = chunk * (static_cast<int64_t>(blockDim.x) * kBwdUnroll) + threadIdx.x;
  Pack<T, VEC> r[kBwdUnroll];
#pragma unroll
  for (int u = 0; u < kBwdUnroll; ++u) {
    const int64_t i = base + static_cast<int64_t>(u) * blockDim.x;
    if (i < npack) r[u] = ld_global<T, VEC, true>(src + i * VEC);
  }
#pragma unroll
  for (int u = 0; u < kBwdUnroll; ++u) {
    const int64_t i = base + static_cast<int64_t>(u) * blockDim.x;
    if (i < npack) {
      float x[VEC];
      unpack<T, VEC>(r[u], s, x);
      st_global<T, VEC>(dst + i * VEC, pack<T, VEC>(x));
    }
  }
}

struct GradPParams {
  const void* p;
  const void* q;
  const int64_t* order;
  const int64_t* start;
  const int64_t* count;
  const bool* mask;
  const float* grad_rows;
  const float* stats;
  void* grad_p;
  int64_t vocab, stride_p, stride_q, stride_gp, chunks_per_row;
  float inv_t, beta, log_beta, log_1mbeta;
};

template <typename T, int KIND, int VEC>
__global__ void __launch_bounds__(kBwdThreads) grad_p_shared_kernel(const GradPParams prm) {
  const int64_t n = blockIdx.x / prm.chunks_per_row;
  const int64_t chunk = blockIdx.x % prm.chunks_per_row;
  const int64_t npack = prm.vocab / VEC;
  const int64_t base = chunk * (static_cast<int64_t>(blockDim.x) * kBwdUnroll) + threadIdx.x;
  const float inv_t = prm.inv_t;
  const T* p = static_cast<const T*>(prm.p) + n * prm.stride_p;
  const T* q = static_cast<const T*>(prm.q);

  float a[kBwdUnroll][VEC];
  float acc[kBwdUnroll][VEC];
#pragma unroll
  for (int u = 0; u < kBwdUnroll; ++u) {
    const int64_t i = base + static_cast<int64_t>(u) * blockDim.x;
    Pack<T, VEC> r;
    if (i < npack) {
      r = ld_global<T, VEC, true>(p + i * VEC);
    } else {
      r = zero_pack<T, VEC>();
    }
    unpack<T, VEC>(r, inv_t, a[u]);
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[u][e] = 0.f;
  }

  const int64_t first = prm.start[n];
  const int64_t last = first + prm.count[n];
  for (int64_t j = first; j < last; ++j) {
    const int64_t r = prm.order[j];
    if (prm.mask != nullptr && !prm.mask[r]) continue;
    const float w = prm.grad_rows[r];
    const float sh_a = prm.stats[r * kStatsWidth + 0];
    const float ls_a = prm.stats[r * kStatsWidth + 1];
    const float sh_b = prm.stats[r * kStatsWidth + 2];
    const float ls_b = prm.stats[r * kStatsWidth + 3];
    const float s_p = prm.stats[r * kStatsWidth + 4];
    const T* qr = q + r * prm.stride_q;
    Pack<T, VEC> rb[kBwdUnroll];
#pragma unroll
    for (int u = 0; u < kBwdUnroll; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * blockDim.x;
      if (i < npack) rb[u] = ld_global<T, VEC, true>(qr + i * VEC);
    }
#pragma unroll
    for (int u = 0; u < kBwdUnroll; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * blockDim.x;
      if (i < npack) {
        float b[VEC];
        unpack<T, VEC>(rb[u], inv_t, b);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const Terms t = row_terms<KIND>(a[u][e], b[e], sh_a, ls_a, sh_b, ls_b, prm.log_beta, prm.log_1mbeta);
          acc[u][e] = fmaf(w, grad_a<KIND>(t, s_p, prm.beta), acc[u][e]);
        }
      }
    }
  }

  T* gp = static_cast<T*>(prm.grad_p) + n * prm.stride_gp;
#pragma unroll
  for (int u = 0; u < kBwdUnroll; ++u) {
    const int64_t i = base + static_cast<int64_t>(u) * blockDim.x;
    if (i < npack) {
      float g[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) g[e] = acc[u][e] * inv_t;
      st_global<T, VEC>(gp + i * VEC, pack<T, VEC>(g));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Typed launchers
// ---------------------------------------------------------------------------------------------

template <typename K>
cudaError_t launch(K kernel, int grid, int threads, size_t smem, int cluster, cudaStream_t stream,
                   const FwdParams& prm) {
  if (cluster <= 1) {
    kernel<<<grid, threads, smem, stream>>>(prm);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.gridDim = dim3(static_cast<unsigned>(grid), 1, 1);
  cfg.blockDim = dim3(static_cast<unsigned>(threads), 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, prm);
}

// Static shared memory of fwd_kernel (< 1 KiB) plus the 1 KiB per block the SM reserves.
constexpr size_t kStaticSmemReserve = 2 * 1024;

inline int auto_threads(int64_t packs_per_block) {
  if (packs_per_block >= 4096) return 512;
  if (packs_per_block >= 1024) return 256;
  return 128;
}

template <typename T, int KIND, int VEC, bool CACHED>
cudaError_t run_forward(const FwdParams& prm, int cluster, int threads, int device, const DeviceInfo& dev,
                        cudaStream_t stream, DivLaunchInfo* info) {
  auto kernel = &fwd_kernel<T, KIND, VEC, CACHED>;
  const void* fptr = reinterpret_cast<const void*>(kernel);
  const size_t smem = CACHED ? static_cast<size_t>(2 * prm.slice) * sizeof(T) : 0;
  cudaError_t err = allow_dynamic_smem(fptr, smem, device);
  if (err != cudaSuccess) return err;
  int resident = 0;  // clusters (of `cluster` blocks) that fit on the device at once
  err = max_active_clusters(fptr, threads, smem, cluster, device, &resident);
  if (err != cudaSuccess) return err;
  if (resident <= 0) return cudaErrorInvalidConfiguration;  // nothing launched: caller tries another shape
  int64_t in_flight = resident;
  if (!CACHED) {
    // Passes 2-3 re-read the row: keep the rows in flight within ~60% of L2 so that those reads
    // hit it, but never use fewer blocks than SMs.
    const int64_t row_bytes = 2 * prm.vocab * static_cast<int64_t>(sizeof(T));
    const int64_t fit = std::max<int64_t>(1, (static_cast<int64_t>(dev.l2_bytes) * 6 / 10) / row_bytes);
    in_flight = std::min<int64_t>(in_flight, std::max<int64_t>(fit, ceil_div(dev.sm_count, cluster)));
  }
  const int64_t clusters = std::max<int64_t>(1, std::min<int64_t>(prm.rows, in_flight));
  const int grid = static_cast<int>(clusters * cluster);
  if (info != nullptr) {
    info->cluster = cluster;
    info->cached = CACHED ? 1 : 0;
    info->threads = threads;
    info->vec = VEC;
    info->grid = grid;
    info->slice = prm.slice;
    info->smem = smem;
  }
  return launch(kernel, grid, threads, smem, cluster, stream, prm);
}

// One launch configuration to try: (cluster size, cached rows).
struct FwdOption {
  int cluster;
  bool cached;
};

template <typename T, int KIND>
cudaError_t forward_kind(const FwdParams& base, const DivTuning& tuning, const DeviceInfo& dev, int device, bool vec_ok,
                         cudaStream_t stream, DivLaunchInfo* info) {
  constexpr int VW = vec16<T>();
  const int vec = vec_ok ? VW : 1;
  const int64_t V = base.vocab;
  const int64_t elem = static_cast<int64_t>(sizeof(T));
  const size_t smem_cap = dev.smem_optin > static_cast<int>(kStaticSmemReserve)
                              ? static_cast<size_t>(dev.smem_optin) - kStaticSmemReserve
                              : 0;
  auto slice_for = [&](int c) { return round_up(ceil_div(V, c), vec); };
  auto smem_for = [&](int c) { return static_cast<size_t>(2 * slice_for(c) * elem); };
  // Preferred budget for the row slices of one block: at least two blocks per SM (114 - 2 KiB on
  // H100), so that one block's loads overlap another's math and reductions.
  const size_t target = dev.smem_per_sm / 2 > static_cast<int>(kStaticSmemReserve)
                            ? static_cast<size_t>(dev.smem_per_sm / 2) - kStaticSmemReserve
                            : 0;

  int sizes[4] = {1, 2, 4, 8};
  int n_sizes = dev.cluster_launch ? 4 : 1;
  if (tuning.cluster > 0) {
    if (tuning.cluster != 1 && tuning.cluster != 2 && tuning.cluster != 4 && tuning.cluster != 8)
      return cudaErrorInvalidValue;
    if (tuning.cluster > 1 && !dev.cluster_launch) return cudaErrorNotSupported;
    sizes[0] = tuning.cluster;
    n_sizes = 1;
  }
  if (tuning.threads < 0 || tuning.threads % 32 != 0 || tuning.threads > kMaxThreads) return cudaErrorInvalidValue;

  // Candidates in order of preference. Cached rows: the smallest cluster whose slices fit the
  // two-blocks-per-SM target, then the others that fit at all. Streamed rows: the widest
  // cluster (a wide row over the most SMs), then one block per row. The first configuration the
  // occupancy calculator accepts (some cluster shapes cannot be co-scheduled) is launched.
  FwdOption opts[12];
  int n_opts = 0;
  if (tuning.cache != 0) {
    for (int k = 0; k < n_sizes; ++k)
      if (smem_for(sizes[k]) <= target) opts[n_opts++] = {sizes[k], true};
    for (int k = 0; k < n_sizes; ++k)
      if (smem_for(sizes[k]) > target && smem_for(sizes[k]) <= smem_cap) opts[n_opts++] = {sizes[k], true};
  }
  if (tuning.cache != 1) {
    opts[n_opts++] = {sizes[n_sizes - 1], false};
    if (sizes[n_sizes - 1] != 1 && tuning.cluster <= 0) opts[n_opts++] = {1, false};
  }
  if (n_opts == 0) return cudaErrorInvalidConfiguration;

  cudaError_t err = cudaErrorInvalidConfiguration;
  for (int k = 0; k < n_opts; ++k) {
    const FwdOption o = opts[k];
    FwdParams prm = base;
    prm.slice = slice_for(o.cluster);
    int threads = tuning.threads > 0 ? tuning.threads : (o.cached ? auto_threads(prm.slice / vec) : 512);
    if (vec_ok) {
      err = o.cached ? run_forward<T, KIND, VW, true>(prm, o.cluster, threads, device, dev, stream, info)
                     : run_forward<T, KIND, VW, false>(prm, o.cluster, threads, device, dev, stream, info);
    } else {
      err = o.cached ? run_forward<T, KIND, 1, true>(prm, o.cluster, threads, device, dev, stream, info)
                     : run_forward<T, KIND, 1, false>(prm, o.cluster, threads, device, dev, stream, info);
    }
    // cudaErrorInvalidConfiguration: not co-schedulable, nothing launched - clear it and try the
    // next option.
    if (err != cudaErrorInvalidConfiguration) return err;
    (void)cudaGetLastError();
  }
  return err;
}

}  // namespace div

template <typename T>
cudaError_t divergence_forward_typed(const DivForwardArgs& args, const DivTuning& tuning, cudaStream_t stream,
                                     DivLaunchInfo* info) {
  if (args.rows == 0) return cudaSuccess;
  if (args.vocab <= 0 || args.vocab > (int64_t{1} << 30)) return cudaErrorInvalidValue;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  DeviceInfo dev;
  if ((err = get_device_info(device, &dev)) != cudaSuccess) return err;

  const bool write_gp = args.grad_p != nullptr;
  const bool write_gq = args.grad_q != nullptr;
  if (write_gp && args.ref != nullptr) return cudaErrorInvalidValue;  // shared rows: see grad_p_shared

  div::FwdParams prm = {};
  prm.p = args.p;
  prm.q = args.q;
  prm.ref = args.ref;
  prm.mask = args.mask;
  prm.loss = args.loss;
  prm.stats = args.stats;
  prm.grad_p = args.grad_p;
  prm.grad_q = args.grad_q;
  prm.rows = args.rows;
  prm.vocab = args.vocab;
  prm.stride_p = args.stride_p;
  prm.stride_q = args.stride_q;
  prm.stride_gp = args.stride_gp;
  prm.stride_gq = args.stride_gq;
  prm.inv_t = args.inv_t;
  prm.beta = args.beta;
  prm.log_beta = static_cast<float>(std::log(static_cast<double>(args.beta)));
  prm.log_1mbeta = static_cast<float>(std::log1p(-static_cast<double>(args.beta)));
  prm.write_gp = write_gp;
  prm.write_gq = write_gq;
  // Gradients free of the row sums: kl_forward's Q - P and kl_reverse's P - Q.
  prm.fused = (!write_gp || args.kind == kKLReverse) && (!write_gq || args.kind == kKLForward);

  constexpr int VW = vec16<T>();
  bool vec_ok = args.vocab % VW == 0 && args.stride_p % VW == 0 && args.stride_q % VW == 0 && aligned16(args.p) &&
                aligned16(args.q);
  if (write_gp) vec_ok = vec_ok && args.stride_gp % VW == 0 && aligned16(args.grad_p);
  if (write_gq) vec_ok = vec_ok && args.stride_gq % VW == 0 && aligned16(args.grad_q);

  switch (args.kind) {
    case kJS:
      return div::forward_kind<T, kJS>(prm, tuning, dev, device, vec_ok, stream, info);
    case kKLForward:
      return div::forward_kind<T, kKLForward>(prm, tuning, dev, device, vec_ok, stream, info);
    case kKLReverse:
      return div::forward_kind<T, kKLReverse>(prm, tuning, dev, device, vec_ok, stream, info);
    case kKLSymmetric:
      return div::forward_kind<T, kKLSymmetric>(prm, tuning, dev, device, vec_ok, stream, info);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t divergence_scale_rows_typed(const ScaleRowsArgs& args, cudaStream_t stream) {
  if (args.rows == 0 || args.vocab == 0) return cudaSuccess;
  constexpr int VW = vec16<T>();
  const bool vec_ok = args.vocab % VW == 0 && args.stride_src % VW == 0 && args.stride_dst % VW == 0 &&
                      aligned16(args.src) && aligned16(args.dst);
  const int vec = vec_ok ? VW : 1;
  div::ScaleParams prm = {};
  prm.src = args.src;
  prm.dst = args.dst;
  prm.scale = args.scale;
  prm.mask = args.mask;
  prm.vocab = args.vocab;
  prm.stride_src = args.stride_src;
  prm.stride_dst = args.stride_dst;
  prm.chunks_per_row = ceil_div(args.vocab / vec, static_cast<int64_t>(div::kBwdThreads) * div::kBwdUnroll);
  const int64_t blocks = args.rows * prm.chunks_per_row;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (vec_ok) {
    div::scale_rows_kernel<T, VW><<<static_cast<unsigned>(blocks), div::kBwdThreads, 0, stream>>>(prm);
  } else {
    div::scale_rows_kernel<T, 1><<<static_cast<unsigned>(blocks), div::kBwdThreads, 0, stream>>>(prm);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t divergence_grad_p_shared_typed(const GradPSharedArgs& args, cudaStream_t stream) {
  if (args.num_p_rows == 0 || args.vocab == 0) return cudaSuccess;
  constexpr int VW = vec16<T>();
  const bool vec_ok = args.vocab % VW == 0 && args.stride_p % VW == 0 && args.stride_q % VW == 0 &&
                      args.stride_gp % VW == 0 && aligned16(args.p) && aligned16(args.q) && aligned16(args.grad_p);
  const int vec = vec_ok ? VW : 1;
  div::GradPParams prm = {};
  prm.p = args.p;
  prm.q = args.q;
  prm.order = args.order;
  prm.start = args.start;
  prm.count = args.count;
  prm.mask = args.mask;
  prm.grad_rows = args.grad_rows;
  prm.stats = args.stats;
  prm.grad_p = args.grad_p;
  prm.vocab = args.vocab;
  prm.stride_p = args.stride_p;
  prm.stride_q = args.stride_q;
  prm.stride_gp = args.stride_gp;
  prm.chunks_per_row = ceil_div(args.vocab / vec, static_cast<int64_t>(div::kBwdThreads) * div::kBwdUnroll);
  prm.inv_t = args.inv_t;
  prm.beta = args.beta;
  prm.log_beta = static_cast<float>(std::log(static_cast<double>(args.beta)));
  prm.log_1mbeta = static_cast<float>(std::log1p(-static_cast<double>(args.beta)));
  const int64_t blocks = args.num_p_rows * prm.chunks_per_row;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const unsigned g = static_cast<unsigned>(blocks);

#define MODKERN_GRAD_P_CASE(KIND)                                                          \
  case KIND:                                                                               \
    if (vec_ok) {                                                                          \
      div::grad_p_shared_kernel<T, KIND, VW><<<g, div::kBwdThreads, 0, stream>>>(prm);    \
    } else {                                                                               \
      div::grad_p_shared_kernel<T, KIND, 1><<<g, div::kBwdThreads, 0, stream>>>(prm);     \
    }                                                                                      \
    break;

  switch (args.kind) {
    MODKERN_GRAD_P_CASE(kJS)
    MODKERN_GRAD_P_CASE(kKLForward)
    MODKERN_GRAD_P_CASE(kKLReverse)
    MODKERN_GRAD_P_CASE(kKLSymmetric)
    default:
      return cudaErrorInvalidValue;
  }
#undef MODKERN_GRAD_P_CASE
  return cudaGetLastError();
}

// Explicit instantiations, one element type per translation unit.
#define MODKERN_INSTANTIATE_DIVERGENCE(T)                                                                     \
  template cudaError_t divergence_forward_typed<T>(const DivForwardArgs&, const DivTuning&, cudaStream_t,   \
                                                   DivLaunchInfo*);                                          \
  template cudaError_t divergence_scale_rows_typed<T>(const ScaleRowsArgs&, cudaStream_t);                   \
  template cudaError_t divergence_grad_p_shared_typed<T>(const GradPSharedArgs&, cudaStream_t);

}  // namespace modkern
