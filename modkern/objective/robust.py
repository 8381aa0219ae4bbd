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

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modkern import checks
from modkern.constants import IGNORE_INDEX
from modkern.objective.config import (  # noqa: F401 (re-exported: the settings are part of the objective's API)
    ATTACK_NORMALIZATIONS,
    CONSISTENCY_DIVISORS,
    DIVERGENCES,
    INITS,
    LM_HEAD_MODES,
    PAIRS,
    PRESETS,
    SAMPLE_KINDS,
    Policy,
    RobustConfig,
)
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
from modkern.objective.passes import (  # noqa: F401 (row_ref_index, shift_labels: re-exported)
    Branch,
    ForwardPasses,
    MicroBatch,
    SkipPlan,
    answer_rows,
    attack_grad,
    normalize_ref_index,
    normalizer,
    read_batch,
    row_ref_index,
    shift_labels,
    shifted_labels,
)
from modkern.ops.adv_step import masked_adv_step
from modkern.ops.divergence import fused_js, fused_kl
from modkern.ops.linear_divergence import default_chunk_size, linear_losses, token_ce_rows
from modkern.ops.perturb.delta_init import init_delta
from modkern.ops.perturb.mask import modality_mask


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
# The objective: clean pass, attack, adversarial pass, consistency


def _modality_mask(device, micro: MicroBatch, model: nn.Module, config: RobustConfig) -> Tensor:
    return modality_mask(
        micro.input_ids.to(device),
        perturb=micro.policy,
        token_ids=config.token_ids if config.token_ids is not None else infer_token_ids(model),
        labels=micro.labels.to(device),
        attention_mask=None if micro.attention_mask is None else micro.attention_mask.to(device),
        exclude_ids=config.exclude_ids if config.exclude_ids is not None else infer_exclude_ids(model),
    )


def _attack(passes: ForwardPasses, micro: MicroBatch, mask: Tensor, config: RobustConfig, grad_scale=None):
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
            (grad,) = attack_grad(attack_loss, delta)
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
    ref = normalize_ref_index(ref_index, batch_size, device)
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


def _consistency_weight(passes: ForwardPasses, micro: MicroBatch, config: RobustConfig, num_clean_in_batch, device):
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


def _consistency_terms(passes: ForwardPasses, micro: MicroBatch, clean: Branch, adv, config: RobustConfig, num_clean):
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
def _clean_token_stats(passes: ForwardPasses, clean: Branch) -> dict:
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


def _samples_to_run(mask: Tensor, micro: MicroBatch, config: RobustConfig) -> Tensor:
    """Bool ``[B]``: the samples that the attack and the adversarial forward must run on: those with a
    non-empty modality mask, and the copies whose clean rows the consistency compares (their clean
    logits get a gradient of their own, which the shortcut below cannot split off)."""
    keep = mask.any(1)
    if config.pairs in ("official", "heuristic") and micro.ref_index is not None:
        batch = mask.shape[0]
        ref = normalize_ref_index(micro.ref_index, batch, mask.device)
        keep = keep | (ref != torch.arange(batch, device=mask.device))
    return keep


def _on_clean_embeddings(x0: Tensor, passes: ForwardPasses, micro: MicroBatch, model, config, found: dict):
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


def _whole_batch(delta: Tensor, plan: Optional[SkipPlan], batch: int) -> Tensor:
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
    micro = read_batch(model, batch, config)
    head = find_lm_head(model)
    with ForwardPasses(model, config, head) as passes:
        passes.rows = answer_rows(micro.shifted, num_items_in_batch, config, model, head)
        found = {}
        clean = passes.clean(
            micro.inputs, on_x0=lambda x0: _on_clean_embeddings(x0, passes, micro, model, config, found)
        )
        ce_rows_clean = passes.ce_rows(clean)
        clean_stats = _clean_token_stats(passes, clean) if token_stats else {}
        mask = found["mask"]
        passes.plan = SkipPlan.of(found["keep"], passes.rows) if "keep" in found else None
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
    shifted = shifted_labels(batch)
    output = model(**prepare_inputs(model, batch))
    logits = get_logits(output)
    shifted = shifted.to(logits.device)
    rows = shifted != IGNORE_INDEX
    answers = logits.reshape(-1, logits.shape[-1])[rows.reshape(-1)]
    return token_ce_rows(answers, shifted[rows]).sum() / normalizer(num_items_in_batch, rows), output
