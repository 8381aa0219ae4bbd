// Divergence kernels instantiated for __nv_bfloat16 (one element type per translation unit so that the
// build compiles them in parallel).
#include "divergence_kernels.cuh"

namespace modkern {
MODKERN_INSTANTIATE_DIVERGENCE(__nv_bfloat16)
}  // namespace modkern
