"""Hugging Face ``Trainer`` drop-in for the robust objective (:mod:`modkern.objective.robust`).

Three ways in, all equivalent::

    from modkern.integrations.hf import RobustTrainerMixin, make_robust_trainer, patch_trainer
    from modkern.objective.robust import RobustConfig

    class MyTrainer(RobustTrainerMixin, Trainer): ...           # 1. mixin (first in the bases)
    trainer = MyTrainer(model=model, args=args, ..., robust_config=RobustConfig(lam=0.01))

    RobustSFT = make_robust_trainer(trl.SFTTrainer)             # 2. composes with TRL-style subclasses
    trainer = RobustSFT(model=model, args=args, ..., robust_config=cfg)

    trainer = patch_trainer(Trainer(model=model, args=args, ...), cfg)   # 3. an existing instance

What changes: ``compute_loss`` runs :func:`modkern.objective.robust.robust_loss` on each training micro-batch
(clean CE + adversarial CE + lam * divergence) and returns the total; the Trainer's own
``training_step`` does the one backward per micro-batch (so DeepSpeed, FSDP, DDP and gradient
accumulation see a normal step). The CEs are normalized by the Trainer's ``num_items_in_batch``
(answer tokens of the whole accumulated batch, summed over processes when
``average_tokens_across_devices``) and the consistency term by the clean samples of the same
accumulated batch (counted where the Trainer counts its items, ``get_batch_samples``), so gradient
accumulation is exact. Evaluation (no grad / eval mode) computes the plain CE. ``ce_clean``,
``ce_adv`` and ``consistency`` are logged next to ``loss`` (averaged over the optimizer steps since
the last log, and over processes; ``loss`` = their sum, about twice an SFT loss), and so is the
attack's telemetry (:data:`modkern.objective.robust.ATTACK_STATS`, averaged over micro-batches). The batch may
carry ``sample_kind`` and ``ref_index`` (see :mod:`modkern.objective.augment`'s collator); they are kept
when the Trainer removes unused dataset columns and never reach the model.
"""

from __future__ import annotations

from typing import Optional

import torch

from modkern.objective.model_hooks import is_deepspeed_engine
from modkern.objective.robust import CONSUMED_KEYS, RobustConfig, clean_loss, count_clean_samples, robust_loss

PART_NAMES = ("ce_clean", "ce_adv", "consistency")
_CLASS_CACHE: dict = {}


class RobustTrainerMixin:
    """Put before a ``transformers.Trainer`` (sub)class in the bases; adds ``robust_config=`` to
    ``__init__`` (default :class:`RobustConfig()`)."""

    robust_config: Optional[RobustConfig] = None

    def __init__(self, *args, robust_config: Optional[RobustConfig] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._robust_setup(robust_config if robust_config is not None else type(self).robust_config)

    # setup ----------------------------------------------------------------------------------
    def _robust_setup(self, config: Optional[RobustConfig]):
        config = RobustConfig() if config is None else config
        if not isinstance(config, RobustConfig):
            raise TypeError(
                f"robust_config must be a modkern.objective.robust.RobustConfig, got {type(config).__name__}"
            )
        self.robust_config = config
        # The robust loss is a token sum over num_items_in_batch: make the Trainer count the items
        # (for every model, whatever its forward signature) on the shifted labels, and treat the
        # loss as already scaled for gradient accumulation whenever it gets the count.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._robust_parts = None
        self._robust_log_steps = None
        self._robust_num_clean = None
        # TRL's SFTTrainer logs the clean predictions' entropy, token accuracy and the tokens seen from
        # its own compute_loss, which the robust one replaces: computed here instead, same names.
        self._robust_trl_metrics = _is_trl_sft_trainer(type(self))
        self._robust_token_metrics = {"entropy": [], "mean_token_accuracy": []}
        self._robust_num_tokens = 0
        if getattr(self, "_signature_columns", None) is not None:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *CONSUMED_KEYS]))

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *CONSUMED_KEYS]))

    # loss -----------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's micro-batches of one optimizer step; also counts their clean samples (rows
        whose ``ref_index`` is themselves, every row without one), the consistency term's divisor,
        summed over processes like ``num_items_in_batch`` (None when the Trainer counts no items: then
        every term is divided by the micro-batch's own counts)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        count = None if num_items_in_batch is None else count_clean_samples(batch_samples)
        if count is not None:
            count = torch.tensor(count, device=device)
            if getattr(self.args, "average_tokens_across_devices", False) and self.args.world_size > 1:
                count = self.accelerator.gather(count).sum()
        self._robust_num_clean = count
        return batch_samples, num_items_in_batch

    def _robust_loss_scale(self, num_items_in_batch) -> float:
        """The Trainer's factor for a loss normalized by a count summed over processes."""
        if num_items_in_batch is None or not getattr(self.args, "average_tokens_across_devices", False):
            return 1.0
        if self.args.n_gpu > 1:
            return float(self.args.n_gpu)
        tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
        return float(self.accelerator.num_processes // tp)

    def _robust_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Mirrors Trainer.training_step: when False it divides the returned loss by the GA steps.
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return num_items_in_batch is not None or getattr(self, "compute_loss_func", None) is not None

    def _robust_attack_grad_scale(self, model):
        """The current loss scale of fp16 training (accelerate's GradScaler, or DeepSpeed's fp16 loss
        scaler) for the attack's backward, so that its gradient does not underflow; None otherwise.

        A GradScaler's scale lives on the device: it is handed on as a 0-dim tensor (a copy, since
        the scaler updates its own in place), not read with ``get_scale()`` (an ``.item()``, a host
        sync per micro-batch); before the scaler's first step it is the initial scale (a number)."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            get_async = getattr(scaler, "_get_scale_async", None)
            if get_async is not None:
                scale = get_async()
                if isinstance(scale, torch.Tensor):
                    return scale.detach().clone().reshape(())
                init = getattr(scaler, "_init_scale", None)
                if scale is None and isinstance(init, (int, float)) and not isinstance(init, bool):
                    return float(init)
            return float(scaler.get_scale())  # a scaler of another make
        if is_deepspeed_engine(model) and model.fp16_enabled():
            scale = getattr(model.optimizer, "loss_scale", None)
            if isinstance(scale, (int, float)) and scale > 0:
                return float(scale)
        return None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Like the stock compute_loss: a loss normalized by a token count summed over processes is
        # multiplied back by the number of processes (DDP averages the gradients), also in eval.
        scale = self._robust_loss_scale(num_items_in_batch)
        training = model.training and torch.is_grad_enabled()
        if training:
            out = robust_loss(
                model,
                inputs,
                self.robust_config,
                num_items_in_batch=num_items_in_batch,
                attack_grad_scale=self._robust_attack_grad_scale(model),
                # the step's count only with the step's items (a direct call gets the micro-batch's own)
                num_clean_in_batch=self._robust_num_clean if num_items_in_batch is not None else None,
                token_stats=self._robust_trl_metrics,
            )
            loss = out.loss
            report = scale
            micro_batches = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            if not self._robust_scaled_for_ga(num_items_in_batch):
                report /= micro_batches
            self._robust_accumulate(out.parts(), report)
            self._robust_accumulate(out.attack, 1.0 / micro_batches)  # a mean over the micro-batches
            if self._robust_trl_metrics:
                self._robust_token_step(out.token_stats, inputs)
        else:
            loss, outputs = clean_loss(model, inputs, num_items_in_batch)
        if scale != 1.0:
            loss = loss * scale
        if training:
            outputs = {"loss": loss}  # no [B, L, V] logits exist in a robust training step
        return (loss, outputs) if return_outputs else loss

    # logging --------------------------------------------------------------------------------
    # The parts are summed per optimizer step and logged next to "loss", averaged over the steps
    # since the last log. That count is read where the Trainer computes its own (it resets its
    # counter before calling log), so resumed runs and repeated train() calls stay exact.
    def train(self, *args, **kwargs):
        self._robust_parts = None  # a previous run's unlogged tail
        return super().train(*args, **kwargs)

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        self._robust_log_steps = self.state.global_step - self._globalstep_last_logged
        try:
            return super()._maybe_log_save_evaluate(*args, **kwargs)
        finally:
            self._robust_log_steps = None

    def _robust_accumulate(self, parts: dict, factor: float):
        if self._robust_parts is None:
            self._robust_parts = {}
        for k, v in parts.items():
            total = self._robust_parts.setdefault(k, torch.zeros((), dtype=torch.float32, device=v.device))
            total += v.detach().float() * factor

    def _robust_token_step(self, stats: dict, inputs: dict):
        """TRL's per-micro-batch metrics (summed over processes): the mean entropy and argmax
        accuracy of the clean answer rows, and the tokens seen so far (attention-mask sum)."""
        gather = self.accelerator.gather_for_metrics
        tokens = gather(stats["tokens"].reshape(1)).sum()
        for name, key in (("entropy", "entropy_sum"), ("mean_token_accuracy", "correct")):
            total = gather(stats[key].reshape(1)).sum()
            self._robust_token_metrics[name].append(float(total / tokens) if float(tokens) > 0 else 0.0)
        mask = inputs.get("attention_mask")
        if mask is not None:
            self._robust_num_tokens += int(gather(mask.sum().reshape(1)).sum())

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs and self._robust_trl_metrics and self._robust_token_metrics["entropy"]:
            for name, values in self._robust_token_metrics.items():
                logs[name] = sum(values) / len(values)
                values.clear()
            logs["num_tokens"] = self._robust_num_tokens
        steps = self._robust_log_steps
        if "loss" in logs and self._robust_parts is not None and steps is not None and steps > 0:
            names = list(self._robust_parts)
            values = torch.stack([self._robust_parts[k] for k in names])
            if self.args.world_size > 1:  # every rank logs here (like the Trainer's loss gather)
                values = self.accelerator.gather(values.unsqueeze(0)).mean(0)
            for k, v in zip(names, values.tolist()):
                logs[k] = v / steps
            self._robust_parts = None
        return super().log(logs, *args, **kwargs)


def _is_trl_sft_trainer(cls: type) -> bool:
    """Whether ``cls`` derives from TRL's ``SFTTrainer`` (without importing TRL)."""
    return any(c.__name__ == "SFTTrainer" and c.__module__.split(".")[0] == "trl" for c in cls.__mro__)


def make_robust_trainer(trainer_class: type, config: Optional[RobustConfig] = None) -> type:
    """A subclass ``(RobustTrainerMixin, trainer_class)``, e.g. of ``Trainer`` or ``trl.SFTTrainer``.

    ``config`` becomes the class default of ``robust_config`` (an instance's ``robust_config=``
    argument overrides it). Without ``config`` the class is cached per ``trainer_class``.
    """
    if not isinstance(trainer_class, type) or not hasattr(trainer_class, "compute_loss"):
        raise TypeError(f"trainer_class must be a transformers.Trainer subclass, got {trainer_class!r}")
    if issubclass(trainer_class, RobustTrainerMixin):
        if config is None:
            return trainer_class
        return type(trainer_class.__name__, (trainer_class,), {"robust_config": config})
    if config is None and trainer_class in _CLASS_CACHE:
        return _CLASS_CACHE[trainer_class]
    cls = type(
        f"Robust{trainer_class.__name__}",
        (RobustTrainerMixin, trainer_class),
        {"robust_config": config, "__module__": __name__, "__doc__": trainer_class.__doc__},
    )
    if config is None:
        _CLASS_CACHE[trainer_class] = cls
    return cls


def patch_trainer(trainer, config: Optional[RobustConfig] = None):
    """Turn an existing ``transformers.Trainer`` instance into the robust one (in place; returned).

    Swaps the instance's class for ``make_robust_trainer(type(trainer))``; ``config`` defaults to
    :class:`RobustConfig()`. Patching an already robust trainer only replaces its config.
    """
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        raise TypeError(f"patch_trainer needs a transformers.Trainer instance, got {type(trainer).__name__}")
    if not isinstance(trainer, RobustTrainerMixin):
        trainer.__class__ = make_robust_trainer(type(trainer))
    trainer._robust_setup(config)
    return trainer
