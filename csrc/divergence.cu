// Element-type dispatch of the divergence launchers (torch-free; see divergence.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "divergence.h"

namespace modkern {

cudaError_t launch_divergence_forward(const DivForwardArgs& args, const DivTuning& tuning, cudaStream_t stream,
                               DivLaunchInfo* info) {
  switch (args.dtype) {
    case DType::kFloat32:
      return divergence_forward_typed<float>(args, tuning, stream, info);
    case DType::kBFloat16:
      return divergence_forward_typed<__nv_bfloat16>(args, tuning, stream, info);
    case DType::kFloat16:
      return divergence_forward_typed<__half>(args, tuning, stream, info);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_divergence_scale_rows(const ScaleRowsArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::kFloat32:
      return divergence_scale_rows_typed<float>(args, stream);
    case DType::kBFloat16:
      return divergence_scale_rows_typed<__nv_bfloat16>(args, stream);
    case DType::kFloat16:
      return divergence_scale_rows_typed<__half>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_divergence_grad_p_shared(const GradPSharedArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::kFloat32:
      return divergence_grad_p_shared_typed<float>(args, stream);
    case DType::kBFloat16:
      return divergence_grad_p_shared_typed<__nv_bfloat16>(args, stream);
    case DType::kFloat16:
      return divergence_grad_p_shared_typed<__half>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace modkern
