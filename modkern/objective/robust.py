"""The modality-robust training objective (SPEC §2), for any Hugging Face causal (multimodal) LM.

Per micro-batch of clean samples O and their heuristic copies C (rows R = O + C; ``ref(r)`` is the
clean sample of row r, ``batch["ref_index"]``), with ``x0`` the merged input embeddings the language
model receives (text embeddings with the image / video / audio features already in their slots) and
``M`` the modality mask of each sample::

    logits_c = f(x0)                              CE_c = CE(logits_c, labels)   (shifted)
    delta    = init_delta(x0, M, eps)
    K times: g = d CE_mean(f(perturb(x0, delta, M))) / d delta   (autograd.grad, delta only)
             delta = masked_adv_step(delta, g, M, alpha, eps)
    logits_a = f(perturb(x0.detach(), delta, M))  CE_a = CE(logits_a, labels)
    cons = [ sum_{c in C} sum_k KL(Q^clean_{c,k} || P_{ref(c),k})
           + sum_{r in R} sum_k KL(Q^adv_{r,k} || P_{ref(r),k}) ] / |O|
    L = CE_c + CE_a + lam * cons

P is the softmax of the clean sample's k-th answer row (detached), Q the compared row's; the CEs are
token means over every row's answer tokens. That is the official code's objective (its
``F.kl_div(log P.detach(), Q)``), modkern's default; :class:`RobustConfig` names every variant
(``pairs``, ``kl_direction``, ``consistency_divisor``) and :data:`PRESETS` the published settings.
``rows`` are the answer positions shifted like the CE (the logit at t-1 predicts the token at t; the
official code compares the unshifted positions). A copy's k-th answer row is compared with the k-th
answer row of its clean sample (copies may have prompts of other lengths).
``batch["sample_kind"][b]`` (``"image_heavy"``, ``"text_heavy"``, ``"vqa"`` or any key of
``RobustConfig.policy``) picks what the attack perturbs for that sample.

Logits only where the loss reads them: every forward (clean, each attack step, adversarial) runs
the LM head on the answer rows alone - a forward pre-hook on ``get_output_embeddings()`` hands it
the gathered rows of the final hidden states (``modkern.objective.model_hooks.AnswerRowHead``), so no
``[B, L, V]`` tensor ever exists and the head is still a module call (DDP, FSDP2 and ZeRO-3 gather
its weight as usual). When the answer rows' logits would exceed ``RobustConfig.logits_budget_mb``
(long answers, captions, chain of thought) the objective switches to the chunked fused-linear path:
the head receives an empty batch, and the CEs and the consistency term are computed from the rows'
hidden states and the head's weight chunk by chunk (``modkern.ops.linear_divergence``), the
adversarial CE and the divergence from the same logits chunk.

How the perturbation reaches the model: a forward pre-hook on the language model (the module
that receives ``inputs_embeds`` from the multimodal wrapper, ``model.model.language_model`` in
transformers 5 LLaVA / Qwen2-VL; the decoder itself for text-only LMs) records the clean call's
arguments and replays them with ``inputs_embeds = perturb(x0.detach(), delta, M)`` on the attack and
adversarial forwards. ``input_ids`` stay in the wrapper's call, so placeholder merging and M-RoPE work
as usual; with ``reuse_encoder_outputs`` the vision / audio encoder inputs are dropped from those
forwards (their features are already in ``x0``), so the encoders run once per micro-batch. The hook
is removed in a ``finally``, also when a forward raises.

Normalization: the CEs are token sums divided by ``num_items_in_batch`` when given (Hugging Face
passes the number of answer tokens of the whole accumulated batch), else by the micro-batch's
answer-token count; the consistency sum is divided by ``num_clean_in_batch`` (the clean samples of
the accumulated batch; the Trainer integration counts them) else by the micro-batch's clean samples,
so gradient accumulation is exact. The attack ascends the micro-batch mean CE, as the official code
does (``attack_normalization="micro_batch"``); ``"num_items"`` divides by ``num_items_in_batch``
instead, so that a sample's perturbation does not depend on the micro-batch split (with a ``"raw"``
step that makes the step smaller by the number of micro-batches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modkern import checks
from modkern._reduction import mean_divisor
from modkern.constants import IGNORE_INDEX
from modkern.objective.model_hooks import (  # noqa: F401 (re-exported: the objective's public plumbing)
    CONSUMED_KEYS,
    AnswerRowHead,
    EmbeddingInjector,
    FrozenParams,
    find_language_model,
    find_lm_head,
    get_logits,
    infer_exclude_ids,
    infer_token_ids,
    linear_head_weights,
    prepare_inputs,
    unwrap_model,
    vocab_size,
    wrapper_forward_context,
)
from modkern.ops.adv_step import NORMS, STEPS, masked_adv_step
from modkern.ops.dispatch import check_backend
from modkern.ops.divergence import DIRECTIONS, GRAD_MODES, fused_js, fused_kl
from modkern.ops.linear_divergence import default_chunk_size, linear_losses, token_ce_rows
from modkern.ops.perturb.delta_init import init_delta
from modkern.ops.perturb.mask import modality_mask

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


@dataclass
class RobustOutput:
    """``loss`` (differentiable total) and its detached parts.

    ``ce_clean``, ``ce_adv`` and ``consistency`` (already multiplied by ``lam``; 0 when disabled) are
    normalized like ``loss``: ``loss == ce_clean + ce_adv + consistency`` (about twice an SFT loss:
    two CEs). ``attack`` is the attack's telemetry (:data:`ATTACK_STATS`, detached 0-dim fp32
    tensors, no host sync; empty with ``RobustConfig(attack_stats=False)`` or without an attack).
    ``logits`` are the clean
    logits of the answer rows ``[rows, V]`` (row-major over ``[B, L]``, shifted: the row at t - 1
    predicts the answer token at t), only with ``return_logits=True`` on the answer-row path; no
    ``[B, L, V]`` tensor is kept. ``delta`` is the final perturbation and ``mask`` the modality mask
    ``[B, L]``. ``token_stats`` (with ``token_stats=True``): over the clean answer rows, the sum of
    the predictive entropies ``entropy_sum``, the argmax hits ``correct`` and the row count
    ``tokens`` (detached 0-dim fp32 tensors; TRL's ``entropy`` and ``mean_token_accuracy``).
    """

    loss: Tensor
    ce_clean: Tensor
    ce_adv: Tensor
    consistency: Tensor
    logits: Optional[Tensor] = None
    delta: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    attack: dict = field(default_factory=dict)
    token_stats: dict = field(default_factory=dict)

    def parts(self) -> dict:
        """The loss's parts (they add up to ``loss``)."""
        return {"ce_clean": self.ce_clean, "ce_adv": self.ce_adv, "consistency": self.consistency}


# The attack's telemetry (RobustOutput.attack), over the masked elements of the batch:
ATTACK_STATS = (
    "attack_grad_norm",  # ||g ⊙ M||_2 of the last step's attack gradient
    "attack_step_over_eps",  # mean |alpha * g| / epsilon on the masked elements (the raw step's size vs the ball)
    "delta_at_bound",  # share of the masked elements with |delta| at epsilon after the last step (Linf ball)
    "delta_over_embeds",  # ||delta ⊙ M||_2 / ||x0 ⊙ M||_2
    "delta_survives_cast",  # share of the masked elements that x0 + delta changes in the model's dtype
)


def attack_telemetry(x0: Tensor, delta: Tensor, grad: Optional[Tensor], mask: Tensor, config) -> dict:
    """The :data:`ATTACK_STATS` of a final ``delta`` (and the last step's gradient ``grad``), as
    0-dim fp32 tensors on the device (no host sync). 0 where the mask is empty."""
    m = mask.unsqueeze(-1).to(torch.float32)
    count = (m.sum() * x0.shape[-1]).clamp_min(1.0)
    d = delta.float() * m
    x = x0.detach().float() * m
    zero = d.new_zeros(())
    g = zero if grad is None else grad.float() * m
    changed = (x0.detach() + delta.to(torch.float32)).to(x0.dtype) != x0.detach()
    return {
        "attack_grad_norm": g.norm() if grad is not None else zero,
        "attack_step_over_eps": (g.abs().sum() / count) * (config.alpha / config.epsilon) if grad is not None else zero,
        "delta_at_bound": ((d.abs() >= config.epsilon * (1 - 1e-6)).float() * m).sum() / count,
        "delta_over_embeds": d.norm() / x.norm().clamp_min(torch.finfo(torch.float32).tiny),
        "delta_survives_cast": (changed.float() * m).sum() / count,
    }


# ----------------------------------------------------------------------------------------------
# Batch parsing


def shift_labels(labels: Tensor) -> Tensor:
    """``labels[:, 1:]`` padded with -100 at the end: row t of the logits predicts token t + 1."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _shifted_labels(batch: dict) -> Tensor:
    if batch.get("shift_labels") is not None:
        return batch["shift_labels"]
    if batch.get("labels") is not None:
        return shift_labels(batch["labels"])
    raise ValueError("batch must contain 'labels' (or 'shift_labels'): the objective is a next-token CE")


@dataclass
class _MicroBatch:
    """What the objective reads from one batch."""

    input_ids: Tensor
    labels: Tensor  # [B, L], unshifted (-100 = not an answer token)
    shifted: Tensor  # [B, L]: the target of logit row t
    policy: Policy
    inputs: dict  # the clean forward's model inputs
    replay_inputs: dict  # the attack / adversarial forwards' inputs (encoder inputs dropped)
    ref_index: Any
    attention_mask: Optional[Tensor]


def _read_batch(model: nn.Module, batch: dict, config: RobustConfig) -> _MicroBatch:
    if not isinstance(batch, dict):
        raise TypeError(f"batch must be a dict of model inputs, got {type(batch).__name__}")
    input_ids = batch.get("input_ids")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError("batch['input_ids'] must be a [B, L] tensor (the modality mask is built from it)")
    shifted = _shifted_labels(batch)
    labels = batch.get("labels")
    if batch.get("shift_labels") is not None or labels is None:
        labels = F.pad(shifted[:, :-1], (1, 0), value=IGNORE_INDEX)
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    token_ids = config.token_ids if config.token_ids is not None else infer_token_ids(model)
    policy = _sample_policies(batch.get("sample_kind"), input_ids.shape[0], config)
    _check_targets(policy, token_ids)
    inputs = prepare_inputs(model, batch)
    replay_inputs = dict(inputs)
    if config.reuse_encoder_outputs:
        for key in config.encoder_input_keys:
            replay_inputs.pop(key, None)
    return _MicroBatch(
        input_ids, labels, shifted, policy, inputs, replay_inputs, batch.get("ref_index"), batch.get("attention_mask")
    )


def _as_selector(target) -> Union[str, tuple]:
    # modality_mask: a str or a tuple (union) selects per batch; a list is per sample.
    return target if isinstance(target, str) else tuple(target)


def _sample_policies(kinds, batch_size: int, config: RobustConfig) -> Policy:
    """Per-sample perturbation targets from ``sample_kind`` (one value when they all agree)."""
    if kinds is None:
        return _as_selector(config.default_perturb)
    if isinstance(kinds, Tensor):
        if kinds.dtype.is_floating_point or kinds.dim() != 1:
            raise ValueError(
                "sample_kind as a tensor must hold 1-D integer codes into modkern.objective.robust.SAMPLE_KINDS"
            )
        codes = kinds.tolist()
        if any(not 0 <= c < len(SAMPLE_KINDS) for c in codes):
            raise ValueError(f"sample_kind codes must be in [0, {len(SAMPLE_KINDS)}) (SAMPLE_KINDS), got {codes}")
        kinds = [SAMPLE_KINDS[c] for c in codes]
    elif isinstance(kinds, str):
        kinds = [kinds] * batch_size
    kinds = list(kinds)
    if len(kinds) != batch_size:
        raise ValueError(f"sample_kind has {len(kinds)} entries but the batch has {batch_size} samples")
    targets = []
    for kind in kinds:
        if kind not in config.policy:
            raise ValueError(f"unknown sample_kind {kind!r}; RobustConfig.policy knows {tuple(config.policy)}")
        targets.append(_as_selector(config.policy[kind]))
    if all(t == targets[0] for t in targets):
        return targets[0]
    return targets  # a list: one selector per sample


def _check_targets(policy: Policy, token_ids: dict):
    names = list(policy) if isinstance(policy, list) else [policy]
    flat = []
    for n in names:
        flat.extend([n] if isinstance(n, str) else n)
    for n in flat:
        if n not in ("text", "none") and n not in token_ids:
            raise ValueError(
                f"the perturbation target {n!r} is not a modality of this model (token_ids: {sorted(token_ids)}); "
                "set RobustConfig.token_ids or change RobustConfig.policy"
            )


def _attack_grad(loss: Tensor, delta: Tensor):
    try:
        return torch.autograd.grad(loss, delta)
    except RuntimeError as exc:
        if "reentrant" in str(exc).lower():
            raise RuntimeError(
                "the attack differentiates with torch.autograd.grad, which reentrant activation checkpointing "
                "does not support; enable checkpointing with use_reentrant=False (the transformers 5 default), "
                "e.g. model.activation_checkpointing_enable({'use_reentrant': False}) or "
                "TrainingArguments(gradient_checkpointing_kwargs={'use_reentrant': False})"
            ) from exc
        raise


def row_ref_index(rows: Tensor, ref_index: Tensor) -> Tensor:
    """Row-level reference map for ``fused_kl`` / ``fused_js`` over ``[B * L, V]`` logits.

    ``rows [B, L]`` marks the answer rows of each sample; ``ref_index [B]`` the clean sample of each
    sample. The k-th answer row of sample b maps to the k-th answer row of sample ``ref_index[b]``
    (copies may have prompts of other lengths). Computed on the device without host syncs. The answer
    counts of each copy and its reference must agree: checked on CPU (``ValueError``); elsewhere the
    rows of a sample that breaks the rule map to -1, which the divergence ops turn into NaN.
    """
    batch, length = rows.shape
    rank = rows.long().cumsum(1) - 1
    # position of the k-th answer row of each sample (column `length` takes the non-answer writes)
    slots = torch.where(rows, rank, torch.full_like(rank, length))
    pos = torch.zeros(batch, length + 1, dtype=torch.long, device=rows.device)
    pos.scatter_(1, slots, torch.arange(length, device=rows.device).expand(batch, length))
    ref = ref_index.to(device=rows.device, dtype=torch.long)
    counts = rows.sum(1)
    same = counts == counts[ref]
    if rows.device.type == "cpu":
        if not bool(same.all()):
            bad = (~same).nonzero().flatten().tolist()
            raise ValueError(
                f"samples {bad} have a different number of answer tokens than their ref_index sample: a copy must "
                "keep its clean sample's answer"
            )
    ref_pos = pos[ref].gather(1, rank.clamp_min(0))
    # elsewhere no host sync: a sample whose answer length differs maps to -1, which the divergence
    # ops turn into a NaN loss (no device-side assert, which would kill the CUDA context)
    index = torch.where(same.unsqueeze(1), ref.unsqueeze(1) * length + ref_pos, torch.full_like(ref_pos, -1))
    return index.reshape(-1)


def _normalize_ref_index(ref_index, batch_size: int, device) -> Tensor:
    if not isinstance(ref_index, Tensor):
        ref_index = torch.as_tensor(ref_index)
    if ref_index.dtype.is_floating_point or ref_index.dtype == torch.bool:
        raise TypeError(f"ref_index must be an integer tensor, got {ref_index.dtype}")
    if tuple(ref_index.shape) != (batch_size,):
        raise ValueError(
            f"ref_index must have shape ({batch_size},) (one entry per sample), got {tuple(ref_index.shape)}"
        )
    ref_index = ref_index.to(device=device, dtype=torch.long)
    own = torch.arange(batch_size, device=device)
    ref_index = torch.where(ref_index < 0, own, ref_index)
    if device.type == "cpu" and batch_size and int(ref_index.max()) >= batch_size:
        raise ValueError(f"ref_index values must be < the batch size {batch_size}")
    return ref_index


def _normalizer(num_items_in_batch, rows: Tensor):
    """What every token sum is divided by: ``num_items_in_batch``, else this micro-batch's answer tokens."""
    if num_items_in_batch is not None and not isinstance(num_items_in_batch, Tensor):
        checks.check_num_items(num_items_in_batch)
    return mean_divisor(num_items_in_batch, rows, rows.numel(), rows.device, torch.float32)


# ----------------------------------------------------------------------------------------------
# The answer rows and the forwards that compute them


@dataclass
class _AnswerRows:
    """The rows every term of the objective reads, and what the token sums are divided by.

    ``index [n]``: flat positions into ``[B * L]`` of the shifted answer rows (one host sync per
    micro-batch, ``nonzero``); ``targets [n]``: their next tokens; ``chunked``: whether the LM head
    runs through the chunked fused-linear path.
    """

    mask: Tensor  # [B, L] bool
    index: Tensor
    targets: Tensor
    denom: Any
    attack_denom: Any
    chunked: bool

    @property
    def tokens(self) -> int:
        return self.mask.numel()

    def ref_rows(self, ref_index) -> Optional[Tensor]:
        """Row-level ``ref_index`` over the answer rows: the k-th answer row of a copy -> the k-th
        answer row of its clean sample (see :func:`row_ref_index`); None without copies."""
        if ref_index is None:
            return None
        device = self.mask.device
        full = row_ref_index(self.mask, _normalize_ref_index(ref_index, self.mask.shape[0], device))[self.index]
        position = torch.zeros(self.tokens, dtype=torch.long, device=device)
        position[self.index] = torch.arange(self.index.numel(), device=device)
        return torch.where(full >= 0, position[full.clamp_min(0)], full)  # -1 stays: a NaN loss


def _answer_rows(shifted: Tensor, num_items_in_batch, config: RobustConfig, model, head: nn.Module) -> _AnswerRows:
    mask = shifted != IGNORE_INDEX
    flat = shifted.reshape(-1)
    index = mask.reshape(-1).nonzero().squeeze(1)
    denom = _normalizer(num_items_in_batch, mask)
    attack_denom = denom if config.attack_normalization == "num_items" else _normalizer(None, mask)
    chunked = _use_chunked_head(config, index.numel(), model, head)
    return _AnswerRows(mask, index, flat.index_select(0, index), denom, attack_denom, chunked)


def _use_chunked_head(config: RobustConfig, rows: int, model, head) -> bool:
    if config.lm_head == "rows":
        return False
    if config.lm_head == "chunked":
        linear_head_weights(model, head)  # a clear error when the head cannot be chunked
        return True
    try:
        vocab = vocab_size(head)
    except ValueError:  # a head of its own kind: the answer-row path works for any module
        return False
    if rows * vocab * 4 <= config.logits_budget_mb * 2**20:
        return False
    try:
        linear_head_weights(model, head)
    except ValueError as exc:
        warnings.warn(
            f"the answer rows' logits ({rows} x {vocab}) exceed logits_budget_mb={config.logits_budget_mb:g} but the "
            f"chunked LM-head path cannot run: {exc}",
            stacklevel=3,
        )
        return False
    return True


@dataclass
class _Branch:
    """One forward's answer rows: ``logits [n, V]`` (answer-row path) or ``hidden [n, H]`` (chunked),
    and their ``targets [n]``."""

    targets: Tensor
    logits: Optional[Tensor] = None
    hidden: Optional[Tensor] = None


@dataclass
class _SkipPlan:
    """The samples that the attack and the adversarial forward run on (``skip_unperturbed``).

    ``samples [b]`` (int64, increasing); ``index`` / ``tokens`` / ``targets``: their answer rows as
    the head hook takes them (flat over the sub-batch's ``b * L`` positions); ``kept_rows [n_b]``:
    which of the whole batch's answer rows those are; ``skipped_rows`` (bool ``[n]``): the rows whose
    adversarial CE is their clean CE; ``adv_weight``: 0 when no sample needed the forwards (sample 0
    runs them anyway, weighted 0: every rank makes the same module calls), else 1.
    """

    samples: Tensor
    index: Tensor
    tokens: int
    targets: Tensor
    kept_rows: Tensor
    skipped_rows: Tensor
    adv_weight: float

    @staticmethod
    def of(keep: Tensor, rows: _AnswerRows) -> _SkipPlan:
        """The plan for the samples ``keep`` (bool ``[B]``); one host sync (how many are kept)."""
        device = rows.mask.device
        keep = keep.to(device)
        samples = keep.nonzero().squeeze(1)
        adv_weight = 1.0
        if samples.numel() == 0:
            samples, adv_weight = samples.new_zeros(1), 0.0
        in_plan = torch.zeros_like(keep).index_fill_(0, samples, True)
        row_sample = rows.index // rows.mask.shape[1]
        kept_rows = in_plan[row_sample].nonzero().squeeze(1)
        sub = rows.mask.index_select(0, samples)
        return _SkipPlan(
            samples=samples,
            index=sub.reshape(-1).nonzero().squeeze(1),
            tokens=sub.numel(),
            targets=rows.targets.index_select(0, kept_rows),
            kept_rows=kept_rows,
            skipped_rows=~keep[row_sample],
            adv_weight=adv_weight,
        )

    def adv_ref_rows(self, ref_rows: Optional[Tensor], device) -> Tensor:
        """The clean answer row each adversarial row is compared with."""
        kept = self.kept_rows.to(device)
        return kept if ref_rows is None else ref_rows.index_select(0, kept)


class _ForwardPasses(contextlib.ExitStack):
    """The objective's forwards, with both hooks: the perturbation in, the answer rows out."""

    def __init__(self, model: nn.Module, config: RobustConfig, head: nn.Module):
        super().__init__()
        self.model, self.base, self.config = model, unwrap_model(model), config
        self.injector = EmbeddingInjector(find_language_model(model, config.language_model), backend=config.backend)
        self.head = AnswerRowHead(head)
        self.rows: Optional[_AnswerRows] = None
        self.plan: Optional[_SkipPlan] = None

    def __enter__(self):
        super().__enter__()
        self.enter_context(self.injector)
        self.enter_context(self.head)
        return self

    def _run(self, module: nn.Module, inputs: dict, index: Tensor, tokens: int, targets: Tensor) -> _Branch:
        self.head.expect(index, tokens, keep_hidden=self.rows.chunked)
        output = module(**inputs)
        if self.rows.chunked:
            return _Branch(targets, hidden=self.head.rows_hidden())
        return _Branch(targets, logits=self.head.logits(output))

    def clean(self, inputs: dict, on_x0=None) -> _Branch:
        """The clean forward, through a DDP wrapper when there is one (its graph covers every parameter).
        ``on_x0(x0)``: see :class:`EmbeddingInjector`'s ``on_clean``."""
        self.injector.on_clean = on_x0
        branch = self._run(self.model, inputs, self.rows.index, self.rows.tokens, self.rows.targets)
        if tuple(self.x0.shape[:2]) != tuple(self.rows.mask.shape):
            raise RuntimeError(
                f"the language model received embeddings of shape {tuple(self.x0.shape)} but input_ids has shape "
                f"{tuple(self.rows.mask.shape)}; modkern needs one embedding per input_id (expanded placeholders)"
            )
        return branch

    @property
    def x0(self) -> Tensor:
        return self.injector.x0

    def perturbed(self, inputs: dict, delta: Tensor, mask: Tensor) -> _Branch:
        """A forward of the clean call replayed with ``inputs_embeds = perturb(x0, delta, mask)``, on
        the plan's samples when there is a plan (``delta`` / ``mask`` then hold those samples)."""
        plan = self.plan
        self.injector.set_perturbation(delta, mask, None if plan is None else plan.samples)
        with wrapper_forward_context(self.model):
            if plan is None:
                return self._run(self.base, inputs, self.rows.index, self.rows.tokens, self.rows.targets)
            return self._run(self.base, inputs, plan.index, plan.tokens, plan.targets)

    def head_weights(self):
        """``(weight, bias)`` of the head (the chunked path; its suitability was checked when it was chosen)."""
        return self.head.module.weight, self.head.module.bias

    def ce_rows(self, branch: _Branch) -> Tensor:
        """Next-token CE of each answer row of ``branch``, in fp32 (fp64 for a fp64 model)."""
        if branch.logits is not None:
            return token_ce_rows(branch.logits, branch.targets.to(branch.logits.device))
        weight, bias = self.head_weights()
        targets = branch.targets.to(branch.hidden.device)
        return linear_losses(branch.hidden, weight, bias, targets=targets, **self._chunking())[1]

    def ce_sum(self, branch: _Branch) -> Tensor:
        """Token-sum next-token CE of the answer rows of ``branch``."""
        return self.ce_rows(branch).sum()

    def _chunking(self) -> dict:
        return dict(chunk_size=self.config.chunk_size, backend=self.config.backend)


# ----------------------------------------------------------------------------------------------
# The objective: clean pass, attack, adversarial pass, consistency


def _modality_mask(device, micro: _MicroBatch, model: nn.Module, config: RobustConfig) -> Tensor:
    return modality_mask(
        micro.input_ids.to(device),
        perturb=micro.policy,
        token_ids=config.token_ids if config.token_ids is not None else infer_token_ids(model),
        labels=micro.labels.to(device),
        attention_mask=None if micro.attention_mask is None else micro.attention_mask.to(device),
        exclude_ids=config.exclude_ids if config.exclude_ids is not None else infer_exclude_ids(model),
    )


def _attack(passes: _ForwardPasses, micro: _MicroBatch, mask: Tensor, config: RobustConfig, grad_scale=None):
    """K PGD steps on delta; the gradient is taken w.r.t. delta only (``autograd.grad``).

    Every rank runs the K forwards whatever its data (an empty mask gives a zero step), so that
    FSDP / ZeRO-3 parameter all-gathers pair up across ranks. ``grad_scale`` multiplies the attack
    loss before the backward and divides the (fp32) gradient after it, like a GradScaler, so that
    fp16 activation gradients do not underflow; a step whose gradient overflowed is skipped.
    With a skip plan the attack runs on the plan's samples: ``delta`` starts as those samples' rows
    of the whole batch's random start (the same values as without the plan).
    Returns ``(delta, mask, telemetry)`` on those samples (see :func:`attack_telemetry`; ``{}`` when
    not asked for).
    """
    grad = None
    init_norm = "zero" if config.init == "zero" else ("linf" if config.norm in ("linf", None) else "l2")
    delta = init_delta(passes.x0, mask, epsilon=config.epsilon, norm=init_norm, dtype=torch.float32)
    x0 = passes.x0
    if passes.plan is not None:
        samples = passes.plan.samples.to(x0.device)
        delta, mask, x0 = (t.index_select(0, samples) for t in (delta, mask, x0))
    with FrozenParams(passes.base, config.freeze_params_during_attack):
        for _ in range(config.steps):
            delta.requires_grad_(True)
            attack_loss = passes.ce_sum(passes.perturbed(micro.replay_inputs, delta, mask)) / passes.rows.attack_denom
            if grad_scale is not None:
                attack_loss = attack_loss * grad_scale
            (grad,) = _attack_grad(attack_loss, delta)
            del attack_loss
            if grad_scale is not None:  # unscale in fp32; an overflowed step moves nothing (no host sync)
                grad = grad.float() / grad_scale
                grad = torch.where(torch.isfinite(grad).all(), grad, torch.zeros_like(grad))
            delta = delta.detach()
            step = dict(step=config.step, norm=config.norm, inplace=True, backend=config.backend)
            masked_adv_step(delta, grad, mask, alpha=config.alpha, epsilon=config.epsilon, **step)
    delta = delta.detach()
    stats = attack_telemetry(x0, delta, grad, mask, config) if config.attack_stats else {}
    return delta, mask, stats


def _clean_sample_count(ref_index, batch_size: int):
    """The clean samples of the micro-batch: rows whose ``ref_index`` is themselves (or -1); all rows
    without ``ref_index``. An int for a CPU ``ref_index`` (the collator's), else a 0-dim tensor."""
    if ref_index is None:
        return batch_size
    count = _clean_rows(ref_index, batch_size).sum().clamp_min(1)
    return int(count) if count.device.type == "cpu" else count


def _clean_rows(ref_index, batch_size: int) -> Tensor:
    """Bool ``[B]``: the rows that are clean samples (``ref_index`` themselves, or -1)."""
    device = ref_index.device if isinstance(ref_index, Tensor) else torch.device("cpu")
    ref = _normalize_ref_index(ref_index, batch_size, device)
    return ref == torch.arange(batch_size, device=device)


def count_clean_samples(batches) -> Optional[int]:
    """Clean samples in a list of batches: rows whose ``ref_index`` is themselves (or -1), every row
    of a batch without ``ref_index``; None when a batch has no ``input_ids``."""
    total = 0
    for batch in batches:
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if not isinstance(ids, torch.Tensor):
            return None
        ref = batch.get("ref_index")
        total += ids.shape[0] if ref is None else int(_clean_rows(torch.as_tensor(ref).cpu(), ids.shape[0]).sum())
    return total


def _consistency_weight(passes: _ForwardPasses, micro: _MicroBatch, config: RobustConfig, num_clean_in_batch, device):
    """``lam / divisor``: the clean samples (``num_clean_in_batch`` when given) or the answer tokens."""
    if config.consistency_divisor == "tokens":
        denom = passes.rows.denom
    elif num_clean_in_batch is not None:
        if not isinstance(num_clean_in_batch, Tensor):
            checks.check_num_items(num_clean_in_batch)
        denom = num_clean_in_batch
    else:
        denom = _clean_sample_count(micro.ref_index, micro.input_ids.shape[0])
    weight = config.lam / denom
    return weight.to(device=device, dtype=torch.float32) if isinstance(weight, Tensor) else weight


def _divergence_sum(p: Tensor, q: Tensor, config: RobustConfig, **options) -> Tensor:
    if config.divergence == "kl":
        return fused_kl(p, q, direction=config.kl_direction, reduction="sum", **options)
    return fused_js(p, q, beta=config.beta, reduction="sum", **options)


def _consistency_terms(
    passes: _ForwardPasses, micro: _MicroBatch, clean: _Branch, adv, config: RobustConfig, num_clean
):
    """``(CE_adv, lam * cons / divisor)``: the adversarial CE as a token sum over the answer rows (0
    without an adversarial forward) and the weighted consistency term (None when disabled).

    ``cons`` sums, over the answer rows and the vocabulary, the divergence of each compared row
    (``config.pairs``: the copies' clean rows, every row's adversarial row) from the k-th answer row
    of its clean sample (P, detached). On the chunked path the adversarial CE and divergence come
    from one pass over the logits chunks. On the logits path the weight ``lam / divisor`` is the
    divergence's ``scale``: with ``grad_mode="forward"`` it is folded into the gradients its forward
    writes.
    """
    any_branch = clean.logits if clean.logits is not None else clean.hidden
    adv_weight = 1.0 if passes.plan is None else passes.plan.adv_weight
    ce_adv = any_branch.new_zeros((), dtype=torch.float32) if adv is None else None
    if not config.uses_divergence:
        return (passes.ce_sum(adv) * adv_weight if adv is not None else ce_adv), None
    device = any_branch.device  # the head's (device_map models)
    ref_rows = passes.rows.ref_rows(micro.ref_index)
    ref_rows = None if ref_rows is None else ref_rows.to(device)
    weight = _consistency_weight(passes, micro, config, num_clean, device)
    compare = []  # (branch, row mask, ref_index, weight): the rows compared with their clean sample's
    if config.pairs in ("official", "heuristic") and ref_rows is not None:
        copies = ref_rows != torch.arange(ref_rows.numel(), device=device)
        compare.append((clean, copies, ref_rows, weight))  # the copies' clean rows
    if adv is not None:  # an adversarial forward ran: pairs "official" or "adversarial"
        adv_ref = ref_rows if passes.plan is None else passes.plan.adv_ref_rows(ref_rows, device)
        compare.append((adv, None, adv_ref, weight * adv_weight))
    options = dict(temperature=config.temperature, backend=config.backend)
    terms = []
    if clean.logits is not None:
        p = clean.logits.detach()
        for branch, rows, ref, scale in compare:
            o = dict(options, mask=rows, ref_index=ref, scale=scale, grad_mode=config.divergence_grad_mode)
            terms.append(_divergence_sum(p, branch.logits, config, **o))
        if adv is not None:
            ce_adv = passes.ce_sum(adv) * adv_weight
    else:
        head_weight, bias = passes.head_weights()
        kind = dict(divergence=config.divergence, direction=config.kl_direction, beta=config.beta)
        for branch, rows, ref, scale in compare:
            targets = branch.targets.to(device) if branch is adv else None
            div, ce = linear_losses(
                branch.hidden,
                head_weight,
                bias,
                p_hidden=clean.hidden.detach(),
                targets=targets,
                mask=rows,
                ref_index=ref,
                detach_p_logits=True,
                chunk_size=config.chunk_size,
                **kind,
                **options,
            )
            terms.append(div.sum() * scale)
            if branch is adv:
                ce_adv = ce.sum() * adv_weight
    return ce_adv, (sum(terms[1:], terms[0]) if terms else None)


@torch.no_grad()
def _clean_token_stats(passes: _ForwardPasses, clean: _Branch) -> dict:
    """Over the clean answer rows: the summed entropy of the predicted distribution, the argmax
    hits and the rows (what TRL's ``entropy`` / ``mean_token_accuracy`` average)."""
    if clean.logits is not None:
        pieces = [(clean.logits, clean.targets)]
    else:
        weight, bias = passes.head_weights()
        rows = clean.hidden.shape[0]
        size = passes.config.chunk_size or default_chunk_size(rows, weight.shape[0])
        pieces = ((F.linear(h, weight, bias), t) for h, t in zip(clean.hidden.split(size), clean.targets.split(size)))
    device = (clean.logits if clean.logits is not None else clean.hidden).device
    entropy = torch.zeros((), dtype=torch.float32, device=device)
    correct = torch.zeros((), dtype=torch.float32, device=device)
    for logits, targets in pieces:
        entropy += torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum()
        correct += (logits.argmax(-1) == targets.to(logits.device)).sum()
    return {
        "entropy_sum": entropy,
        "correct": correct,
        "tokens": torch.tensor(float(clean.targets.numel()), device=device),
    }


def _samples_to_run(mask: Tensor, micro: _MicroBatch, config: RobustConfig) -> Tensor:
    """Bool ``[B]``: the samples that the attack and the adversarial forward must run on: those with a
    non-empty modality mask, and the copies whose clean rows the consistency compares (their clean
    logits get a gradient of their own, which the shortcut below cannot split off)."""
    keep = mask.any(1)
    if config.pairs in ("official", "heuristic") and micro.ref_index is not None:
        batch = mask.shape[0]
        ref = _normalize_ref_index(micro.ref_index, batch, mask.device)
        keep = keep | (ref != torch.arange(batch, device=mask.device))
    return keep


def _on_clean_embeddings(x0: Tensor, passes: _ForwardPasses, micro: _MicroBatch, model, config, found: dict):
    """Runs inside the clean forward, on the language model's input ``x0``: the modality mask, and
    with ``skip_unperturbed`` the samples to run the attack on and the gradient scale of ``x0``.

    Why the scale: a skipped sample's adversarial forward would recompute its clean one, with ``x0``
    detached (the official objective sends no adversarial gradient into the encoders or the
    embedding table). Its adversarial CE is taken from the clean pass instead, so the clean graph
    carries that sample's CE twice: right for every parameter after ``x0``, twice too much for
    ``x0``, whose gradient for those samples is halved here. Exact as long as nothing else reaches
    a skipped sample's clean logits with a gradient (the copies, whose clean rows the consistency
    compares, are never skipped)."""
    found["mask"] = mask = _modality_mask(x0.device, micro, model, config)
    if not (config.uses_attack and config.skip_unperturbed and passes.injector.selectable):
        return None
    keep = found["keep"] = _samples_to_run(mask, micro, config)
    return torch.where(keep, 1.0, 0.5).to(torch.float32)


def _whole_batch(delta: Tensor, plan: Optional[_SkipPlan], batch: int) -> Tensor:
    """The plan's samples' perturbation as the whole batch's (zero on the skipped samples)."""
    if plan is None:
        return delta
    full = delta.new_zeros((batch, *delta.shape[1:]))
    return full.index_copy_(0, plan.samples.to(delta.device), delta)


def _check_call(config) -> RobustConfig:
    config = RobustConfig() if config is None else config
    if not isinstance(config, RobustConfig):
        raise TypeError(f"config must be a RobustConfig, got {type(config).__name__}")
    if not torch.is_grad_enabled():
        raise RuntimeError(
            "robust_loss needs autograd (the attack differentiates with respect to the perturbation); "
            "it was called under torch.no_grad() / inference_mode. For evaluation use "
            "modkern.objective.robust.clean_loss."
        )
    return config


def robust_loss(
    model: nn.Module,
    batch: dict,
    config: Optional[RobustConfig] = None,
    num_items_in_batch=None,
    *,
    return_logits: bool = False,
    token_stats: bool = False,
    attack_grad_scale=None,
    num_clean_in_batch=None,
) -> RobustOutput:
    """The robust objective of SPEC §2 on one micro-batch; returns the total loss and its parts.

    Args:
        model: a Hugging Face causal LM or multimodal LM (``LlavaForConditionalGeneration``,
            ``Qwen2VLForConditionalGeneration``, ...), possibly wrapped in DDP, in train mode.
        batch: the model inputs plus ``labels [B, L]`` (-100 = not an answer token; or
            ``shift_labels``, already shifted), and optionally ``sample_kind`` (``B`` names, see
            ``RobustConfig.policy``) and ``ref_index`` (int ``[B]``: each sample's clean sample).
            ``input_ids`` are required (the modality mask is built from them).
        config: a :class:`RobustConfig` (defaults when None).
        num_items_in_batch: total answer tokens of the accumulated batch (Hugging Face's
            ``num_items_in_batch``); the CEs are token sums divided by it. None divides by this
            micro-batch's answer tokens.
        token_stats: compute :attr:`RobustOutput.token_stats` (the clean rows' entropy and argmax
            accuracy, without a gradient; on the chunked path one more pass over the head).
        return_logits: keep the clean logits of the answer rows (``[rows, V]``) in the output
            (answer-row path only: the chunked path never holds them, and returns None).
        attack_grad_scale: a loss scale for the attack's backward (a number or 0-dim tensor > 0),
            e.g. ``scaler.get_scale()`` of the ``GradScaler`` of fp16 training: the attack gradient
            flows through the same fp16 activations as the loss's and underflows just as easily
            (with a ``"raw"`` step delta then stays at its random start). The gradient is unscaled
            in fp32; a step whose scaled gradient overflowed is skipped. None: no scaling (fp32 / bf16).
            The Trainer integration passes its GradScaler's (or DeepSpeed's) current scale.
        num_clean_in_batch: clean samples of the accumulated batch (rows whose ``ref_index`` is
            themselves), the consistency term's divisor under gradient accumulation
            (``consistency_divisor="clean_samples"``); None counts this micro-batch's.

    Returns:
        :class:`RobustOutput`; call ``out.loss.backward()`` once.

    No parameter gradient accumulates before that backward: the attack uses
    ``torch.autograd.grad`` with respect to the perturbation only. No forward computes logits
    outside the answer rows.

    Example::

        >>> model, info = modkern.apps.tiny_models.tiny_llava()
        >>> out = robust_loss(model, batch, RobustConfig(epsilon=1e-3, steps=2, lam=0.01))
        >>> out.loss.backward()
    """
    config = _check_call(config)
    if attack_grad_scale is not None:
        attack_grad_scale = checks.check_positive_number("attack_grad_scale", attack_grad_scale)
    micro = _read_batch(model, batch, config)
    head = find_lm_head(model)
    with _ForwardPasses(model, config, head) as passes:
        passes.rows = _answer_rows(micro.shifted, num_items_in_batch, config, model, head)
        found = {}
        clean = passes.clean(
            micro.inputs, on_x0=lambda x0: _on_clean_embeddings(x0, passes, micro, model, config, found)
        )
        ce_rows_clean = passes.ce_rows(clean)
        clean_stats = _clean_token_stats(passes, clean) if token_stats else {}
        mask = found["mask"]
        passes.plan = _SkipPlan.of(found["keep"], passes.rows) if "keep" in found else None
        delta, adv, stats = None, None, {}
        if config.uses_attack:
            delta, attack_mask, stats = _attack(passes, micro, mask, config, attack_grad_scale)
            adv = passes.perturbed(micro.replay_inputs, delta, attack_mask)
            delta = _whole_batch(delta, passes.plan, mask.shape[0])
        ce_adv, consistency = _consistency_terms(passes, micro, clean, adv, config, num_clean_in_batch)
        if passes.plan is not None:  # the skipped rows' adversarial CE: their clean CE
            skipped = passes.plan.skipped_rows.to(ce_rows_clean.device)
            ce_adv = ce_adv + torch.where(skipped, ce_rows_clean, torch.zeros_like(ce_rows_clean)).sum()
    ce_clean = ce_rows_clean.sum()

    denom = passes.rows.denom
    if consistency is None:  # disabled
        consistency = ce_adv.new_zeros(())
    ce_clean, ce_adv = ce_clean / denom, ce_adv / denom
    return RobustOutput(
        loss=ce_clean + ce_adv + consistency,
        ce_clean=ce_clean.detach(),
        ce_adv=ce_adv.detach(),
        consistency=consistency.detach(),
        logits=clean.logits if return_logits else None,
        delta=delta,
        mask=mask,
        attack=stats,
        token_stats=clean_stats,
    )


def clean_loss(model: nn.Module, batch: dict, num_items_in_batch=None):
    """The plain next-token CE (same normalization as :func:`robust_loss`) and the model output.

    For evaluation: the model's own forward, full logits included (what ``Trainer.prediction_step``
    hands to metrics).
    """
    shifted = _shifted_labels(batch)
    output = model(**prepare_inputs(model, batch))
    logits = get_logits(output)
    shifted = shifted.to(logits.device)
    rows = shifted != IGNORE_INDEX
    answers = logits.reshape(-1, logits.shape[-1])[rows.reshape(-1)]
    return token_ce_rows(answers, shifted[rows]).sum() / _normalizer(num_items_in_batch, rows), output
