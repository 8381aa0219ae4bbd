"""A test-only eager port of the official objective (luisrui/Modality-Interference-in-MLLMs,
``LLaVA_unified.py``: ``LLaVAForKLConsistencyPGDPerturbation`` + ``LLaVA_ad_attacks.py``), written
from its structure for the equivalence tests of :func:`modkern.objective.robust.robust_loss`.

The official structure, per micro-batch of clean samples (rows whose ``ref_index`` is themselves)
and heuristic copies: one clean forward of every row (full logits); a PGD attack on the merged input
embeddings (``noise = noise + alpha * grad`` of the mean CE over all rows with the model frozen, then
an elementwise clamp to [-eps, eps]); one adversarial forward of ``x0.detach() + noise * mask``;
``loss = CE_clean(mean over all rows) + CE_adv(mean over all rows) + lam * cons`` with, for each clean
sample i, ``F.kl_div(log_softmax(P_i).detach(), softmax(Q), reduction="batchmean")`` summed over the
copies' clean rows, i's adversarial row and the copies' adversarial rows (a sum over rows, answer
tokens and vocabulary), divided by the number of clean samples.

modkern's documented departures are applied here too, so that the two must agree: the answer rows
are shifted (the logit at t - 1 predicts the answer token at t; the official code reads the
unshifted positions), Q has no 1e-6 floor, the mask leaves out padding and the vision markers, and
``init="zero"`` replaces the random start (the tests compare deterministic runs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modkern.objective.robust import shift_labels
from modkern.ops.perturb.mask import modality_mask

POLICY = {"image_heavy": "text", "text_heavy": "image", "vqa": "none"}


def _language_model(model):
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


def _clean_forward(model, batch):
    """The model's own forward (full logits) and the language model's call (args, kwargs)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["kwargs"] = dict(kwargs)
        seen["args"] = args

    handle = _language_model(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_kind", "ref_index")}
        logits = model(**inputs).logits
    finally:
        handle.remove()
    return logits, seen["kwargs"]


def _replay(model, lm_kwargs, embeds):
    kwargs = dict(lm_kwargs, inputs_embeds=embeds)
    kwargs.pop("input_ids", None)
    hidden = _language_model(model)(**kwargs)[0]
    return model.lm_head(hidden)


def _ce_sum(logits, shifted):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1), reduction="sum")


def official_loss(
    model, batch, *, alpha, epsilon, steps, lam, token_ids, exclude_ids=(), ce_denom=None, clean_denom=None
):
    """The official objective's total loss on ``batch`` (``ce_denom`` / ``clean_denom`` override the
    micro-batch's answer-token / clean-sample counts, for gradient accumulation)."""
    labels = batch["labels"]
    shifted = shift_labels(labels)
    rows = shifted != -100
    n_tokens = int(rows.sum())
    ref = batch["ref_index"] if "ref_index" in batch else torch.arange(labels.shape[0])
    clean_ids = [i for i in range(len(ref)) if int(ref[i]) == i]
    ce_denom = n_tokens if ce_denom is None else ce_denom
    clean_denom = len(clean_ids) if clean_denom is None else clean_denom

    clean_logits, lm_kwargs = _clean_forward(model, batch)
    x0 = lm_kwargs["inputs_embeds"]
    mask = modality_mask(
        batch["input_ids"],
        perturb=[POLICY[k] for k in batch["sample_kind"]],
        token_ids=token_ids,
        labels=labels,
        attention_mask=batch.get("attention_mask"),
        exclude_ids=exclude_ids,
    )
    m = mask.unsqueeze(-1).to(x0.dtype)

    # The attack: the parameters frozen, the raw gradient of the micro-batch mean CE.
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    noise = torch.zeros_like(x0)
    try:
        for _ in range(steps):
            noise.requires_grad_(True)
            attack = _ce_sum(_replay(model, lm_kwargs, x0.detach() + noise * m), shifted) / n_tokens
            attack.backward()
            noise = torch.clamp(noise.detach() + alpha * noise.grad, -epsilon, epsilon)
    finally:
        for p in params:
            p.requires_grad_(True)
    adv_logits = _replay(model, lm_kwargs, x0.detach() + noise.detach() * m)

    ce = (_ce_sum(clean_logits, shifted) + _ce_sum(adv_logits, shifted)) / ce_denom
    cons = clean_logits.new_zeros((), dtype=torch.float32)
    for i in clean_ids:
        copies = [j for j in range(len(ref)) if int(ref[j]) == i and j != i]
        p_log = F.log_softmax(clean_logits[i][rows[i]].float(), -1).detach().unsqueeze(0)
        q = torch.stack(
            [clean_logits[j][rows[j]] for j in copies] + [adv_logits[j][rows[j]] for j in [i, *copies]]
        ).float()
        cons = cons + F.kl_div(p_log, F.softmax(q, -1), reduction="batchmean")
    return ce + lam * cons / clean_denom
