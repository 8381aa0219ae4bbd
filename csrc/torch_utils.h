// Small helpers shared by the torch glue files (*.cpp).
#pragma once

#include <cuda_runtime.h>

#include <torch/extension.h>

#include "device_info.h"

namespace modkern {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, "modkern._C: unsupported dtype ", t, " (float32, bfloat16 and float16 are supported)");
  }
  return DType::kFloat32;  // unreachable
}

inline void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "modkern._C ", what, " failed: ", cudaGetErrorString(err));
}

}  // namespace modkern
