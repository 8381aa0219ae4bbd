"""The modality-robust training objective (SPEC §2), for any Hugging Face causal (multimodal) LM.

Per micro-batch, with ``x0`` the merged input embeddings the language model receives (text
embeddings with the image / video / audio features already in their slots) and ``M`` the modality
mask of each sample::

    logits_c = f(x0)                              CE_c = CE(logits_c, labels)   (shifted)
    delta    = init_delta(x0, M, eps)
    K times: g = d CE(f(perturb(x0, delta, M))) / d delta        (autograd.grad, delta only)
             delta = masked_adv_step(delta, g, M, alpha, eps)
    logits_a = f(perturb(x0.detach(), delta, M))  CE_a = CE(logits_a, labels)
    L = CE_c + CE_a + lam * D(logits_c.detach()[rows], logits_a[rows])   D = fused_kl / fused_js

``rows`` are the answer positions shifted like the CE (the logit at t-1 predicts the token at t).
Heuristic copies of a sample (misleading text, swapped image, ...) are ordinary rows of the batch;
``batch["ref_index"][b]`` names the clean sample of row b (itself for clean samples, or -1) and the
divergence compares the k-th answer row of the copy with the k-th answer row of its clean sample.
``batch["sample_kind"][b]`` (``"image_heavy"``, ``"text_heavy"``, ``"vqa"`` or any key of
``RobustConfig.policy``) picks what the attack perturbs for that sample.

How the perturbation reaches the model: a forward pre-hook on the language model (the module
that receives ``inputs_embeds`` from the multimodal wrapper, ``model.model.language_model`` in
transformers 5 LLaVA / Qwen2-VL; the decoder itself for text-only LMs) records the clean call's
arguments and replays them with ``inputs_embeds = perturb(x0.detach(), delta, M)`` on the attack and
adversarial forwards. ``input_ids`` stay in the wrapper's call, so placeholder merging and M-RoPE work
as usual; with ``reuse_encoder_outputs`` the vision / audio encoder inputs are dropped from those
forwards (their features are already in ``x0``), so the encoders run once per micro-batch. The hook
is removed in a ``finally``, also when a forward raises.

Normalization: every term is a token sum divided by ``num_items_in_batch`` when given (Hugging Face
passes the number of answer tokens of the whole accumulated batch), else by the micro-batch's
answer-token count, so gradient accumulation is exact. The attack ascends the same normalized CE by
default (``attack_normalization="num_items"``: the perturbation of a sample does not depend on how
the batch was split into micro-batches). With a ``"raw"`` step that makes the step alpha * g smaller
by the number of micro-batches (and of ranks, with ``average_tokens_across_devices``) than in the
official code, whose attack ascends the micro-batch mean CE; ``attack_normalization="micro_batch"``
does that instead (the loss that is back-propagated keeps the ``num_items_in_batch`` normalization).
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modkern import _validation as V
from modkern._reduction import mean_divisor
from modkern.backend import check_backend
from modkern.ops.adv_step import NORMS, STEPS
from modkern.ops.divergence import DIRECTIONS, fused_js, fused_kl

IGNORE_INDEX = -100
SAMPLE_KINDS = ("image_heavy", "text_heavy", "vqa")
DIVERGENCES = ("kl", "js", "none")
INITS = ("random", "zero")
ATTACK_NORMALIZATIONS = ("num_items", "micro_batch")
# Batch keys robust_loss consumes itself (never passed to the model).
CONSUMED_KEYS = ("labels", "shift_labels", "sample_kind", "ref_index")

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
    """Hyper-parameters of the robust objective (defaults: the paper's LLaVA-1.5 setting).

    Attributes:
        epsilon: radius of the perturbation ball (1e-3 for LLaVA-1.5 / Qwen2.5-VL-7B, 0.01 for
            Qwen-3B, 0.05 for InstructBLIP).
        alpha: PGD step size (0.1).
        steps: attack steps K >= 0 (1-4, 2 typical; 0 keeps the random start).
        lam: weight of the consistency term (0.01 LLaVA, 0.001 Qwen); 0 disables it.
        divergence: ``"kl"`` (``fused_kl``, clean branch P detached), ``"js"`` (``fused_js``) or
            ``"none"``.
        kl_direction: ``"forward"`` KL(clean || adv), ``"reverse"`` or ``"symmetric"``.
        beta: JS mixture weight in (0, 1).
        temperature: softmax temperature of the divergence.
        step: PGD direction, ``"raw"`` (the paper's), ``"sign"``, ``"l2"``, ``"l2_token"``, ``"linf"``.
        norm: projection, ``"linf"`` (the paper's), ``"l2"``, ``"l2_token"`` or None.
        init: ``"random"`` (``init_delta`` in the ``norm`` ball) or ``"zero"``.
        attack_normalization: what the attack's CE sum is divided by: ``"num_items"`` (the
            ``num_items_in_batch`` of the loss, so the perturbation is independent of the
            micro-batch split) or ``"micro_batch"`` (this micro-batch's answer tokens, as the
            official code's micro-batch mean; a larger raw step when accumulating). The two agree
            without gradient accumulation, and for the scale-free ``sign`` / ``l2`` / ``linf`` steps.
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
    """

    epsilon: float = 1e-3
    alpha: float = 0.1
    steps: int = 2
    lam: float = 0.01
    divergence: str = "kl"
    kl_direction: str = "forward"
    beta: float = 0.5
    temperature: float = 1.0
    step: str = "raw"
    norm: Optional[str] = "linf"
    init: str = "random"
    attack_normalization: str = "num_items"
    policy: dict = field(default_factory=_default_policy)
    default_perturb: Policy = "text"
    token_ids: Optional[dict] = None
    exclude_ids: Optional[tuple] = None
    backend: str = "auto"
    freeze_params_during_attack: bool = True
    reuse_encoder_outputs: bool = True
    encoder_input_keys: tuple = ("pixel_values", "pixel_values_videos", "input_features")
    language_model: Any = None

    def __post_init__(self):
        self.epsilon = V.check_positive_number("epsilon", self.epsilon, allow_tensor=False)
        self.alpha = V.check_positive_number("alpha", self.alpha, allow_tensor=False)
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
        V.check_choice("divergence", self.divergence, DIVERGENCES)
        V.check_choice("kl_direction", self.kl_direction, DIRECTIONS)
        self.beta = V.check_open_unit_interval("beta", self.beta)
        self.temperature = V.check_positive_number("temperature", self.temperature, allow_tensor=False)
        V.check_choice("step", self.step, STEPS)
        V.check_choice("norm", self.norm, NORMS)
        V.check_choice("init", self.init, INITS)
        V.check_choice("attack_normalization", self.attack_normalization, ATTACK_NORMALIZATIONS)
        if not isinstance(self.policy, dict):
            raise TypeError(f"policy must be a dict sample kind -> target, got {type(self.policy).__name__}")
        self.policy = {str(k): _check_target(f"policy[{k!r}]", v) for k, v in self.policy.items()}
        self.default_perturb = _check_target("default_perturb", self.default_perturb)
        if self.token_ids is not None and not isinstance(self.token_ids, dict):
            raise TypeError(f"token_ids must be a dict modality -> id(s) or None, got {type(self.token_ids).__name__}")
        if self.exclude_ids is not None:
            self.exclude_ids = tuple(int(i) for i in self.exclude_ids)
        self.backend = check_backend(self.backend)
        for name in ("freeze_params_during_attack", "reuse_encoder_outputs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        self.encoder_input_keys = tuple(self.encoder_input_keys)

    def replace(self, **changes) -> RobustConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def uses_divergence(self) -> bool:
        return self.divergence != "none" and self.lam > 0


@dataclass
class RobustOutput:
    """``loss`` (differentiable total) and its detached parts.

    ``ce_clean``, ``ce_adv`` and ``consistency`` (already multiplied by ``lam``; 0 when disabled) are
    normalized like ``loss``: ``loss == ce_clean + ce_adv + consistency``. ``logits`` are the clean
    logits ``[B, L, V]``; ``delta`` the final perturbation and ``mask`` the modality mask ``[B, L]``.
    """

    loss: Tensor
    ce_clean: Tensor
    ce_adv: Tensor
    consistency: Tensor
    logits: Optional[Tensor] = None
    delta: Optional[Tensor] = None
    mask: Optional[Tensor] = None

    def parts(self) -> dict:
        return {"ce_clean": self.ce_clean, "ce_adv": self.ce_adv, "consistency": self.consistency}


# ----------------------------------------------------------------------------------------------
# Model plumbing


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under a ``DistributedDataParallel`` wrapper (the attack forwards bypass DDP)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    if isinstance(model, DataParallel):
        raise NotImplementedError(
            "modkern's robust objective does not support torch.nn.DataParallel; use one process per GPU "
            "(torchrun / accelerate launch, i.e. DistributedDataParallel)"
        )
    return model


def find_language_model(model: nn.Module, spec=None) -> nn.Module:
    """The module that receives the merged ``inputs_embeds`` (see ``RobustConfig.language_model``)."""
    base = unwrap_model(model)
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        mod = base
        for part in spec.split("."):
            if not hasattr(mod, part):
                raise ValueError(f"language_model={spec!r}: the model has no attribute path {spec!r}")
            mod = getattr(mod, part)
        if not isinstance(mod, nn.Module):
            raise TypeError(f"language_model={spec!r} is a {type(mod).__name__}, not an nn.Module")
        return mod
    if spec is not None:
        raise TypeError(f"language_model must be None, a module or a dotted path, got {type(spec).__name__}")
    if hasattr(base, "get_base_model"):  # PEFT
        base = base.get_base_model()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if isinstance(decoder, nn.Module) and decoder is not base:
        return decoder
    inner = getattr(base, "model", None)
    for candidate in (getattr(inner, "language_model", None), getattr(base, "language_model", None), inner):
        if isinstance(candidate, nn.Module):
            return candidate
    raise ValueError(
        f"could not find the language model of {type(base).__name__}; pass RobustConfig(language_model=...) "
        "with the module (or attribute path) that receives inputs_embeds"
    )


def infer_token_ids(model: nn.Module) -> dict:
    """``{modality: placeholder id}`` read from the model config (``image_token_id`` etc.)."""
    config = getattr(unwrap_model(model), "config", None)
    out = {}
    for name in ("image", "video", "audio"):
        for attr in (f"{name}_token_id", f"{name}_token_index"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                out[name] = value
                break
    return out


MARKER_ATTRS = ("vision_start_token_id", "vision_end_token_id", "audio_start_token_id", "audio_end_token_id")


def infer_exclude_ids(model: nn.Module) -> tuple:
    """Modality start / end marker ids from the model config (Qwen-VL's ``<|vision_start|>`` etc.)."""
    config = getattr(unwrap_model(model), "config", None)
    ids = (getattr(config, attr, None) for attr in MARKER_ATTRS)
    return tuple(i for i in ids if isinstance(i, int) and not isinstance(i, bool))


class EmbeddingInjector:
    """Forward pre-hook on the language model: records the clean call, replays it perturbed.

    Use as a context manager (the hook is removed on exit, also on exceptions). While
    ``set_perturbation`` has not been called, a call passes through and its arguments are
    recorded (``input_ids`` are embedded first when the module got no ``inputs_embeds``, as a plain
    causal LM's decoder does). Afterwards every call is replaced by the recorded one (tensors
    detached) with ``inputs_embeds = perturb(x0.detach(), delta, mask)``.
    """

    def __init__(self, language_model: nn.Module, backend: str = "auto"):
        self.module = language_model
        self.backend = backend
        self.handle = None
        self.captured: Optional[dict] = None
        self.calls = 0
        self._delta = None
        self._mask = None
        self._signature = None

    # context manager ------------------------------------------------------------------------
    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def remove(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.captured = None
        self._delta = self._mask = None

    # state ----------------------------------------------------------------------------------
    @property
    def x0(self) -> Tensor:
        if self.captured is None:
            raise RuntimeError("the language model was not called during the clean forward")
        return self.captured["inputs_embeds"]

    def set_perturbation(self, delta: Tensor, mask: Tensor):
        self._delta, self._mask = delta, mask
        self.calls = 0

    # hook -----------------------------------------------------------------------------------
    def _as_kwargs(self, module, args, kwargs):
        if not args:
            return dict(kwargs)
        if self._signature is None:
            self._signature = inspect.signature(module.forward)
        bound = self._signature.bind_partial(*args, **kwargs)
        out = dict(bound.arguments)
        for name, param in self._signature.parameters.items():  # flatten **kwargs
            if param.kind == inspect.Parameter.VAR_KEYWORD and name in out:
                out.update(out.pop(name))
        return out

    def _hook(self, module, args, kwargs):
        from modkern import perturb

        self.calls += 1
        kwargs = self._as_kwargs(module, args, kwargs)
        if self._delta is None:
            if self.calls > 1:
                raise RuntimeError(
                    "the language model was called more than once in one forward; modkern's embedding hook "
                    "needs exactly one call (pass RobustConfig(language_model=...) to pick another module)"
                )
            if kwargs.get("inputs_embeds") is None:
                input_ids = kwargs.get("input_ids")
                if input_ids is None:
                    raise RuntimeError("the language model received neither inputs_embeds nor input_ids")
                kwargs["inputs_embeds"] = module.get_input_embeddings()(input_ids)
                kwargs["input_ids"] = None
            self.captured = kwargs
            return (), kwargs
        replay = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in self.captured.items()}
        replay["inputs_embeds"] = perturb(replay["inputs_embeds"], self._delta, self._mask, backend=self.backend)
        if "input_ids" in replay:
            replay["input_ids"] = None
        return (), replay


def _as_selector(target) -> Union[str, tuple]:
    # modality_mask: a str or a tuple (union) selects per batch; a list is per sample.
    return target if isinstance(target, str) else tuple(target)


def _sample_policies(kinds, batch_size: int, config: RobustConfig) -> Policy:
    """Per-sample perturbation targets from ``sample_kind`` (one value when they all agree)."""
    if kinds is None:
        return _as_selector(config.default_perturb)
    if isinstance(kinds, Tensor):
        if kinds.dtype.is_floating_point or kinds.dim() != 1:
            raise ValueError("sample_kind as a tensor must hold 1-D integer codes into modkern.robust.SAMPLE_KINDS")
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


def shift_labels(labels: Tensor) -> Tensor:
    """``labels[:, 1:]`` padded with -100 at the end: row t of the logits predicts token t + 1."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


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


def _answer_rows(shifted: Tensor) -> tuple[Tensor, Tensor]:
    """Flat indices of the answer rows of ``shifted [B, L]`` and their target ids.

    One host sync (``nonzero``) per micro-batch, shared by every CE of the objective.
    """
    flat = shifted.reshape(-1)
    index = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    return index, flat.index_select(0, index)


def _ce_sum(logits: Tensor, answers: tuple[Tensor, Tensor]) -> Tensor:
    """Token-sum next-token CE over the answer rows, in fp32.

    Only the answer rows are gathered and upcast: the fp32 temporaries (and the log-softmax saved
    for backward) are ``[answer tokens, V]`` instead of ``[B * L, V]`` - at V = 152064 and
    18 x 1000 tokens that is 11 GB per CE for the full upcast, a small fraction of it here. The
    value equals ``F.cross_entropy(logits.float(), shifted, ignore_index=-100, reduction="sum")``.
    """
    index, targets = answers
    rows = logits.reshape(-1, logits.shape[-1]).index_select(0, index)
    return F.cross_entropy(rows.float(), targets, reduction="sum")


def row_ref_index(rows: Tensor, ref_index: Tensor) -> Tensor:
    """Row-level reference map for ``fused_kl`` / ``fused_js`` over ``[B * L, V]`` logits.

    ``rows [B, L]`` marks the answer rows of each sample; ``ref_index [B]`` the clean sample of each
    sample. The k-th answer row of sample b maps to the k-th answer row of sample ``ref_index[b]``
    (copies may have prompts of other lengths). Computed on the device without host syncs; on CPU
    the answer counts of each copy and its reference are checked to agree.
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
    else:
        torch._assert_async(same.all(), "a copy's answer length differs from its ref_index sample's")
    ref_pos = pos[ref].gather(1, rank.clamp_min(0))
    return (ref.unsqueeze(1) * length + ref_pos).reshape(-1)


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
        V.check_num_items(num_items_in_batch)
    return mean_divisor(num_items_in_batch, rows, rows.numel(), rows.device, torch.float32)


def _get_logits(output) -> Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None:
        raise RuntimeError(
            "the model's forward returned no logits. modkern's robust objective needs the full logits of the "
            "clean and perturbed branches; a patched forward that fuses the LM head into the loss (Liger's "
            "fused linear cross entropy, e.g. use_liger_kernel=True / apply_liger_kernel_to_*(fused_linear_"
            "cross_entropy=True), or TRL's fused LM head) returns none. Disable that fusion for this model."
        )
    return logits


def _prepare_inputs(model: nn.Module, batch: dict) -> dict:
    inputs = {k: v for k, v in batch.items() if k not in CONSUMED_KEYS}
    base = unwrap_model(model)
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        params = {}
    # Qwen2-VL style M-RoPE needs mm_token_type_ids; build it from input_ids when the collator did not.
    if (
        "mm_token_type_ids" in params
        and inputs.get("mm_token_type_ids") is None
        and (inputs.get("image_grid_thw") is not None or inputs.get("video_grid_thw") is not None)
        and inputs.get("input_ids") is not None
    ):
        ids = inputs["input_ids"]
        token_ids = infer_token_ids(base)
        types = torch.zeros_like(ids, dtype=torch.int32)
        for code, name in ((1, "image"), (2, "video")):
            if name in token_ids:
                types = types.masked_fill(ids == token_ids[name], code)
        inputs["mm_token_type_ids"] = types
    if "use_cache" in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        inputs.setdefault("use_cache", False)
    return inputs


class _FrozenParams:
    """Temporarily ``requires_grad_(False)`` on the trainable parameters; restored on exit."""

    def __init__(self, module: nn.Module, enabled: bool):
        self.params = [p for p in module.parameters() if p.requires_grad] if enabled else []

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)
        return False


# ----------------------------------------------------------------------------------------------
# The objective


def robust_loss(
    model: nn.Module,
    batch: dict,
    config: Optional[RobustConfig] = None,
    num_items_in_batch=None,
    *,
    return_logits: bool = True,
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
            ``num_items_in_batch``); every term is a token sum divided by it. None divides by this
            micro-batch's answer tokens.
        return_logits: keep the clean logits in the output.

    Returns:
        :class:`RobustOutput`; call ``out.loss.backward()`` once.

    No parameter gradient accumulates before that backward: the attack uses
    ``torch.autograd.grad`` with respect to the perturbation only.

    Example::

        >>> model, info = modkern.tiny.tiny_llava()
        >>> out = robust_loss(model, batch, RobustConfig(epsilon=1e-3, steps=2, lam=0.01))
        >>> out.loss.backward()
    """
    from modkern import init_delta, masked_adv_step, modality_mask

    config = RobustConfig() if config is None else config
    if not isinstance(config, RobustConfig):
        raise TypeError(f"config must be a RobustConfig, got {type(config).__name__}")
    if not torch.is_grad_enabled():
        raise RuntimeError(
            "robust_loss needs autograd (the attack differentiates with respect to the perturbation); "
            "it was called under torch.no_grad() / inference_mode. For evaluation use modkern.robust.clean_loss."
        )
    if not isinstance(batch, dict):
        raise TypeError(f"batch must be a dict of model inputs, got {type(batch).__name__}")
    input_ids = batch.get("input_ids")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError("batch['input_ids'] must be a [B, L] tensor (the modality mask is built from it)")
    if batch.get("shift_labels") is not None:
        shifted = batch["shift_labels"]
        labels = F.pad(shifted[:, :-1], (1, 0), value=IGNORE_INDEX)
    elif batch.get("labels") is not None:
        labels = batch["labels"]
        shifted = shift_labels(labels)
    else:
        raise ValueError("batch must contain 'labels' (or 'shift_labels'): the objective is a next-token CE")
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")

    base = unwrap_model(model)
    lm = find_language_model(model, config.language_model)
    token_ids = config.token_ids if config.token_ids is not None else infer_token_ids(base)
    exclude_ids = config.exclude_ids if config.exclude_ids is not None else infer_exclude_ids(base)
    batch_size = input_ids.shape[0]
    policy = _sample_policies(batch.get("sample_kind"), batch_size, config)
    _check_targets(policy, token_ids)
    inputs = _prepare_inputs(model, batch)
    replay_inputs = dict(inputs)
    if config.reuse_encoder_outputs:
        for key in config.encoder_input_keys:
            replay_inputs.pop(key, None)

    with EmbeddingInjector(lm, backend=config.backend) as injector:
        # clean branch (through the DDP wrapper when there is one: its graph covers every parameter)
        logits_c = _get_logits(model(**inputs))
        x0 = injector.x0
        if tuple(x0.shape[:2]) != tuple(input_ids.shape):
            raise RuntimeError(
                f"the language model received embeddings of shape {tuple(x0.shape)} but input_ids has shape "
                f"{tuple(input_ids.shape)}; modkern needs one embedding per input_id (expanded placeholders)"
            )
        device = logits_c.device
        shifted = shifted.to(device)
        rows = shifted != IGNORE_INDEX
        answers = _answer_rows(shifted)
        denom = _normalizer(num_items_in_batch, rows)
        ce_clean = _ce_sum(logits_c, answers) / denom

        attention_mask = batch.get("attention_mask")
        mask = modality_mask(
            input_ids.to(x0.device),
            perturb=policy,
            token_ids=token_ids,
            labels=labels.to(x0.device),
            attention_mask=None if attention_mask is None else attention_mask.to(x0.device),
            exclude_ids=exclude_ids,
        )
        init_norm = "zero" if config.init == "zero" else ("linf" if config.norm in ("linf", None) else "l2")
        delta = init_delta(x0, mask, epsilon=config.epsilon, norm=init_norm, dtype=torch.float32)

        # attack: gradient w.r.t. delta only
        attack_denom = denom if config.attack_normalization == "num_items" else _normalizer(None, rows)
        if config.steps and bool(mask.any()):
            with _FrozenParams(base, config.freeze_params_during_attack):
                for _ in range(config.steps):
                    delta.requires_grad_(True)
                    injector.set_perturbation(delta, mask)
                    attack_logits = _get_logits(base(**replay_inputs))
                    attack_loss = _ce_sum(attack_logits, answers) / attack_denom
                    (grad,) = _attack_grad(attack_loss, delta)
                    del attack_logits, attack_loss
                    delta = delta.detach()
                    masked_adv_step(
                        delta,
                        grad,
                        mask,
                        alpha=config.alpha,
                        epsilon=config.epsilon,
                        step=config.step,
                        norm=config.norm,
                        inplace=True,
                        backend=config.backend,
                    )

        # adversarial branch
        delta = delta.detach()
        injector.set_perturbation(delta, mask)
        logits_a = _get_logits(base(**replay_inputs))
        ce_adv = _ce_sum(logits_a, answers) / denom

    if config.uses_divergence:
        vocab = logits_a.shape[-1]
        ref = batch.get("ref_index")
        row_ref = None
        if ref is not None:
            row_ref = row_ref_index(rows, _normalize_ref_index(ref, batch_size, device))
        p = logits_c.detach().reshape(-1, vocab)
        q = logits_a.reshape(-1, vocab)
        common = dict(
            temperature=config.temperature,
            mask=rows.reshape(-1),
            ref_index=row_ref,
            reduction="sum",
            backend=config.backend,
        )
        if config.divergence == "kl":
            div = fused_kl(p, q, direction=config.kl_direction, **common)
        else:
            div = fused_js(p, q, beta=config.beta, **common)
        consistency = config.lam * div / denom
    else:
        consistency = logits_a.new_zeros((), dtype=torch.float32)

    loss = ce_clean + ce_adv + consistency
    return RobustOutput(
        loss=loss,
        ce_clean=ce_clean.detach(),
        ce_adv=ce_adv.detach(),
        consistency=consistency.detach(),
        logits=logits_c if return_logits else None,
        delta=delta,
        mask=mask,
    )


def clean_loss(model: nn.Module, batch: dict, num_items_in_batch=None):
    """The plain next-token CE (same normalization as :func:`robust_loss`) and the model output."""
    if batch.get("shift_labels") is not None:
        shifted = batch["shift_labels"]
    elif batch.get("labels") is not None:
        shifted = shift_labels(batch["labels"])
    else:
        raise ValueError("batch must contain 'labels' (or 'shift_labels')")
    output = model(**_prepare_inputs(model, batch))
    logits = _get_logits(output)
    shifted = shifted.to(logits.device)
    rows = shifted != IGNORE_INDEX
    return _ce_sum(logits, _answer_rows(shifted)) / _normalizer(num_items_in_batch, rows), output
