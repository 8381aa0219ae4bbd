// Kernel templates of the masked PGD step and their typed launcher (no torch include). Included
// once per delta dtype by adv_step_{f32,bf16,f16}.cu. Mirrors kernels/adv_step.py:
//
// * The paper's configuration (step raw / sign, projection linf / none) is one pass: read delta
//   and grad of the selected tokens, write delta' - N (2D + G) bytes. Unselected tokens are written
//   as 0 without being read.
// * Per-sample quantities (step l2 / linf, projection l2) come from a split reduction:
//   stats_kernel writes per (sample, chunk of kAdvTokensPerBlock tokens) the partials
//   P0 = sum d0'^2, P1 = sum delta d0', P2 = sum delta^2, P3 = max |g| (d0' = d0 t_bl) into a
//   [B, chunks, 4] buffer; update_kernel reduces its sample's partials (from L2) and updates. No
//   atomics: deterministic.
// * Per-token quantities (step / projection l2_token): the warp that owns a token first sweeps it
//   for (sum d0^2, sum delta d0, sum delta^2) - a re-read from L1/L2, not HBM - then updates it.
//
// One warp per token, 16-byte accesses along H where the rows allow it (any strides otherwise),
// fp32 math, int64 offsets; grid (token chunks, samples).
#pragma once

#include "adv_step.h"
#include "common.cuh"

namespace modkern {
namespace adv {

constexpr int kThreads = 256;  // 8 warps, each owning whole tokens
// Packs of a token row loaded per lane before use: 4 in the one-pass update (<= 64 registers),
// 2 where the per-token statistics are inlined too (keeps those <= 128, see csrc/README.md).
constexpr int kUnroll = 2;
constexpr int kUnrollUpdate = 4;

// NaN-propagating max / min (fmaxf / fminf drop NaN): a NaN gradient makes delta NaN, as in the
// PyTorch reference and the Triton kernels, instead of being clamped to a finite -eps.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }
__device__ __forceinline__ float nan_min(float a, float b) { return (a < b || a != a) ? a : b; }

struct Params {
  const void* delta;
  const void* grad;
  const bool* mask;
  void* out;
  float* part;
  const float* alpha_ptr;
  const float* eps_ptr;
  float alpha, eps;
  int64_t L, H, nc;
  int64_t sdb, sdl, sdh, sgb, sgl, sgh, smb, sml, sob, sol, soh;
  int step, norm;
  bool need_sample, need_token;
};

// (sum, sum, sum, max) of the partials; the max is over |g| >= 0, so 0 is its identity.
struct PartOp {
  __device__ __forceinline__ static void identity(float (&v)[4]) { v[0] = v[1] = v[2] = v[3] = 0.f; }
  __device__ __forceinline__ static void combine(float (&acc)[4], const float (&o)[4]) {
    acc[0] += o[0];
    acc[1] += o[1];
    acc[2] += o[2];
    acc[3] = fmaxf(acc[3], o[3]);
  }
};

// Pack v (of VEC elements) of a token row: contiguous when VEC > 1, strided by `stride` otherwise.
template <typename T, int VEC, bool LAST = false>
__device__ __forceinline__ Pack<T, VEC> ld_row(const T* row, int64_t v, int64_t stride) {
  if constexpr (VEC == 1) {
    Pack<T, 1> p;
    p.e[0] = row[v * stride];
    return p;
  } else {
    return ld_global<T, VEC, LAST>(row + v * VEC);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void st_row(T* row, int64_t v, int64_t stride, const Pack<T, VEC>& p) {
  if constexpr (VEC == 1) {
    row[v * stride] = p.e[0];
  } else {
    st_global<T, VEC>(row + v * VEC, p);
  }
}

__device__ __forceinline__ float sign_of(float g) { return g > 0.f ? 1.f : (g < 0.f ? -1.f : 0.f); }

// Per token (one warp): st = (A = sum d0^2, Bv = sum delta d0, C = sum delta^2, M = max |d0|),
// identical in every lane. delta counts as 0 when !load_delta.
template <typename TD, typename TG, int VEC>
__device__ __forceinline__ void token_stats(const TD* drow, const TG* grow, int64_t sdh, int64_t sgh, int64_t nvec,
                                            bool load_delta, bool sign, float (&st)[4]) {
  const int lane = threadIdx.x & 31;
  float A = 0.f, Bv = 0.f, C = 0.f, M = 0.f;
  for (int64_t base = lane; base < nvec; base += 32 * kUnroll) {
    Pack<TG, VEC> gp[kUnroll];
    Pack<TD, VEC> dp[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + 32 * u;
      if (v < nvec) {
        gp[u] = ld_row<TG, VEC>(grow, v, sgh);
        if (load_delta) dp[u] = ld_row<TD, VEC>(drow, v, sdh);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + 32 * u;
      if (v < nvec) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float g = to_float(gp[u].e[e]);
          const float d0 = sign ? sign_of(g) : g;
          const float x = load_delta ? to_float(dp[u].e[e]) : 0.f;
          A = fmaf(d0, d0, A);
          Bv = fmaf(x, d0, Bv);
          C = fmaf(x, x, C);
          M = fmaxf(M, fabsf(d0));
        }
      }
    }
  }
  st[0] = A;
  st[1] = Bv;
  st[2] = C;
  st[3] = M;
  warp_reduce<4, PartOp>(st);
}

__device__ __forceinline__ float token_scale(float A, int step) {
  return step == kStepL2Token ? 1.f / nan_max(sqrtf(A), 1e-12f) : 1.f;
}

template <typename TD, typename TG, int VEC>
__global__ void __launch_bounds__(kThreads) stats_kernel(const Params prm) {
  __shared__ float warp_buf[32][4];
  __shared__ float slot[4];
  const int64_t b = blockIdx.y;
  const int64_t l_end = min(prm.L, static_cast<int64_t>(blockIdx.x + 1) * kAdvTokensPerBlock);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int64_t nvec = prm.H / VEC;
  const bool load_delta = prm.norm == kNormL2;
  const bool sign = prm.step == kStepSign;
  const TD* delta = static_cast<const TD*>(prm.delta);
  const TG* grad = static_cast<const TG*>(prm.grad);

  float acc[4] = {0.f, 0.f, 0.f, 0.f};  // only lane 0 of each warp accumulates
  for (int64_t l = static_cast<int64_t>(blockIdx.x) * kAdvTokensPerBlock + warp; l < l_end; l += nwarps) {
    if (!prm.mask[b * prm.smb + l * prm.sml]) continue;
    float st[4];
    token_stats<TD, TG, VEC>(delta + b * prm.sdb + l * prm.sdl, grad + b * prm.sgb + l * prm.sgl, prm.sdh, prm.sgh,
                             nvec, load_delta, sign, st);
    const float t = token_scale(st[0], prm.step);
    if (lane == 0) {
      acc[0] += st[0] * t * t;
      acc[1] += st[1] * t;
      acc[2] += st[2];
      acc[3] = fmaxf(acc[3], st[3]);
    }
  }
  block_cluster_reduce<4, PartOp>(acc, warp_buf, slot, 1u);
  if (threadIdx.x == 0) {
    float* out = prm.part + (b * prm.nc + blockIdx.x) * 4;
    out[0] = acc[0];
    out[1] = acc[1];
    out[2] = acc[2];
    out[3] = acc[3];
  }
}

template <typename TD, typename TG, int VEC, bool NEED_TOKEN>
__global__ void __launch_bounds__(kThreads) update_kernel(const Params prm) {
  __shared__ float warp_buf[32][4];
  __shared__ float slot[4];
  const int64_t b = blockIdx.y;
  const int64_t l_end = min(prm.L, static_cast<int64_t>(blockIdx.x + 1) * kAdvTokensPerBlock);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int64_t nvec = prm.H / VEC;
  const int step = prm.step;
  const int norm = prm.norm;
  const bool sign = step == kStepSign;
  const float a = prm.alpha_ptr != nullptr ? *prm.alpha_ptr : prm.alpha;
  const float e = prm.eps_ptr != nullptr ? *prm.eps_ptr : prm.eps;

  // Per-sample factors from sample b's partials: c = alpha s_b, proj_b for the l2 projection.
  float c = a;
  float proj_b = 1.f;
  if (prm.need_sample) {
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    const float* part = prm.part + b * prm.nc * 4;
    for (int64_t k = threadIdx.x; k < prm.nc; k += blockDim.x) {
      s[0] += part[k * 4 + 0];
      s[1] += part[k * 4 + 1];
      s[2] += part[k * 4 + 2];
      s[3] = fmaxf(s[3], part[k * 4 + 3]);
    }
    block_cluster_reduce<4, PartOp>(s, warp_buf, slot, 1u);
    if (step == kStepL2) c = a / nan_max(sqrtf(s[0]), 1e-12f);
    if (step == kStepLinf) c = a / nan_max(s[3] + 0.f * s[0], 1e-12f);  // + 0 * P0: NaN if a grad is
    if (norm == kNormL2) {
      const float n2 = nan_max(s[2] + 2.f * c * s[1] + c * c * s[0], 0.f);
      proj_b = e / nan_max(sqrtf(n2), e);
    }
  }

  const TD* delta = static_cast<const TD*>(prm.delta);
  const TG* grad = static_cast<const TG*>(prm.grad);
  TD* out = static_cast<TD*>(prm.out);
  for (int64_t l = static_cast<int64_t>(blockIdx.x) * kAdvTokensPerBlock + warp; l < l_end; l += nwarps) {
    TD* orow = out + b * prm.sob + l * prm.sol;
    if (!prm.mask[b * prm.smb + l * prm.sml]) {
      const Pack<TD, VEC> z = zero_pack<TD, VEC>();
      for (int64_t v = lane; v < nvec; v += 32) st_row<TD, VEC>(orow, v, prm.soh, z);
      continue;
    }
    const TD* drow = delta + b * prm.sdb + l * prm.sdl;
    const TG* grow = grad + b * prm.sgb + l * prm.sgl;
    float coef = c;
    float proj_t = 1.f;
    if constexpr (NEED_TOKEN) {
      float st[4];
      token_stats<TD, TG, VEC>(drow, grow, prm.sdh, prm.sgh, nvec, norm == kNormL2Token, sign, st);
      coef = c * token_scale(st[0], step);
      if (norm == kNormL2Token) {
        const float n2 = nan_max(st[2] + 2.f * coef * st[1] + coef * coef * st[0], 0.f);
        proj_t = e / nan_max(sqrtf(n2), e);
      }
    }
    const float scale = norm == kNormL2 ? proj_b : (norm == kNormL2Token ? proj_t : 1.f);
    constexpr int U = NEED_TOKEN ? kUnroll : kUnrollUpdate;
    for (int64_t base = lane; base < nvec; base += 32 * U) {
      Pack<TG, VEC> gp[U];
      Pack<TD, VEC> dp[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t v = base + 32 * u;
        if (v < nvec) {
          gp[u] = ld_row<TG, VEC, true>(grow, v, prm.sgh);
          dp[u] = ld_row<TD, VEC, true>(drow, v, prm.sdh);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t v = base + 32 * u;
        if (v < nvec) {
          Pack<TD, VEC> r;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float g = to_float(gp[u].e[k]);
            const float d0 = sign ? sign_of(g) : g;
            float x = fmaf(coef, d0, to_float(dp[u].e[k]));
            if (norm == kNormLinf) x = nan_min(nan_max(x, -e), e);
            r.e[k] = from_float<TD>(x * scale);
          }
          st_row<TD, VEC>(orow, v, prm.soh, r);
        }
      }
    }
  }
}

}  // namespace adv

template <typename TD, typename TG>
cudaError_t adv_step_typed(const AdvStepArgs& args, cudaStream_t stream) {
  if (args.B == 0 || args.L == 0 || args.H == 0) return cudaSuccess;
  if (args.B > 65535) return cudaErrorInvalidConfiguration;
  adv::Params prm = {};
  prm.delta = args.delta;
  prm.grad = args.grad;
  prm.mask = args.mask;
  prm.out = args.out;
  prm.part = args.partials;
  prm.alpha_ptr = args.alpha_ptr;
  prm.eps_ptr = args.eps_ptr;
  prm.alpha = args.alpha;
  prm.eps = args.eps;
  prm.L = args.L;
  prm.H = args.H;
  prm.nc = adv_step_num_chunks(args.L);
  prm.sdb = args.sdb;
  prm.sdl = args.sdl;
  prm.sdh = args.sdh;
  prm.sgb = args.sgb;
  prm.sgl = args.sgl;
  prm.sgh = args.sgh;
  prm.smb = args.smb;
  prm.sml = args.sml;
  prm.sob = args.sob;
  prm.sol = args.sol;
  prm.soh = args.soh;
  prm.step = args.step;
  prm.norm = args.norm;
  prm.need_sample = adv_step_needs_partials(args.step, args.norm);
  prm.need_token = args.step == kStepL2Token || args.norm == kNormL2Token;
  if (prm.need_sample && prm.part == nullptr) return cudaErrorInvalidValue;
  if (prm.nc > 0x7fffffffLL) return cudaErrorInvalidConfiguration;

  // 16-byte accesses of the wider type (8-byte ones of the narrower) when every token row of delta,
  // grad and out is contiguous along H and aligned.
  constexpr int VW = static_cast<int>(16 / (sizeof(TD) > sizeof(TG) ? sizeof(TD) : sizeof(TG)));
  const int64_t align_d = static_cast<int64_t>(VW * sizeof(TD));
  const int64_t align_g = static_cast<int64_t>(VW * sizeof(TG));
  auto row_ok = [&](const void* p, int64_t sb, int64_t sl, int64_t sh, int64_t align) {
    return sh == 1 && sb % VW == 0 && sl % VW == 0 && (reinterpret_cast<uintptr_t>(p) % align) == 0;
  };
  const bool vec_ok = args.H % VW == 0 && row_ok(args.delta, args.sdb, args.sdl, args.sdh, align_d) &&
                      row_ok(args.grad, args.sgb, args.sgl, args.sgh, align_g) &&
                      row_ok(args.out, args.sob, args.sol, args.soh, align_d);

  const dim3 grid(static_cast<unsigned>(prm.nc), static_cast<unsigned>(args.B), 1);
  if (vec_ok) {
    if (prm.need_sample) adv::stats_kernel<TD, TG, VW><<<grid, adv::kThreads, 0, stream>>>(prm);
    if (prm.need_token) {
      adv::update_kernel<TD, TG, VW, true><<<grid, adv::kThreads, 0, stream>>>(prm);
    } else {
      adv::update_kernel<TD, TG, VW, false><<<grid, adv::kThreads, 0, stream>>>(prm);
    }
  } else {
    if (prm.need_sample) adv::stats_kernel<TD, TG, 1><<<grid, adv::kThreads, 0, stream>>>(prm);
    if (prm.need_token) {
      adv::update_kernel<TD, TG, 1, true><<<grid, adv::kThreads, 0, stream>>>(prm);
    } else {
      adv::update_kernel<TD, TG, 1, false><<<grid, adv::kThreads, 0, stream>>>(prm);
    }
  }
  return cudaGetLastError();
}

#define MODKERN_INSTANTIATE_ADV_STEP(TD)                                                   \
  template cudaError_t adv_step_typed<TD, float>(const AdvStepArgs&, cudaStream_t);        \
  template cudaError_t adv_step_typed<TD, __nv_bfloat16>(const AdvStepArgs&, cudaStream_t); \
  template cudaError_t adv_step_typed<TD, __half>(const AdvStepArgs&, cudaStream_t);

}  // namespace modkern
