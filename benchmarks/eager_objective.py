"""The robust training objective written the way the official code writes it: the eager baseline.

Same objective as ``modkern.objective.robust`` (SPEC §2), for a causal LM that takes ``inputs_embeds``::

    L = CE(clean) + CE(adv) + lam / B * sum_rows KL(Q_adv || P_clean.detach())   over shifted answer rows

with ``adv = embeds + delta * M`` after ``steps`` PGD updates (raw gradient, Linf clamp) from a
U(-eps, eps) start. The *style* follows the public repository of the paper
(luisrui/Modality-Interference-in-MLLMs, ``modules/models/LLaVA_ad_attacks.py`` and
``LLaVA_unified.py``), re-written here, not copied:

- the modality mask is built by a Python loop over samples (``generate_modality_mask``);
- during the attack the parameters are frozen by a Python loop over them, and the attack
  gradient comes from ``loss.backward()`` on a leaf ``delta`` in the model dtype;
- the perturbation is applied as ``(embeds + delta * mask.float()).to(dtype)``;
- the clean and adversarial inputs go through one concatenated forward (batch 2B);
- the cross entropies use shifted ``.contiguous()`` copies of the full logits, selected by the
  attention mask (boolean indexing: more copies);
- the consistency term loops over samples, copies each sample's answer rows out with
  ``masked_select``, takes the full-vocabulary ``log_softmax`` of both branches in fp32, sums
  ``F.kl_div(log P.detach(), Q)`` (KL(Q||P)) over the rows and divides by the number of samples.
  (The batches here have no heuristic copies, so the copies' clean pairs do not arise.)

Two deliberate differences from the official code, so that both sides compute the same number:
answer rows are the *shifted* positions (the official code compares unshifted ones), and the
adversarial probabilities are not clamped to 1e-6 and renormalized (two more full-vocabulary
passes the official code pays; leaving them out only makes this baseline faster).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def generate_modality_mask(input_ids, labels, attention_mask, data_types, image_token_id=None):
    """[B, L] bool: which embeddings the attack may perturb, one sample at a time.

    ``image_heavy`` (and a text-only model) -> the text tokens that are neither answer nor
    padding; ``text_heavy`` -> the image placeholder tokens; ``VQA`` -> nothing.
    """
    if image_token_id is None:
        visual = torch.zeros_like(input_ids, dtype=torch.bool)
    else:
        visual = input_ids == image_token_id
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, kind in enumerate(data_types):
        if kind in ("image_heavy", "text"):
            mask[i] = ~visual[i]
            mask[i][labels[i] != -100] = False
            mask[i][attention_mask[i] == 0] = False
        elif kind == "text_heavy":
            mask[i] = visual[i]
        elif kind == "VQA":
            mask[i] = False
        else:
            raise ValueError(f"unknown data type {kind!r}")
    return mask


def _shifted_ce(logits, labels, attention_mask):
    shift_attention = attention_mask[:, -(logits.shape[1] - 1) :]
    shift_logits = logits[..., :-1, :][shift_attention != 0].contiguous()
    shift_labels = labels[..., 1:][shift_attention != 0].contiguous()
    return F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))


def _language_model_logits(model, inputs_embeds, attention_mask):
    return model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).logits


def eager_robust_loss(
    model,
    batch,
    *,
    epsilon=1e-3,
    alpha=0.1,
    steps=2,
    lam=0.01,
    temperature=1.0,
    data_types=None,
    image_token_id=None,
):
    """Total loss and its parts ``(loss, {"ce_clean", "ce_adv", "consistency"})``.

    ``batch``: ``input_ids``, ``attention_mask``, ``labels`` (``-100`` outside the answers).
    ``data_types``: one of ``image_heavy`` / ``text_heavy`` / ``VQA`` per sample (default: every
    sample perturbs its prompt, as for a text-only model).
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    batch_size = input_ids.shape[0]
    if data_types is None:
        data_types = ["image_heavy"] * batch_size

    inputs_embeds = model.get_input_embeddings()(input_ids)
    perturbation_mask = generate_modality_mask(input_ids, labels, attention_mask, data_types, image_token_id).unsqueeze(
        -1
    )

    # PGD attack: parameters frozen one by one, gradient w.r.t. the noise by backward().
    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad = False
    try:
        embeds_pgd = inputs_embeds.clone().detach()
        noise = (torch.rand_like(embeds_pgd) * 2 - 1) * epsilon
        for _ in range(steps):
            noise = noise.detach().clone().requires_grad_(True)
            perturbed = (embeds_pgd + noise * perturbation_mask.float()).to(embeds_pgd.dtype)
            logits = _language_model_logits(model, perturbed, attention_mask)
            loss = _shifted_ce(logits, labels, attention_mask)
            loss.backward()
            noise = noise + alpha * noise.grad
            noise = torch.clamp(noise, -epsilon, epsilon)
        noise = noise.detach()
    finally:
        for p, flag in zip(params, trainable):
            p.requires_grad = flag

    perturbed = (embeds_pgd + noise * perturbation_mask.float()).to(inputs_embeds.dtype)
    combined = torch.cat([inputs_embeds, perturbed], dim=0)
    combined_logits = _language_model_logits(model, combined, torch.cat([attention_mask, attention_mask], dim=0))
    clean_logits, adv_logits = combined_logits[:batch_size], combined_logits[batch_size:]
    ce_clean = _shifted_ce(clean_logits, labels, attention_mask)
    ce_adv = _shifted_ce(adv_logits, labels, attention_mask)

    # Consistency: per sample, copy the answer rows out and compare full-vocab distributions.
    vocab = combined_logits.shape[-1]
    shift_labels = labels[:, 1:]
    total = combined_logits.new_zeros((), dtype=torch.float32)
    for i in range(batch_size):
        answer = (shift_labels[i] != -100).unsqueeze(-1)
        n_rows = int(answer.sum())  # host sync, as in the official code's .view(size, -1, V)
        if n_rows == 0:
            continue
        adv_rows = adv_logits[i, :-1].masked_select(answer).view(n_rows, vocab)
        with torch.no_grad():
            clean_rows = clean_logits[i, :-1].masked_select(answer).view(n_rows, vocab)
        log_q = F.log_softmax(adv_rows.float() / temperature, dim=-1)
        log_p = F.log_softmax(clean_rows.float() / temperature, dim=-1)
        total = total + F.kl_div(log_p, log_q, reduction="sum", log_target=True)  # KL(Q || P)
    consistency = total / batch_size

    loss = ce_clean + ce_adv + lam * consistency
    return loss, {"ce_clean": ce_clean.detach(), "ce_adv": ce_adv.detach(), "consistency": consistency.detach()}
