"""``modality_mask``: which tokens the PGD perturbation may touch, vectorized over the batch."""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch
from torch import Tensor

from modkern import checks
from modkern.constants import IGNORE_INDEX

RESERVED = ("text", "none")


def _int_ids(name: str, ids) -> tuple[int, ...]:
    if isinstance(ids, Tensor):
        if ids.dim() > 1 or ids.dtype.is_floating_point or ids.dtype in (torch.bool,) or ids.dtype.is_complex:
            raise TypeError(f"{name} must be an int, a sequence of ints or a 1-D integer tensor")
        ids = ids.reshape(-1).tolist()
    elif isinstance(ids, numbers.Integral) and not isinstance(ids, bool):
        ids = [ids]
    if not isinstance(ids, (list, tuple, set, frozenset)) or not all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids
    ):
        raise TypeError(f"{name} must be an int, a sequence of ints or a 1-D integer tensor, got {ids!r}")
    return tuple(int(i) for i in ids)


def _check_token_ids(token_ids, exclude_ids) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...]]:
    if not isinstance(token_ids, Mapping):
        raise TypeError(f"token_ids must map modality names to placeholder ids, got {type(token_ids).__name__}")
    out, seen = {}, {}
    for name, ids in token_ids.items():
        if not isinstance(name, str) or name in RESERVED:
            raise ValueError(f"token_ids keys must be modality names other than {RESERVED}, got {name!r}")
        out[name] = _int_ids(f"token_ids[{name!r}]", ids)
        for i in out[name]:
            if i in seen and seen[i] != name:
                raise ValueError(f"token_ids: id {i} is a placeholder of both {seen[i]!r} and {name!r}")
            seen[i] = name
    excluded = _int_ids("exclude_ids", list(exclude_ids) if isinstance(exclude_ids, (set, frozenset)) else exclude_ids)
    clash = sorted(set(excluded) & set(seen))
    if clash:
        raise ValueError(f"exclude_ids must not contain placeholder ids of token_ids, got {clash}")
    return out, excluded


def selector_names(token_ids) -> tuple[str, ...]:
    """The names that integer codes of a per-sample ``perturb`` tensor index: ``("none", "text", *token_ids)``."""
    return ("none", "text", *token_ids)


def _names(value, categories, where: str) -> frozenset[str]:
    """One sample's (or the batch's) selection as a set of category names ("none" -> empty)."""
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, (tuple, list, set, frozenset)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{where} must be a name or a collection of names, got {value!r}")
    unknown = [n for n in names if n not in categories and n != "none"]
    if unknown:
        raise ValueError(f"{where}: unknown name(s) {unknown}; expected 'none' or one of {tuple(categories)}")
    return frozenset(n for n in names if n != "none")


def _selection(perturb, categories, batch: int, device) -> frozenset[str] | Tensor:
    """Per-batch: a set of names. Per-sample: a bool ``[B, len(categories)]`` tensor on ``device``."""
    if isinstance(perturb, (str, tuple, set, frozenset)):
        return _names(perturb, categories, "perturb")
    if isinstance(perturb, list):
        if len(perturb) != batch:
            raise ValueError(f"perturb given per sample must have {batch} entries (one per row), got {len(perturb)}")
        rows = [_names(v, categories, f"perturb[{i}]") for i, v in enumerate(perturb)]
        table = [[c in r for c in categories] for r in rows]
        return torch.tensor(table, dtype=torch.bool, device=device).reshape(batch, len(categories))
    if isinstance(perturb, Tensor):
        if perturb.shape != (batch,) or perturb.dtype.is_floating_point or perturb.dtype.is_complex:
            raise ValueError(
                f"perturb given as a tensor must be integer codes of shape ({batch},) indexing "
                f"{('none', *categories)}, got dtype {perturb.dtype} and shape {tuple(perturb.shape)}"
            )
        if perturb.device != device:
            raise ValueError(f"perturb is on {perturb.device} but input_ids is on {device}")
        if (
            perturb.device.type == "cpu"
            and perturb.numel()
            and not (0 <= int(perturb.min()) and int(perturb.max()) <= len(categories))
        ):
            raise ValueError(f"perturb codes must lie in [0, {len(categories)}] (indices into {('none', *categories)})")
        codes = torch.arange(1, len(categories) + 1, device=device)
        return perturb[:, None].to(torch.int64) == codes[None, :]
    raise TypeError(
        "perturb must be a name, a tuple/set of names (whole batch), a list with one entry per sample, "
        f"or an integer code tensor, got {type(perturb).__name__}"
    )


def modality_mask(
    input_ids: Tensor,
    *,
    perturb,
    token_ids,
    labels: Tensor | None = None,
    attention_mask: Tensor | None = None,
    exclude_ids=(),
) -> Tensor:
    """Bool ``[B, L]`` mask of the tokens to perturb, computed without a loop over rows.

    Categories of a token:

    * a modality ``name`` of ``token_ids``: its placeholder ids (e.g. ``{"image": 32000}`` for
      LLaVA, ``{"image": 151655, "video": 151656}`` for Qwen2-VL, any number of modalities);
    * ``"text"``: every other token that is not an answer token (``labels != -100``), not padding
      (``attention_mask == 0``) and not in ``exclude_ids``.

    Padding is never selected. ``exclude_ids`` is for special tokens that are neither text nor a
    modality's content: Qwen-VL's ``<|vision_start|>`` / ``<|vision_end|>`` markers (151652 /
    151653), BOS, chat-template markers. It is a separate keyword (rather than a reserved key of
    ``token_ids``) so that every key of ``token_ids`` names a selectable modality.

    Args:
        input_ids: integer ``[B, L]``.
        perturb: what to select -

            * per batch: ``"text"``, a modality name, ``"none"``, or a tuple / set of names
              (their union);
            * per sample: a ``list`` with one entry per row, each a name or a tuple / list / set of
              names (a ``list`` is always per sample), or an integer tensor ``[B]`` of codes
              indexing :func:`selector_names` ``(token_ids)`` = ``("none", "text", *modalities)``
              (already on the device: no host-to-device copy).

            The paper's rule: image-heavy samples perturb ``"text"``, text-heavy samples perturb
            ``"image"``, VQA samples ``"none"``.
        token_ids: modality name -> placeholder id(s) (int, sequence or 1-D tensor).
        labels: ``[B, L]`` (Hugging Face convention, -100 = not an answer token), optional.
        attention_mask: ``[B, L]`` (0 = padding), optional.
        exclude_ids: ids that are never ``"text"`` (and are no placeholder).

    Example::

        >>> m = modality_mask(batch["input_ids"], perturb=["text", "image", "none"],
        ...                   token_ids={"image": 32000}, labels=batch["labels"],
        ...                   attention_mask=batch["attention_mask"])
    """
    checks.check_tensor("input_ids", input_ids)
    if (
        input_ids.dim() != 2
        or input_ids.dtype == torch.bool
        or input_ids.dtype.is_floating_point
        or input_ids.dtype.is_complex
    ):
        raise ValueError(f"input_ids must be an integer [B, L] tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
    device = input_ids.device
    for name, t in (("labels", labels), ("attention_mask", attention_mask)):
        if t is not None:
            checks.check_tensor(name, t)
            if t.shape != input_ids.shape:
                raise ValueError(
                    f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(t.shape)}"
                )
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but input_ids is on {device}")
    ids, excluded = _check_token_ids(token_ids, exclude_ids)
    categories = ("text", *ids)
    sel = _selection(perturb, categories, input_ids.shape[0], device)

    # One [B, L] bool map per category, by comparisons with Python ints (no host-to-device copy).
    def any_of(values) -> Tensor:
        hit = torch.zeros(input_ids.shape, dtype=torch.bool, device=device)
        for v in values:
            hit |= input_ids == v
        return hit

    if attention_mask is None:
        valid = torch.ones(input_ids.shape, dtype=torch.bool, device=device)
    else:
        valid = attention_mask != 0
    placeholder = {name: any_of(v) & valid for name, v in ids.items()}
    text = valid & ~any_of([i for v in ids.values() for i in v] + list(excluded))
    if labels is not None:
        text &= labels == IGNORE_INDEX
    maps = {"text": text, **placeholder}

    if isinstance(sel, frozenset):
        out = torch.zeros(input_ids.shape, dtype=torch.bool, device=device)
        for name in sel:
            out |= maps[name]
        return out
    stacked = torch.stack([maps[c] for c in categories], dim=0)  # [C, B, L]
    return (stacked & sel.t()[:, :, None]).any(dim=0)
