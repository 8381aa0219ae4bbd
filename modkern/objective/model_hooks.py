"""Model plumbing of the robust objective: where the perturbation enters and where the logits leave.

- :func:`find_language_model`: the module that receives the merged ``inputs_embeds`` (the decoder
  of a causal LM, ``model.model.language_model`` of transformers 5 LLaVA / Qwen2-VL).
- :class:`EmbeddingInjector`: a forward pre-hook there that records the clean call and replays it
  with ``inputs_embeds = perturb(x0, delta, M)`` (vision / audio encoders run once).
- :class:`AnswerRowHead`: a forward pre-hook on the LM head (``get_output_embeddings()``) that hands
  it only the answer rows of the final hidden states, so every forward computes ``[rows, V]``
  logits instead of ``[B, L, V]``, while the head stays a module call (DDP, FSDP2 and DeepSpeed
  ZeRO-3 gather its parameters as usual).
- :func:`prepare_inputs`, :class:`FrozenParams`, :func:`get_logits`: small helpers.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from modkern.ops.perturb import perturb

# Batch keys the robust objective consumes itself (never passed to the model).
CONSUMED_KEYS = ("labels", "shift_labels", "sample_kind", "ref_index")
# Config attributes of models whose forward transforms the LM head's output (the chunked path,
# which computes logits from the head's weight itself, cannot reproduce that).
LOGIT_POSTPROCESSING_ATTRS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "output_multiplier_scale",
)
# Config attribute of models whose forward keeps only the first ``unpadded_vocab_size`` logits of a
# padded LM head (the chunked path would compute the softmax over the padding rows too).
UNPADDED_VOCAB_ATTR = "unpadded_vocab_size"


def is_deepspeed_engine(model) -> bool:
    """Whether ``model`` is a ``deepspeed.DeepSpeedEngine`` (without importing deepspeed)."""
    deepspeed = sys.modules.get("deepspeed")
    engine = getattr(deepspeed, "DeepSpeedEngine", None)
    return isinstance(engine, type) and isinstance(model, engine)


def wrapper_forward_context(model):
    """What a wrapper's forward runs its module under, for the forwards that bypass the wrapper: a
    DeepSpeed engine's ``autocast_if_enabled`` (its ``torch_autocast`` setting, which also switches an
    outer autocast off when the engine does not use it); nothing for DDP and FSDP2."""
    if is_deepspeed_engine(model):
        from deepspeed.runtime.torch_autocast import autocast_if_enabled

        return autocast_if_enabled(model)
    return contextlib.nullcontext()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under a ``DistributedDataParallel`` wrapper or a DeepSpeed engine (the attack forwards
    bypass the wrapper; FSDP2 and ZeRO-3 shard in place, so their hooks still gather the parameters).
    """
    while isinstance(model, DistributedDataParallel) or is_deepspeed_engine(model):
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


def _batch_dim(name: str, value: Tensor) -> Optional[int]:
    """The batch dimension of a language-model argument that a replay on some samples may select
    (None: the tensor has none, as ``cache_position``). Raises KeyError for an argument whose layout
    is not known: the replay then runs on the whole batch."""
    if name == "cache_position":
        return None
    if name == "position_ids":
        return 1 if value.dim() == 3 else 0  # M-RoPE: [sections, B, L]
    if name in ("inputs_embeds", "attention_mask", "input_ids"):
        return 0
    raise KeyError(name)


class _SampleGradScale(torch.autograd.Function):
    """Identity forward; the backward multiplies each sample's gradient by ``scale[b]``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1))), None


class EmbeddingInjector:
    """Forward pre-hook on the language model: records the clean call, replays it perturbed.

    Use as a context manager (the hook is removed on exit, also on exceptions). While
    ``set_perturbation`` has not been called, a call passes through and its arguments are
    recorded (``input_ids`` are embedded first when the module got no ``inputs_embeds``, as a plain
    causal LM's decoder does); ``on_clean(x0)``, when set, may return a per-sample gradient scale
    ``[B]`` for the clean call's embeddings (the values pass unchanged). Afterwards every call is
    replaced by the recorded one (tensors detached) with ``inputs_embeds = perturb(x0.detach(),
    delta, mask)``, on the samples ``samples`` of the batch only when they are given (every
    argument's batch dimension selected; :attr:`selectable` says whether the recorded call allows it).
    """

    def __init__(self, language_model: nn.Module, backend: str = "auto"):
        self.module = language_model
        self.backend = backend
        self.handle = None
        self.captured: Optional[dict] = None
        self.calls = 0
        self.on_clean: Optional[Callable[[Tensor], Optional[Tensor]]] = None
        self._delta = None
        self._mask = None
        self._samples: Optional[Tensor] = None
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
        self._delta = self._mask = self._samples = None

    # state ----------------------------------------------------------------------------------
    @property
    def x0(self) -> Tensor:
        if self.captured is None:
            raise RuntimeError("the language model was not called during the clean forward")
        return self.captured["inputs_embeds"]

    @property
    def selectable(self) -> bool:
        """Whether the recorded call can be replayed on some of its samples (every tensor argument
        of a known layout)."""
        try:
            for name, value in self.captured.items():
                if isinstance(value, Tensor):
                    _batch_dim(name, value)
        except KeyError:
            return False
        return True

    def set_perturbation(self, delta: Tensor, mask: Tensor, samples: Optional[Tensor] = None):
        """Replay with ``delta`` / ``mask`` (``[b, L, ...]``), on the batch's samples ``samples [b]``
        (all of them when None)."""
        self._delta, self._mask, self._samples = delta, mask, samples
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
        self.calls += 1
        kwargs = self._as_kwargs(module, args, kwargs)
        if self._delta is None:
            return (), self._record(module, kwargs)
        replay = {k: (self._select(k, v.detach()) if isinstance(v, Tensor) else v) for k, v in self.captured.items()}
        replay["inputs_embeds"] = perturb(replay["inputs_embeds"], self._delta, self._mask, backend=self.backend)
        if "input_ids" in replay:
            replay["input_ids"] = None
        return (), replay

    def _record(self, module, kwargs) -> dict:
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
        scale = self.on_clean(kwargs["inputs_embeds"]) if self.on_clean is not None else None
        if scale is None:
            return kwargs
        return dict(kwargs, inputs_embeds=_SampleGradScale.apply(kwargs["inputs_embeds"], scale))

    def _select(self, name: str, value: Tensor) -> Tensor:
        if self._samples is None:
            return value
        dim = _batch_dim(name, value)
        return value if dim is None else value.index_select(dim, self._samples.to(value.device))


def get_logits(output) -> Tensor:
    """The ``logits`` of a model output (attribute or dict key); a clear error when there are none."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None:
        raise RuntimeError(
            "the model's forward returned no logits. modkern's robust objective needs the logits of the clean and "
            "perturbed branches at the answer rows; a patched forward that fuses the LM head into the loss (Liger's "
            "fused linear cross entropy, e.g. use_liger_kernel=True / apply_liger_kernel_to_*(fused_linear_"
            "cross_entropy=True), or TRL's fused LM head) returns none. Disable that fusion for this model."
        )
    return logits


def prepare_inputs(model: nn.Module, batch: dict) -> dict:
    """The model inputs of a batch: the objective's own keys dropped, ``mm_token_type_ids`` built when
    M-RoPE needs it, ``use_cache=False``."""
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


def _fsdp2_params(module: nn.Module) -> list:
    """The ``FSDPParam`` records of the FSDP2 (``fully_shard``) units in ``module`` (empty otherwise).

    An FSDP2 parameter is two tensors: the sharded DTensor and the unsharded parameter that the
    module holds between an all-gather and the next reshard; ``module.parameters()`` returns
    whichever is in place. FSDP2 copies ``requires_grad`` from the sharded one to the unsharded one
    at each all-gather, so a freeze must set both (a unit that stays gathered, like the root
    after its forward, would otherwise be frozen for one attack step only).
    """
    if "torch.distributed.fsdp" not in sys.modules:
        return []
    records = []
    for sub in module.modules():
        get_state = getattr(sub, "_get_fsdp_state", None)
        if get_state is None:
            continue
        for group in _param_groups(get_state()):
            records.extend(group.fsdp_params)
    return records


def _param_groups(state) -> list:
    groups = getattr(state, "_fsdp_param_groups", None)  # newer torch: several groups per module
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


class FrozenParams:
    """Temporarily ``requires_grad_(False)`` on the trainable parameters; restored on exit.

    Also correct for FSDP2 units (both the sharded and the gathered tensor of each parameter) and
    for ZeRO-3 (the partitioned parameter is the module's own parameter object).
    """

    def __init__(self, module: nn.Module, enabled: bool):
        self.params = [p for p in module.parameters() if p.requires_grad] if enabled else []
        self.fsdp = [f for f in _fsdp2_params(module) if f.sharded_param.requires_grad] if enabled else []

    def _set(self, flag: bool):
        for p in self.params:
            p.requires_grad_(flag)
        for record in self.fsdp:
            record.sharded_param.requires_grad_(flag)
            gathered = getattr(record, "_unsharded_param", None)
            if gathered is not None:
                gathered.requires_grad_(flag)

    def __enter__(self):
        self._set(False)
        return self

    def __exit__(self, *exc):
        self._set(True)
        return False


def find_lm_head(model: nn.Module) -> nn.Module:
    """The LM head module (``get_output_embeddings()``) of a causal (multimodal) LM."""
    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        raise ValueError(
            f"{type(base).__name__} has no LM head (get_output_embeddings() returned {type(head).__name__}); the "
            "robust objective computes the head on the answer rows and needs it"
        )
    return head


def vocab_size(head: nn.Module) -> int:
    """Output size of the LM head (also for a DeepSpeed ZeRO-3 partitioned weight)."""
    weight = getattr(head, "weight", None)
    shape = getattr(weight, "ds_shape", None) or (None if weight is None else weight.shape)
    if shape is not None and len(shape) == 2:
        return int(shape[0])
    out = getattr(head, "out_features", None)
    if isinstance(out, int):
        return out
    raise ValueError(f"cannot tell the vocabulary size of the LM head {type(head).__name__}")


def linear_head_weights(model: nn.Module, head: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    """``(weight, bias)`` of a plain linear LM head, for the chunked fused-linear path.

    That path multiplies the answer rows' hidden states by the weight itself (chunk by chunk), so
    the weight must be a whole local tensor and the model must not transform the logits after the
    head. Anything else gets a clear error naming the way out (the answer-row path).
    """
    way_out = "use RobustConfig(lm_head='rows') (the answer rows' logits in one piece, through the head module)"
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the chunked LM-head path needs an nn.Linear head, got {type(head).__name__}; {way_out}")
    weight = head.weight
    if hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor" or getattr(weight, "_is_sharded", False):
        raise ValueError(
            "the LM head's weight is sharded outside its forward (DeepSpeed ZeRO-3 or an FSDP2 unit of its own), "
            f"so the chunked LM-head path cannot read it; {way_out}"
        )
    config = getattr(unwrap_model(model), "config", None)
    configs = [config, getattr(config, "text_config", None)]
    for attr in LOGIT_POSTPROCESSING_ATTRS:
        if any(getattr(c, attr, None) not in (None, 1, 1.0) for c in configs if c is not None):
            raise ValueError(f"the model transforms its logits after the LM head ({attr}); {way_out}")
    vocab = vocab_size(head)
    if any(getattr(c, UNPADDED_VOCAB_ATTR, None) not in (None, vocab) for c in configs if c is not None):
        raise ValueError(
            f"the model keeps only the first {UNPADDED_VOCAB_ATTR} of the LM head's {vocab} logits; {way_out}"
        )
    return weight, head.bias


class AnswerRowHead:
    """Forward pre-hook on the LM head: the head runs on the answer rows only.

    The decoder's final hidden states ``[B, L, H]`` reach the head; the hook replaces them by the
    rows ``index`` of their flat ``[B * L, H]`` view, so the head computes ``[n, V]`` logits and
    the model returns those as its ``logits``. The head is still called as a module, once per
    forward, on every rank (also with ``n = 0``), so DDP / FSDP2 / ZeRO-3 hooks run as usual.

    With ``keep_hidden`` the hook keeps the gathered rows (with their autograd graph) in
    :attr:`hidden` and hands the head an empty ``[0, H]`` batch: the chunked fused-linear path
    then computes the rows' logits from the head's weight chunk by chunk.

    Use as a context manager (the hook is removed on exit, also on exceptions); call
    :meth:`expect` before each forward and :meth:`logits` / :attr:`hidden` after it.
    """

    def __init__(self, head: nn.Module):
        self.module = head
        self.handle = None
        self.index: Optional[Tensor] = None
        self.tokens = 0
        self.keep_hidden = False
        self.hidden: Optional[Tensor] = None
        self.calls = 0

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.index = self.hidden = None
        return False

    def expect(self, index: Tensor, tokens: int, keep_hidden: bool = False):
        """The next forward's answer rows: flat indices ``index [n]`` into its ``tokens = B * L`` positions."""
        self.index, self.tokens, self.keep_hidden = index, tokens, keep_hidden
        self.hidden = None
        self.calls = 0

    def _hook(self, module, args, kwargs):
        self.calls += 1
        if self.index is None:
            return None
        if self.calls > 1:
            raise RuntimeError(
                "the LM head was called more than once in one forward; modkern computes it on the answer rows and "
                "needs exactly one call with the final hidden states"
            )
        if args:
            hidden, args = args[0], args[1:]
        else:
            name = next(iter(kwargs))
            hidden = kwargs.pop(name)
        if not isinstance(hidden, Tensor) or hidden.dim() < 2 or hidden.shape[:-1].numel() != self.tokens:
            shape = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise RuntimeError(
                f"the LM head received hidden states of shape {shape}, expected one row per input token "
                f"({self.tokens} = B * L); modkern computes the head on the answer rows of the final hidden states"
            )
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.index.to(hidden.device))
        if self.keep_hidden:
            self.hidden, rows = rows, rows[:0]
        return (rows, *args), kwargs

    def _check_called(self):
        if self.calls == 0:
            raise RuntimeError(
                "the model's forward did not call its LM head (get_output_embeddings()): a patched forward that "
                "fuses the head into the loss (Liger's fused linear cross entropy, e.g. use_liger_kernel=True / "
                "apply_liger_kernel_to_*(fused_linear_cross_entropy=True), or TRL's fused LM head) bypasses it. "
                "Disable that fusion for this model; modkern computes the head on the answer rows itself."
            )

    def logits(self, output) -> Tensor:
        """The answer rows' logits ``[n, V]`` of the forward that returned ``output``."""
        self._check_called()
        logits = get_logits(output)
        n = self.index.numel()
        if logits.dim() != 2 or logits.shape[0] != n:
            raise RuntimeError(
                f"the model returned logits of shape {tuple(logits.shape)} although its LM head ran on {n} answer "
                "rows; its forward reshapes the head's output, which modkern's answer-row head does not support"
            )
        return logits

    def rows_hidden(self) -> Tensor:
        """The answer rows' final hidden states ``[n, H]`` (``keep_hidden`` forwards)."""
        self._check_called()
        return self.hidden
