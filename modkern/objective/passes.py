"""The robust objective's forwards: what it reads from a batch (:class:`MicroBatch`), its answer rows
(:class:`AnswerRows`), the samples the attack runs on (:class:`SkipPlan`) and the clean / perturbed
forwards with both hooks (:class:`ForwardPasses`: the perturbation in, the answer rows out)."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modkern import checks
from modkern._reduction import mean_divisor
from modkern.constants import IGNORE_INDEX
from modkern.objective.config import SAMPLE_KINDS, Policy, RobustConfig
from modkern.objective.model_hooks import (
    AnswerRowHead,
    EmbeddingInjector,
    find_language_model,
    infer_token_ids,
    linear_head_weights,
    prepare_inputs,
    unwrap_model,
    vocab_size,
    wrapper_forward_context,
)
from modkern.ops.linear_divergence import linear_losses, token_ce_rows

# ----------------------------------------------------------------------------------------------
# Batch parsing


def shift_labels(labels: Tensor) -> Tensor:
    """``labels[:, 1:]`` padded with -100 at the end: row t of the logits predicts token t + 1."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def shifted_labels(batch: dict) -> Tensor:
    if batch.get("shift_labels") is not None:
        return batch["shift_labels"]
    if batch.get("labels") is not None:
        return shift_labels(batch["labels"])
    raise ValueError("batch must contain 'labels' (or 'shift_labels'): the objective is a next-token CE")


@dataclass
class MicroBatch:
    """What the objective reads from one batch."""

    input_ids: Tensor
    labels: Tensor  # [B, L], unshifted (-100 = not an answer token)
    shifted: Tensor  # [B, L]: the target of logit row t
    policy: Policy
    inputs: dict  # the clean forward's model inputs
    replay_inputs: dict  # the attack / adversarial forwards' inputs (encoder inputs dropped)
    ref_index: Any
    attention_mask: Optional[Tensor]


def read_batch(model: nn.Module, batch: dict, config: RobustConfig) -> MicroBatch:
    if not isinstance(batch, dict):
        raise TypeError(f"batch must be a dict of model inputs, got {type(batch).__name__}")
    input_ids = batch.get("input_ids")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError("batch['input_ids'] must be a [B, L] tensor (the modality mask is built from it)")
    shifted = shifted_labels(batch)
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
    return MicroBatch(
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


def attack_grad(loss: Tensor, delta: Tensor):
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


def normalize_ref_index(ref_index, batch_size: int, device) -> Tensor:
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


def normalizer(num_items_in_batch, rows: Tensor):
    """What every token sum is divided by: ``num_items_in_batch``, else this micro-batch's answer tokens."""
    if num_items_in_batch is not None and not isinstance(num_items_in_batch, Tensor):
        checks.check_num_items(num_items_in_batch)
    return mean_divisor(num_items_in_batch, rows, rows.numel(), rows.device, torch.float32)


# ----------------------------------------------------------------------------------------------
# The answer rows and the forwards that compute them


@dataclass
class AnswerRows:
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
        full = row_ref_index(self.mask, normalize_ref_index(ref_index, self.mask.shape[0], device))[self.index]
        position = torch.zeros(self.tokens, dtype=torch.long, device=device)
        position[self.index] = torch.arange(self.index.numel(), device=device)
        return torch.where(full >= 0, position[full.clamp_min(0)], full)  # -1 stays: a NaN loss


def answer_rows(shifted: Tensor, num_items_in_batch, config: RobustConfig, model, head: nn.Module) -> AnswerRows:
    mask = shifted != IGNORE_INDEX
    flat = shifted.reshape(-1)
    index = mask.reshape(-1).nonzero().squeeze(1)
    denom = normalizer(num_items_in_batch, mask)
    attack_denom = denom if config.attack_normalization == "num_items" else normalizer(None, mask)
    chunked = _use_chunked_head(config, index.numel(), model, head)
    return AnswerRows(mask, index, flat.index_select(0, index), denom, attack_denom, chunked)


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
class Branch:
    """One forward's answer rows: ``logits [n, V]`` (answer-row path) or ``hidden [n, H]`` (chunked),
    and their ``targets [n]``."""

    targets: Tensor
    logits: Optional[Tensor] = None
    hidden: Optional[Tensor] = None


@dataclass
class SkipPlan:
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
    def of(keep: Tensor, rows: AnswerRows) -> SkipPlan:
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
        return SkipPlan(
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


class ForwardPasses(contextlib.ExitStack):
    """The objective's forwards, with both hooks: the perturbation in, the answer rows out."""

    def __init__(self, model: nn.Module, config: RobustConfig, head: nn.Module):
        super().__init__()
        self.model, self.base, self.config = model, unwrap_model(model), config
        self.injector = EmbeddingInjector(find_language_model(model, config.language_model), backend=config.backend)
        self.head = AnswerRowHead(head)
        self.rows: Optional[AnswerRows] = None
        self.plan: Optional[SkipPlan] = None

    def __enter__(self):
        super().__enter__()
        self.enter_context(self.injector)
        self.enter_context(self.head)
        return self

    def _run(self, module: nn.Module, inputs: dict, index: Tensor, tokens: int, targets: Tensor) -> Branch:
        self.head.expect(index, tokens, keep_hidden=self.rows.chunked)
        output = module(**inputs)
        if self.rows.chunked:
            return Branch(targets, hidden=self.head.rows_hidden())
        return Branch(targets, logits=self.head.logits(output))

    def clean(self, inputs: dict, on_x0=None) -> Branch:
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

    def perturbed(self, inputs: dict, delta: Tensor, mask: Tensor) -> Branch:
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

    def ce_rows(self, branch: Branch) -> Tensor:
        """Next-token CE of each answer row of ``branch``, in fp32 (fp64 for a fp64 model)."""
        if branch.logits is not None:
            return token_ce_rows(branch.logits, branch.targets.to(branch.logits.device))
        weight, bias = self.head_weights()
        targets = branch.targets.to(branch.hidden.device)
        return linear_losses(branch.hidden, weight, bias, targets=targets, **self._chunking())[1]

    def ce_sum(self, branch: Branch) -> Tensor:
        """Token-sum next-token CE of the answer rows of ``branch``."""
        return self.ce_rows(branch).sum()

    def _chunking(self) -> dict:
        return dict(chunk_size=self.config.chunk_size, backend=self.config.backend)
