// Host API of the masked PGD step kernels (masked_adv_step). No torch include.
//
// Per sample b, token l, feature h, with sel = mask[b, l] (see kernels/adv_step.py and
// modkern/reference/adversarial.py for the math):
//   g = grad on selected tokens, 0 elsewhere;  d0 = sign(g) for step "sign", else g
//   d = d0 * s_b * t_bl   (s_b: 1/max(||g_b||, 1e-12) for "l2", 1/max(max|g_b|, 1e-12) for "linf";
//                          t_bl: 1/max(||g_bl||, 1e-12) for "l2_token")
//   new = (delta + alpha d) on selected tokens, 0 elsewhere, then the projection (norm):
//   "linf" clamp to [-eps, eps]; "l2" new * eps / max(||new_b||, eps); "l2_token" per token; none.
// Norms of new use the analytic form ||delta + c d0||^2 = ||delta||^2 + 2c<delta, d0> + c^2||d0||^2
// from one read of the token / sample (clamped at 0).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "device_info.h"

namespace modkern {

enum AdvStep : int { kStepRaw = 0, kStepSign = 1, kStepL2 = 2, kStepL2Token = 3, kStepLinf = 4 };
enum AdvNorm : int { kNormNone = 0, kNormLinf = 1, kNormL2 = 2, kNormL2Token = 3 };

struct AdvStepArgs {
  DType delta_dtype = DType::kFloat32;  // also the dtype of out
  DType grad_dtype = DType::kFloat32;
  const void* delta = nullptr;  // [B, L, H], any strides
  const void* grad = nullptr;   // [B, L, H], any strides (stride 0 allowed)
  const bool* mask = nullptr;   // [B, L], any strides
  void* out = nullptr;          // [B, L, H], may alias delta exactly (in-place step)
  float* partials = nullptr;    // [B, num_chunks, 4] fp32 scratch, needed when adv_step_needs_partials
  const float* alpha_ptr = nullptr;  // 0-dim device tensors (used instead of alpha / eps when set)
  const float* eps_ptr = nullptr;
  float alpha = 0.f, eps = 0.f;
  int64_t B = 0, L = 0, H = 0;
  int64_t sdb = 0, sdl = 0, sdh = 0;  // strides in elements
  int64_t sgb = 0, sgl = 0, sgh = 0;
  int64_t smb = 0, sml = 0;
  int64_t sob = 0, sol = 0, soh = 0;
  int step = kStepRaw;
  int norm = kNormLinf;
};

// Tokens per block of the update / stats kernels, and the number of token chunks per sample
// (the partials buffer is [B, adv_step_num_chunks(L), 4]).
constexpr int kAdvTokensPerBlock = 16;
inline int64_t adv_step_num_chunks(int64_t L) { return (L + kAdvTokensPerBlock - 1) / kAdvTokensPerBlock; }
inline bool adv_step_needs_partials(int step, int norm) {
  return step == kStepL2 || step == kStepLinf || norm == kNormL2;
}

cudaError_t launch_adv_step(const AdvStepArgs& args, cudaStream_t stream);

template <typename TD, typename TG>
cudaError_t adv_step_typed(const AdvStepArgs& args, cudaStream_t stream);

}  // namespace modkern
