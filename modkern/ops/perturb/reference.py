"""References of ``perturb`` and ``modality_mask`` (the executable spec): readable, in the dtype
they are given (float64 for ground truth), following SPEC §1 step by step."""

from __future__ import annotations

import torch


def perturb(embeds, delta, mask):
    """``embeds + delta * mask`` computed in (at least) fp32, returned in ``embeds.dtype``.

    ``delta`` is ignored (not multiplied: ``torch.where``) on unselected tokens.
    """
    acc = torch.promote_types(torch.promote_types(embeds.dtype, delta.dtype), torch.float32)
    e = embeds.to(acc)
    shift = torch.where(mask.bool()[..., None], delta.to(acc), torch.zeros((), dtype=acc, device=e.device))
    return (e + shift).to(embeds.dtype)


def modality_mask_rows(input_ids, selections, token_ids, labels=None, attention_mask=None, exclude_ids=()):
    """Token-by-token reference of ``modkern.modality_mask``.

    ``selections``: one set of selected names per sample (``"text"`` and/or modality names; an
    empty set selects nothing). ``token_ids``: modality name -> list of placeholder ids.
    A token is a ``"text"`` token when it is no placeholder of any modality, not in
    ``exclude_ids`` (e.g. vision start / end markers), not an answer token (``labels != -100``) and
    not padding (``attention_mask == 0``). A modality selects its placeholder positions.
    """
    placeholder_of = {}
    for name, ids in token_ids.items():
        for i in ids:
            placeholder_of[int(i)] = name
    excluded = {int(i) for i in exclude_ids}
    rows, length = input_ids.shape
    out = torch.zeros(rows, length, dtype=torch.bool)
    for b in range(rows):
        for t in range(length):
            tok = int(input_ids[b, t])
            if attention_mask is not None and int(attention_mask[b, t]) == 0:
                continue  # padding is never perturbed
            if tok in placeholder_of:
                out[b, t] = placeholder_of[tok] in selections[b]
                continue
            is_answer = labels is not None and int(labels[b, t]) != -100
            out[b, t] = "text" in selections[b] and tok not in excluded and not is_answer
    return out.to(input_ids.device)
