"""``masked_adv_step``: one PGD update of an embedding perturbation restricted by a modality mask.

``api`` (custom ops and the public function), ``reference`` (the float64 spec), ``torch_impl`` and
``cuda_impl`` (backends; the Triton one is ``kernels/adv_step.py``).
"""

from modkern.ops.adv_step.api import NORMS, STEPS, masked_adv_step

__all__ = ["NORMS", "STEPS", "masked_adv_step"]
