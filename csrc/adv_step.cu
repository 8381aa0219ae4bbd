// Element-type dispatch of the masked PGD step (torch-free; see adv_step.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "adv_step.h"

namespace modkern {

namespace {

template <typename TD>
cudaError_t by_grad(const AdvStepArgs& args, cudaStream_t stream) {
  switch (args.grad_dtype) {
    case DType::kFloat32:
      return adv_step_typed<TD, float>(args, stream);
    case DType::kBFloat16:
      return adv_step_typed<TD, __nv_bfloat16>(args, stream);
    case DType::kFloat16:
      return adv_step_typed<TD, __half>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_adv_step(const AdvStepArgs& args, cudaStream_t stream) {
  if (args.step < kStepRaw || args.step > kStepLinf || args.norm < kNormNone || args.norm > kNormL2Token)
    return cudaErrorInvalidValue;
  switch (args.delta_dtype) {
    case DType::kFloat32:
      return by_grad<float>(args, stream);
    case DType::kBFloat16:
      return by_grad<__nv_bfloat16>(args, stream);
    case DType::kFloat16:
      return by_grad<__half>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace modkern
