"""The thin training loop: plain PyTorch over :func:`modkern.objective.robust.robust_loss`.

AdamW, linear warm-up then cosine / linear decay (or constant), gradient accumulation with exact
normalization (every micro-batch's loss is a token sum divided by the answer tokens of the whole
accumulated batch, as Hugging Face's ``num_items_in_batch``), bf16 autocast on CUDA, gradient
clipping, progress (a tqdm bar on a terminal, plain log lines in a file or pipe), periodic
evaluation and checkpoints.

Example::

    from modkern.objective.robust import RobustConfig
    from modkern.apps.train_loop import TrainConfig, train

    result = train(model, loader, TrainConfig(steps=200, lr=1e-3), robust=RobustConfig(steps=1))
    result.history[-1]  # {"step": 200, "loss": ..., "ce_clean": ..., "ce_adv": ..., ...}

``robust=None`` trains with the plain next-token CE (:func:`modkern.objective.robust.clean_loss`) - the SFT
baseline - on the same batches (heuristic copies included, when the collator makes them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from modkern.apps.progress import Progress
from modkern.objective.robust import (
    IGNORE_INDEX,
    RobustConfig,
    clean_loss,
    count_clean_samples,
    prepare_inputs,
    robust_loss,
    shift_labels,
)

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("auto", "bf16", "fp16", "no")
TRAIN_STATE = "modkern_train.json"
STATE_DICT = "model.pt"


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    ``steps`` optimizer steps of ``grad_accum`` micro-batches each; ``optimizer`` ``"adamw"`` (or
    ``"sgd"``, plain gradient descent - handy to check gradients); ``warmup_steps`` of linear
    warm-up, then ``schedule`` decay to ``min_lr_ratio * lr``; ``mixed_precision`` ``"auto"`` uses
    bf16 autocast on CUDA and fp32 elsewhere, ``"bf16"`` / ``"fp16"`` autocast on any device
    (``"fp16"`` on CUDA adds a dynamic loss scaler for the parameter gradients; the attack's
    gradient w.r.t. the perturbation is not loss-scaled, so prefer bf16), ``"no"`` fp32;
    ``eval_every`` / ``save_every`` in optimizer steps (0: only at the end, when an evaluation
    function / ``save_dir`` is given); ``device`` ``"auto"`` picks CUDA when available; ``progress``
    shows :class:`Progress` on stderr (a bar on a terminal, plain lines otherwise).
    """

    steps: int = 200
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 10
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0
    mixed_precision: str = "auto"
    eval_every: int = 0
    save_every: int = 0
    save_dir: Optional[str] = None
    log_every: int = 1
    progress: bool = True
    seed: Optional[int] = 0
    device: str = "auto"

    def __post_init__(self):
        for name in ("steps", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        self.betas = tuple(self.betas)


@dataclass
class TrainResult:
    """``history``: one dict per logged step (loss parts, lr, seconds); ``evals``: one dict per
    evaluation (``{"step": n, **metrics}``); ``seconds``: wall time of the loop."""

    history: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    seconds: float = 0.0
    checkpoint: Optional[str] = None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step ``s`` (0-based): warm-up, then decay."""
    warm, total, floor = config.warmup_steps, config.steps, config.min_lr_ratio

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warm) / max(1, total - warm))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1.0 - progress
        return floor + (1.0 - floor) * decay

    return f


def resolved_precision(config: TrainConfig, device: torch.device) -> str:
    """``config.mixed_precision`` with ``"auto"`` resolved: ``"bf16"`` on CUDA, else ``"no"``."""
    if config.mixed_precision == "auto":
        return "bf16" if device.type == "cuda" else "no"
    return config.mixed_precision


def autocast_context(config: TrainConfig, device: torch.device):
    """Autocast for the resolved precision (bf16 / fp16, on any device); disabled for ``"no"``."""
    mp = resolved_precision(config, device)
    if mp == "no":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if mp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def count_answer_tokens(batch: dict) -> int:
    """Answer tokens the CE counts (labels shifted by one, as the loss shifts them)."""
    if batch.get("shift_labels") is not None:
        return int((batch["shift_labels"] != IGNORE_INDEX).sum())
    return int((shift_labels(batch["labels"]) != IGNORE_INDEX).sum())


def _cycle(data: Iterable):
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("data yielded no batch")


def train(
    model: nn.Module,
    data: Iterable[dict],
    config: Optional[TrainConfig] = None,
    *,
    robust: Optional[RobustConfig] = None,
    eval_fn: Optional[Callable[[nn.Module], dict]] = None,
    desc: str = "train",
    extra_state: Optional[dict] = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` (an iterable of batches, re-iterated when exhausted).

    Each optimizer step takes ``config.grad_accum`` micro-batches, computes
    :func:`~modkern.objective.robust.robust_loss` (or the plain CE when ``robust`` is None) on each with
    ``num_items_in_batch`` = the answer tokens of all of them, and calls ``backward`` once per
    micro-batch. ``eval_fn(model) -> dict`` runs in ``eval()`` mode under ``torch.no_grad`` every
    ``eval_every`` steps and at the end. Checkpoints (see :func:`save_checkpoint`) go to
    ``config.save_dir`` every ``save_every`` steps and at the end; ``extra_state`` is stored with
    them.
    """
    config = TrainConfig() if config is None else config
    device = resolve_device(config.device)
    if config.seed is not None:
        torch.manual_seed(config.seed)
    model.to(device)
    model.train()
    opt = _Optimization(model, config, device)
    result = TrainResult()
    batches = _cycle(data)
    start = time.perf_counter()
    save = dict(train_config=config, robust=robust, extra=extra_state)
    bar = Progress(config.steps, desc, enabled=config.progress)
    try:
        for step in range(1, config.steps + 1):
            micro = [to_device(next(batches), device) for _ in range(config.grad_accum)]
            totals = _accumulate(model, micro, robust, config, device, opt.scaler)
            grad_norm, lr = opt.step()
            if not math.isfinite(totals["loss"]):
                raise FloatingPointError(f"{desc}: the loss became {totals['loss']} at step {step}")
            if config.log_every and (step % config.log_every == 0 or step == config.steps):
                entry = {"step": step, **totals, "lr": lr, "seconds": time.perf_counter() - start}
                result.history.append(entry if grad_norm is None else {**entry, "grad_norm": grad_norm})
            bar.update(1, loss=totals["loss"])
            if config.eval_every and step % config.eval_every == 0 and step != config.steps:
                _evaluate(model, eval_fn, config, device, step, result)
            if config.save_dir and config.save_every and step % config.save_every == 0 and step != config.steps:
                save_checkpoint(model, config.save_dir, step=step, **save)
    finally:
        bar.close()
    _evaluate(model, eval_fn, config, device, config.steps, result)
    result.seconds = time.perf_counter() - start
    if config.save_dir:
        result.checkpoint = save_checkpoint(model, config.save_dir, step=config.steps, **save)
    return result


class _Optimization:
    """The optimizer, its schedule and the fp16 loss scaler of one run; ``step()`` applies the
    accumulated gradients and returns ``(grad_norm or None, the learning rate used)``."""

    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device):
        self.config = config
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters")
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.params, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(
                self.params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
            )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        # fp16 gradients underflow without loss scaling; a pass-through unless fp16 on CUDA
        fp16 = device.type == "cuda" and resolved_precision(config, device) == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)

    def step(self):
        grad_norm = None
        if self.config.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return grad_norm, lr


def _accumulate(model, micro: list, robust, config: TrainConfig, device, scaler) -> dict:
    """One backward per micro-batch of one optimizer step, every loss normalized by the whole step's
    answer tokens (and clean samples); returns the step's loss, its parts and the attack telemetry
    (a mean over the micro-batches)."""
    num_items = sum(count_answer_tokens(b) for b in micro)
    counts = dict(num_items_in_batch=num_items, num_clean_in_batch=count_clean_samples(micro))
    totals = {"loss": 0.0, "ce_clean": 0.0, "ce_adv": 0.0, "consistency": 0.0}
    for batch in micro:
        with autocast_context(config, device):
            if robust is None:
                loss, _ = clean_loss(model, batch, num_items_in_batch=num_items)
                parts = {"ce_clean": loss.detach()}
            else:
                out = robust_loss(model, batch, robust, **counts, return_logits=False)
                loss, parts = out.loss, out.parts()
                for k, v in out.attack.items():
                    totals[k] = totals.get(k, 0.0) + float(v) / len(micro)
        scaler.scale(loss).backward()
        totals["loss"] += float(loss.detach())
        for k, v in parts.items():
            totals[k] += float(v)
    return totals


def _evaluate(model, eval_fn, config: TrainConfig, device, step: int, result: TrainResult):
    """``eval_fn(model)`` in eval mode under no_grad, recorded in ``result.evals``."""
    if eval_fn is None:
        return
    model.eval()
    try:
        with torch.no_grad(), autocast_context(config, device):
            metrics = eval_fn(model)
    finally:
        model.train()
    result.evals.append({"step": step, **metrics})


# --- checkpoints -------------------------------------------------------------------------------


def jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


@contextlib.contextmanager
def _no_hf_progress_bars():
    """No "Writing model shards" / "Loading weights" bars from transformers in the middle of a run."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_checkpoint(model: nn.Module, path, *, step=None, train_config=None, robust=None, extra=None) -> str:
    """Write the weights and the configs to directory ``path``; returns it.

    Hugging Face models: ``save_pretrained`` (``config.json`` + ``model.safetensors``, loadable with
    ``from_pretrained`` or :func:`load_checkpoint`); other modules: ``model.pt`` (the state dict).
    Always ``modkern_train.json``: the step, the train / robust configs and ``extra``.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        with _no_hf_progress_bars():
            model.save_pretrained(path)
    else:
        torch.save(model.state_dict(), os.path.join(path, STATE_DICT))
    state = {
        "step": step,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "train_config": jsonable(train_config),
        "robust_config": jsonable(robust),
        "extra": jsonable(extra or {}),
    }
    with open(os.path.join(path, TRAIN_STATE), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)
    return path


def load_checkpoint(path, model: Optional[nn.Module] = None, map_location="cpu") -> nn.Module:
    """Load a checkpoint written by :func:`save_checkpoint`.

    With ``model``: its weights are replaced (strictly) by the saved ones. Without: a Hugging Face
    checkpoint is rebuilt from its ``config.json`` (the class named in ``architectures``).
    """
    path = os.fspath(path)
    state_file = os.path.join(path, STATE_DICT)
    if model is not None and os.path.exists(state_file):
        model.load_state_dict(torch.load(state_file, map_location=map_location, weights_only=True))
        return model
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: neither a Hugging Face checkpoint (config.json) nor {STATE_DICT}")
    import transformers

    if model is not None:
        with _no_hf_progress_bars():
            loaded = type(model).from_pretrained(path)
        model.load_state_dict(loaded.state_dict())
        return model
    config = transformers.AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise ValueError(f"{path}: config.json names no known transformers architecture ({archs})")
    with _no_hf_progress_bars():
        return cls.from_pretrained(path)


# --- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def answer_correct(model: nn.Module, batch: dict) -> Tensor:
    """Per-sample bool ``[B]``: every answer token is the argmax of its (teacher-forced) logits."""
    inputs = prepare_inputs(model, {k: v for k, v in batch.items() if k != "tags"})
    logits = model(**inputs).logits
    target = shift_labels(batch["labels"]).to(logits.device)
    rows = target != IGNORE_INDEX
    hit = (logits.argmax(-1) == target) | ~rows
    return hit.all(dim=1) & rows.any(dim=1)
