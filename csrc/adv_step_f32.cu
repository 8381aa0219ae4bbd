// Masked PGD step kernels instantiated for delta of type float (every grad dtype).
#include "adv_step_kernels.cuh"

namespace modkern {
MODKERN_INSTANTIATE_ADV_STEP(float)
}  // namespace modkern
