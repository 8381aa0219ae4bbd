"""``perturb`` (``embeds + delta ⊙ mask``), with the two pieces around it: ``init_delta`` (the random
start in the ε-ball) and ``modality_mask`` (which tokens a sample's attack may move).

``api`` (custom ops and ``perturb``), ``delta_init``, ``mask``, ``reference`` (the float64
spec of ``perturb`` and ``modality_mask``), ``torch_impl`` and ``cuda_impl`` (backends; the Triton
one is ``kernels/perturb.py``).
"""

from modkern.ops.perturb.api import perturb
from modkern.ops.perturb.delta_init import init_delta
from modkern.ops.perturb.mask import modality_mask

__all__ = ["init_delta", "modality_mask", "perturb"]
