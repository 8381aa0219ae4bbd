// Divergence kernels instantiated for __half (one element type per translation unit so that the
// build compiles them in parallel).
#include "divergence_kernels.cuh"

namespace modkern {
MODKERN_INSTANTIATE_DIVERGENCE(__half)
}  // namespace modkern
