// Masked PGD step kernels instantiated for delta of type __half (every grad dtype).
#include "adv_step_kernels.cuh"

namespace modkern {
MODKERN_INSTANTIATE_ADV_STEP(__half)
}  // namespace modkern
