"""The robust objective's settings: :class:`RobustConfig` (defaults: the official LLaVA-1.5 KL + PGD
recipe), the names each option takes, and :data:`PRESETS` (the published settings)."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from modkern import checks
from modkern.ops.adv_step import NORMS, STEPS
from modkern.ops.dispatch import check_backend
from modkern.ops.divergence import DIRECTIONS, GRAD_MODES

SAMPLE_KINDS = ("image_heavy", "text_heavy", "vqa")
DIVERGENCES = ("kl", "js", "none")
INITS = ("random", "zero")
ATTACK_NORMALIZATIONS = ("num_items", "micro_batch")
# Which rows the consistency term compares with their clean sample's answer rows (P, detached):
# "official" - each heuristic copy's clean forward and every row's adversarial forward (the official
#   LLaVA / Qwen KL + PGD objective); "adversarial" - the adversarial forwards only; "heuristic" - the
#   copies' clean forwards only (no attack and no adversarial forward: the paper's consistency-only
#   ablation).
PAIRS = ("official", "adversarial", "heuristic")
# What the consistency sum is divided by: "clean_samples" - the number of clean samples (the
# official code; of the accumulated batch under gradient accumulation); "tokens" - the answer tokens,
# like the CEs (num_items_in_batch).
CONSISTENCY_DIVISORS = ("clean_samples", "tokens")
LM_HEAD_MODES = ("auto", "rows", "chunked")

Policy = Union[str, list, tuple]


def _default_policy() -> dict:
    # The paper's modality mask: image-heavy samples perturb the text, text-heavy samples the image,
    # VQA samples nothing.
    return {"image_heavy": "text", "text_heavy": "image", "vqa": "none"}


def _check_target(name: str, target) -> Policy:
    if isinstance(target, str):
        return target
    if isinstance(target, (list, tuple)) and target and all(isinstance(t, str) for t in target):
        return list(target)
    raise TypeError(f"{name} must be a modality name, 'text', 'none' or a non-empty list of names, got {target!r}")


@dataclass
class RobustConfig:
    """Hyper-parameters of the robust objective (defaults: the official LLaVA-1.5 KL + PGD recipe).

    The defaults compute what the official code computes (SPEC §2), with modkern's documented
    departures only (shifted answer rows, no 1e-6 floor on Q, fp32 delta): for a micro-batch of
    clean samples O and heuristic copies C (rows R = O + C, ``ref(r)`` the clean sample of row r)::

        L = CE_clean + CE_adv + lam / |O| * [ sum_{c in C} sum_k KL(Q^clean_{c,k} || P_{ref(c),k})
                                            + sum_{r in R} sum_k KL(Q^adv_{r,k}  || P_{ref(r),k}) ]

    with P = softmax(clean logits / T) of the clean sample's k-th answer row (detached), Q the
    compared row's, the CEs token means over all rows' answer tokens. :data:`PRESETS` holds the
    published configurations (:meth:`preset`); every other variant is an explicit field.

    Attributes:
        epsilon: radius of the perturbation ball (1e-3 for LLaVA-1.5 / Qwen2.5-VL-7B, 0.01 for
            Qwen-3B, 0.05 for InstructBLIP).
        alpha: PGD step size (0.1).
        steps: attack steps K >= 0 (1-4, 2 typical; 0 keeps the random start).
        lam: weight of the consistency term (0.01 LLaVA, 0.001 Qwen); 0 disables it.
        divergence: ``"kl"`` (``fused_kl``, clean branch P detached), ``"js"`` (``fused_js``: the
            standard generalized JS, not the official code's ½[KL(M‖P) + KL(M‖Q)]) or ``"none"``.
        kl_direction: ``"reverse"`` KL(Q‖P) = KL(compared || clean), the official
            ``F.kl_div(log P.detach(), Q)``; ``"forward"`` KL(P‖Q); ``"symmetric"`` their sum.
        pairs: which rows the consistency term compares with their clean sample (:data:`PAIRS`):
            ``"official"`` (each copy's clean forward and every row's adversarial forward),
            ``"adversarial"`` (adversarial forwards only) or ``"heuristic"`` (the copies' clean
            forwards only; no attack, no adversarial forward, ``ce_adv`` = 0).
        consistency_divisor: ``"clean_samples"`` (the official: the consistency sum over rows,
            answer tokens and vocabulary divided by the number of clean samples, ``num_clean_in_batch``
            under gradient accumulation) or ``"tokens"`` (by ``num_items_in_batch``, like the CEs).
        attack_stats: compute the attack telemetry of :class:`RobustOutput` (a few reductions over
            ``[B, L, H]``, no host sync).
        beta: JS mixture weight in (0, 1).
        temperature: softmax temperature of the divergence.
        divergence_grad_mode: the divergence's ``grad_mode`` on the logits path (``"auto"``,
            ``"backward"``, ``"forward"``: see :func:`modkern.fused_js`; the weight
            ``lam / num_items`` is its ``scale``, so a ``"forward"`` backward moves nothing under
            a plain ``loss.backward()``). The chunked head computes its own gradients.
        step: PGD direction, ``"raw"`` (the paper's), ``"sign"``, ``"l2"``, ``"l2_token"``, ``"linf"``.
        norm: projection, ``"linf"`` (the paper's), ``"l2"``, ``"l2_token"`` or None.
        init: ``"random"`` (``init_delta`` in the ``norm`` ball) or ``"zero"``.
        attack_normalization: what the attack's CE sum is divided by: ``"micro_batch"`` (this
            micro-batch's answer tokens: the official code's micro-batch mean) or ``"num_items"``
            (the ``num_items_in_batch`` of the loss, so the perturbation is independent of the
            micro-batch split; a smaller raw step when accumulating). The two agree without
            gradient accumulation, and for the scale-free ``sign`` / ``l2`` / ``linf`` steps.
        policy: sample kind -> what to perturb (``"text"``, a modality name, a list of them, or
            ``"none"``).
        default_perturb: the target for batches without ``sample_kind``.
        token_ids: modality name -> placeholder id(s); None reads ``{image,video,audio}_token_id``
            (or ``_token_index``) from the model config.
        exclude_ids: ids that are neither text nor modality content (never perturbed as text);
            None reads the ``{vision,audio}_{start,end}_token_id`` markers from the model config.
        backend: backend of the modkern ops (``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``).
        freeze_params_during_attack: set ``requires_grad=False`` on the parameters during the
            attack forwards (no weight-gradient activations are saved); restored afterwards.
        reuse_encoder_outputs: drop ``encoder_input_keys`` from the attack / adversarial forwards
            (the features are taken from the clean call's merged embeddings).
        encoder_input_keys: the batch keys that only feed the modality encoders.
        language_model: the module that receives ``inputs_embeds`` (or a dotted attribute path
            from the model); None finds it (``get_decoder()``).
        lm_head: how the logits of the answer rows are computed: ``"rows"`` (the head module on
            the gathered rows, ``[rows, V]`` logits at once), ``"chunked"`` (the fused-linear path:
            chunks of rows from the head's weight; needs a plain, unsharded linear head) or
            ``"auto"`` (rows unless their fp32 logits exceed ``logits_budget_mb``).
        logits_budget_mb: the ``"auto"`` threshold, in MiB of ``rows x V`` fp32 logits.
        chunk_size: rows per chunk of the chunked path (None: from a memory budget).
        skip_unperturbed: run the attack and the adversarial forward only on the samples whose
            modality mask is non-empty (and the copies, whose clean rows the consistency compares):
            the others' adversarial forward recomputes their clean one (no dropout), so their
            adversarial CE is taken from the clean pass and their consistency is 0. Exact: the loss
            and every gradient as without skipping (see :func:`robust_loss`). Needs a language-model
            call whose arguments have a known batch layout; otherwise the whole batch runs.
    """

    epsilon: float = 1e-3
    alpha: float = 0.1
    steps: int = 2
    lam: float = 0.01
    divergence: str = "kl"
    kl_direction: str = "reverse"
    pairs: str = "official"
    consistency_divisor: str = "clean_samples"
    beta: float = 0.5
    temperature: float = 1.0
    divergence_grad_mode: str = "auto"
    step: str = "raw"
    norm: Optional[str] = "linf"
    init: str = "random"
    attack_normalization: str = "micro_batch"
    policy: dict = field(default_factory=_default_policy)
    default_perturb: Policy = "text"
    token_ids: Optional[dict] = None
    exclude_ids: Optional[tuple] = None
    backend: str = "auto"
    freeze_params_during_attack: bool = True
    reuse_encoder_outputs: bool = True
    encoder_input_keys: tuple = ("pixel_values", "pixel_values_videos", "input_features")
    language_model: Any = None
    lm_head: str = "auto"
    logits_budget_mb: float = 1024.0
    chunk_size: Optional[int] = None
    attack_stats: bool = True
    skip_unperturbed: bool = True

    def __post_init__(self):
        self.epsilon = checks.check_positive_number("epsilon", self.epsilon, allow_tensor=False)
        self.alpha = checks.check_positive_number("alpha", self.alpha, allow_tensor=False)
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
            raise TypeError(f"steps must be an int >= 0, got {type(self.steps).__name__}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        self.steps = int(self.steps)
        if isinstance(self.lam, bool) or not isinstance(self.lam, numbers.Real):
            raise TypeError(f"lam must be a real number >= 0, got {type(self.lam).__name__}")
        if not self.lam >= 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        self.lam = float(self.lam)
        checks.check_choice("divergence", self.divergence, DIVERGENCES)
        checks.check_choice("kl_direction", self.kl_direction, DIRECTIONS)
        checks.check_choice("pairs", self.pairs, PAIRS)
        checks.check_choice("consistency_divisor", self.consistency_divisor, CONSISTENCY_DIVISORS)
        self.beta = checks.check_open_unit_interval("beta", self.beta)
        self.temperature = checks.check_positive_number("temperature", self.temperature, allow_tensor=False)
        checks.check_choice("divergence_grad_mode", self.divergence_grad_mode, GRAD_MODES)
        checks.check_choice("step", self.step, STEPS)
        checks.check_choice("norm", self.norm, NORMS)
        checks.check_choice("init", self.init, INITS)
        checks.check_choice("attack_normalization", self.attack_normalization, ATTACK_NORMALIZATIONS)
        if not isinstance(self.policy, dict):
            raise TypeError(f"policy must be a dict sample kind -> target, got {type(self.policy).__name__}")
        self.policy = {str(k): _check_target(f"policy[{k!r}]", v) for k, v in self.policy.items()}
        self.default_perturb = _check_target("default_perturb", self.default_perturb)
        if self.token_ids is not None and not isinstance(self.token_ids, dict):
            raise TypeError(f"token_ids must be a dict modality -> id(s) or None, got {type(self.token_ids).__name__}")
        if self.exclude_ids is not None:
            self.exclude_ids = tuple(int(i) for i in self.exclude_ids)
        self.backend = check_backend(self.backend)
        for name in ("freeze_params_during_attack", "reuse_encoder_outputs", "attack_stats", "skip_unperturbed"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        self.encoder_input_keys = tuple(self.encoder_input_keys)
        checks.check_choice("lm_head", self.lm_head, LM_HEAD_MODES)
        self.logits_budget_mb = checks.check_positive_number(
            "logits_budget_mb", self.logits_budget_mb, allow_tensor=False
        )
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool)
            or not isinstance(self.chunk_size, numbers.Integral)
            or self.chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")
        if self.chunk_size is not None:
            self.chunk_size = int(self.chunk_size)  # e.g. a numpy integer: the op takes a Python int

    def replace(self, **changes) -> RobustConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> RobustConfig:
        """The published configuration ``name`` (a key of :data:`PRESETS`), with ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def uses_divergence(self) -> bool:
        return self.divergence != "none" and self.lam > 0

    @property
    def uses_attack(self) -> bool:
        """Whether the attack and the adversarial forward run (not for ``pairs="heuristic"``)."""
        return self.pairs != "heuristic"


# The official configurations (configs/model_train/* of luisrui/Modality-Interference-in-MLLMs), as
# RobustConfig fields on top of the defaults (= "llava-1.5-kl-pgd"). Learning rate, epochs and the
# sample mix are the trainer's and the data's: lr 2e-5 (LLaVA, InstructBLIP) / 1e-5 (Qwen), 1 epoch,
# image-heavy : text-heavy : VQA = 2:2:4 (1:1:6 for the Qwen JS run).
PRESETS = {
    "llava-1.5-kl-pgd": {},
    "qwen2.5-vl-7b-kl-pgd": {},
    "qwen2.5-vl-7b-js-pgd": dict(divergence="js", steps=1, lam=0.001),
    "qwen2.5-vl-3b-kl-pgd": dict(epsilon=0.01, lam=0.001),
    "instructblip-kl-pgd": dict(epsilon=0.05, steps=4),
    # modkern 0.1's objective (before it followed the official code): adversarial pairs only, KL(P‖Q),
    # every term divided by the answer tokens, the attack on the accumulated batch's normalization.
    "modkern-0.1": dict(
        pairs="adversarial", kl_direction="forward", consistency_divisor="tokens", attack_normalization="num_items"
    ),
}
