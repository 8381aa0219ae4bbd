// Masked PGD step kernels instantiated for delta of type __nv_bfloat16 (every grad dtype).
#include "adv_step_kernels.cuh"

namespace modkern {
MODKERN_INSTANTIATE_ADV_STEP(__nv_bfloat16)
}  // namespace modkern
