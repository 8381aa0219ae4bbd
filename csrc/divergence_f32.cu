// Divergence kernels instantiated for float (one element type per translation unit so that the
// build compiles them in parallel).
#include "divergence_kernels.cuh"

namespace modkern {
MODKERN_INSTANTIATE_DIVERGENCE(float)
}  // namespace modkern
