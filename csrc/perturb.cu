// Element-type dispatch of the perturb kernels (torch-free; see perturb.h). The kernels are
// small, so every dtype pair lives in this one translation unit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "perturb_kernels.cuh"

namespace modkern {

MODKERN_INSTANTIATE_PERTURB(float)
MODKERN_INSTANTIATE_PERTURB(__nv_bfloat16)
MODKERN_INSTANTIATE_PERTURB(__half)

namespace {

template <typename TA, bool BACKWARD>
cudaError_t by_b(const PerturbArgs& args, cudaStream_t stream) {
  switch (args.b_dtype) {
    case DType::kFloat32:
      return BACKWARD ? perturb_backward_typed<TA, float>(args, stream)
                      : perturb_forward_typed<TA, float>(args, stream);
    case DType::kBFloat16:
      return BACKWARD ? perturb_backward_typed<TA, __nv_bfloat16>(args, stream)
                      : perturb_forward_typed<TA, __nv_bfloat16>(args, stream);
    case DType::kFloat16:
      return BACKWARD ? perturb_backward_typed<TA, __half>(args, stream)
                      : perturb_forward_typed<TA, __half>(args, stream);
  }
  return cudaErrorInvalidValue;
}

template <bool BACKWARD>
cudaError_t by_a(const PerturbArgs& args, cudaStream_t stream) {
  switch (args.a_dtype) {
    case DType::kFloat32:
      return by_b<float, BACKWARD>(args, stream);
    case DType::kBFloat16:
      return by_b<__nv_bfloat16, BACKWARD>(args, stream);
    case DType::kFloat16:
      return by_b<__half, BACKWARD>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_perturb_forward(const PerturbArgs& args, cudaStream_t stream) { return by_a<false>(args, stream); }

cudaError_t launch_perturb_backward(const PerturbArgs& args, cudaStream_t stream) { return by_a<true>(args, stream); }

}  // namespace modkern
