// Host API of the divergence kernels (fused_js / fused_kl), shared by the torch glue
// (divergence_ops.cpp) and the standalone harness (tools/standalone_check.cu). No torch include.
//
// Per compared row r, with a = p[ref[r]] * inv_t and b = q[r] * inv_t (see
// modkern/torch_backend/divergence.py for the full table):
//   kind 0 js           loss = beta S_P + (1-beta) S_Q,  S_P = KL(P||M), S_Q = KL(Q||M)
//   kind 1 kl_forward   loss = S_P = KL(P||Q)
//   kind 2 kl_reverse   loss = S_Q = KL(Q||P)
//   kind 3 kl_symmetric loss = S_P + S_Q
// stats[r] = (shift_a, logsum_a, shift_b, logsum_b, S_P, S_Q), lse = shift + logsum (kept apart:
// log P = (a - shift) - logsum keeps full precision); masked-out rows get loss 0, stats
// (0, -inf, 0, -inf, 0, 0) and
// zero gradient rows, and their logits are not read.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "device_info.h"

namespace modkern {

enum DivKind : int { kJS = 0, kKLForward = 1, kKLReverse = 2, kKLSymmetric = 3 };

// floats per row of stats (modkern/ops/divergence.py STATS_WIDTH)
constexpr int kStatsWidth = 6;

struct DivForwardArgs {
  DType dtype = DType::kFloat32;
  const void* p = nullptr;        // [N, V] logits, unit stride along V
  const void* q = nullptr;        // [R, V]
  const int64_t* ref = nullptr;   // [R] or null (then N == R)
  const bool* mask = nullptr;     // [R] or null
  float* loss = nullptr;          // [R]
  float* stats = nullptr;         // [R, kStatsWidth] contiguous
  void* grad_p = nullptr;         // [R, V] (only without ref) or null
  void* grad_q = nullptr;         // [R, V] or null
  int64_t rows = 0, vocab = 0;
  int64_t stride_p = 0, stride_q = 0, stride_gp = 0, stride_gq = 0;  // row strides, in elements
  int kind = kJS;
  float beta = 0.5f, inv_t = 1.f;
};

// dst[r, :] = src[r, :] * scale[r] (0 where mask[r] is false), fp32 math, stored in dtype.
struct ScaleRowsArgs {
  DType dtype = DType::kFloat32;
  const void* src = nullptr;
  void* dst = nullptr;
  const float* scale = nullptr;  // [R]
  const bool* mask = nullptr;    // [R] or null
  int64_t rows = 0, vocab = 0, stride_src = 0, stride_dst = 0;
};

// grad_p[n] = inv_t * sum over copies r of n (ref[r] == n, mask[r]) of grad_rows[r] * d loss_r / d a,
// recomputed from p, q and the forward's stats. The copies of n are order[start[n] : start[n] + count[n]].
struct GradPSharedArgs {
  DType dtype = DType::kFloat32;
  const void* p = nullptr;
  const void* q = nullptr;
  const int64_t* order = nullptr;  // [R] row indices sorted by ref
  const int64_t* start = nullptr;  // [N]
  const int64_t* count = nullptr;  // [N]
  const bool* mask = nullptr;      // [R] or null
  const float* grad_rows = nullptr;  // [R]
  const float* stats = nullptr;      // [R, kStatsWidth]
  void* grad_p = nullptr;            // [N, V]
  int64_t num_p_rows = 0, vocab = 0, stride_p = 0, stride_q = 0, stride_gp = 0;
  int kind = kJS;
  float beta = 0.5f, inv_t = 1.f;
};

// Launch-shape overrides for benchmarking and for tests that force every code path.
// cluster: 0 = auto, else 1/2/4/8 blocks per row (values > 1 need sm_90);
// cache:  -1 = auto, 0 = stream the rows from global memory on every pass, 1 = keep the row slice in
//         shared memory (fails with cudaErrorInvalidConfiguration if it does not fit);
// threads: 0 = auto, else a multiple of 32 up to 512.
struct DivTuning {
  int cluster = 0;
  int cache = -1;
  int threads = 0;
};

// What divergence_forward chose (for tests and benchmarks).
struct DivLaunchInfo {
  int cluster = 0, cached = 0, threads = 0, vec = 0, grid = 0;
  int64_t slice = 0;
  size_t smem = 0;
};

cudaError_t launch_divergence_forward(const DivForwardArgs& args, const DivTuning& tuning, cudaStream_t stream,
                               DivLaunchInfo* info = nullptr);
cudaError_t launch_divergence_scale_rows(const ScaleRowsArgs& args, cudaStream_t stream);
cudaError_t launch_divergence_grad_p_shared(const GradPSharedArgs& args, cudaStream_t stream);

// Typed entry points (one translation unit per element type, compiled in parallel).
template <typename T>
cudaError_t divergence_forward_typed(const DivForwardArgs& args, const DivTuning& tuning, cudaStream_t stream,
                                     DivLaunchInfo* info);
template <typename T>
cudaError_t divergence_scale_rows_typed(const ScaleRowsArgs& args, cudaStream_t stream);
template <typename T>
cudaError_t divergence_grad_p_shared_typed(const GradPSharedArgs& args, cudaStream_t stream);

}  // namespace modkern
