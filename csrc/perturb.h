// Host API of the perturb kernels (modkern.perturb). No torch include.
//
//   forward:  out[r, h]        = cast_embeds( fp32(embeds[r, h]) + (fp32(delta[r, h]) if mask[r] else 0) )
//   backward: grad_delta[r, h] = cast_delta( grad_out[r, h] if mask[r] else 0 )
// over rows r of contiguous [N, H] tensors (leading dims flattened); delta / grad_out of unselected
// rows are not read.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "device_info.h"

namespace modkern {

struct PerturbArgs {
  DType a_dtype = DType::kFloat32;    // forward: embeds (and out); backward: grad_out
  DType b_dtype = DType::kFloat32;    // forward: delta;            backward: grad_delta (output)
  const void* a = nullptr;            // forward: embeds [N, H];   backward: grad_out [N, H]
  const void* b = nullptr;            // forward: delta [N, H];    backward: unused
  const bool* mask = nullptr;         // [N]
  void* out = nullptr;                // forward: out (a_dtype);   backward: grad_delta (b_dtype)
  int64_t N = 0, H = 0;
};

cudaError_t launch_perturb_forward(const PerturbArgs& args, cudaStream_t stream);
cudaError_t launch_perturb_backward(const PerturbArgs& args, cudaStream_t stream);

template <typename TA, typename TB>
cudaError_t perturb_forward_typed(const PerturbArgs& args, cudaStream_t stream);
template <typename TA, typename TB>
cudaError_t perturb_backward_typed(const PerturbArgs& args, cudaStream_t stream);

}  // namespace modkern
