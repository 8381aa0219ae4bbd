"""Per-item measurements: answer rows, accuracy, flip, causal effect, JS; attention share and Cohen's d."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from modkern.apps.diagnose.items import KINDS, PROMPT_PAIRS, PROMPT_TYPES
from modkern.constants import IGNORE_INDEX
from modkern.objective.robust import shift_labels
from modkern.ops.divergence.api import fused_js

# --- metrics ---------------------------------------------------------------------------------------


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


@dataclass
class AnswerRows:
    """The answer positions of a batch: ``logits [R, V]`` (fp32), ``target [R]``, ``item [R]``."""

    logits: Tensor
    target: Tensor
    item: Tensor

    def select(self, keep_items: Tensor) -> AnswerRows:
        keep = torch.isin(self.item, keep_items)
        return AnswerRows(self.logits[keep], self.target[keep], self.item[keep])


def forward_answer_rows(model, batch: dict, device, attentions: bool = False):
    inputs = {k: v for k, v in to_device(batch, device).items() if k != "labels"}
    inputs["use_cache"] = False
    if attentions:
        inputs["output_attentions"] = True
    out = model(**inputs)
    shifted = shift_labels(batch["labels"]).to(out.logits.device)
    rows = shifted != IGNORE_INDEX
    b_idx = rows.nonzero()[:, 0]
    ans = AnswerRows(out.logits[rows].float(), shifted[rows], b_idx)
    return ans, rows, out


def option_choice(rows: AnswerRows, option_ids: Tensor, position: Tensor) -> Tensor:
    """``[n_items]``: the option whose token has the highest logit at the item's answer row
    ``position`` (``option_ids [n_items, k]``, -1 padding; -1 for an item without options). The
    options' answers are the same but for that token (a letter, the same end of turn after it), so
    this is the option of highest likelihood: the tokens before it are shared, and the ones after
    it are scored by the right answer's teacher-forced rows (the same end of turn)."""
    n, device, count = option_ids.shape[0], rows.logits.device, rows.item.numel()
    ids = option_ids.to(device)
    none = torch.full((n,), -1, dtype=torch.long, device=device)
    if count == 0:
        return none
    first = torch.full((n,), count, device=device).scatter_reduce(
        0, rows.item, torch.arange(count, device=device), "amin"
    )
    target = first + position.to(device)
    row = target.clamp(max=count - 1)
    # the row exists and is this item's (an answer shorter than ``position`` has none)
    valid = (target < count) & (rows.item[row] == torch.arange(n, device=device)) & (ids >= 0).any(1)
    scores = rows.logits[row].gather(1, ids.clamp_min(0)).masked_fill(ids < 0, float("-inf"))
    return torch.where(valid, scores.argmax(1), none)


def item_metrics(rows: AnswerRows, n_items: int, options=None) -> dict:
    """Per item (``[n_items]``): ``correct`` (bool), ``p_correct`` (probability of the whole answer,
    teacher-forced), and per row ``pred`` (argmax). Free answers are correct when every answer
    token is the argmax (greedy decoding reproduces the answer); with ``options`` (``(option_ids,
    answer_option, position)`` of :meth:`ChatItemCollator.option_targets`), a multiple-choice item is correct
    when :func:`option_choice` picks the right option (``choice``)."""
    logp = torch.log_softmax(rows.logits, dim=-1)
    tok_logp = logp.gather(1, rows.target[:, None])[:, 0]
    pred = rows.logits.argmax(-1)
    wrong = torch.zeros(n_items, device=pred.device).index_add_(0, rows.item, (pred != rows.target).float())
    logp_item = torch.zeros(n_items, device=pred.device).index_add_(0, rows.item, tok_logp)
    out = {"correct": wrong == 0, "p_correct": logp_item.exp(), "pred": pred}
    if options is not None:
        choice = option_choice(rows, options[0], options[2])
        answer = options[1].to(pred.device)
        out["choice"] = choice
        out["correct"] = torch.where(answer >= 0, choice == answer, out["correct"])
    return out


def compare(clean: AnswerRows, pert: AnswerRows, n_items: int, backend: str = "auto", options=None) -> dict:
    """Per item metrics of a perturbed batch against its clean batch (rows paired in order); a
    multiple-choice item (``options``) flips when the chosen option changes."""
    if clean.logits.shape != pert.logits.shape:
        raise RuntimeError(
            f"clean and perturbed items have different answer lengths ({clean.logits.shape[0]} vs "
            f"{pert.logits.shape[0]} answer tokens); a condition must keep the answer"
        )
    mc, mp = item_metrics(clean, n_items, options), item_metrics(pert, n_items, options)
    dev = clean.logits.device
    flips = torch.zeros(n_items, device=dev).index_add_(0, pert.item, (mc["pred"] != mp["pred"]).float()) > 0
    if options is not None:
        flips = torch.where(options[1].to(dev) >= 0, mc["choice"] != mp["choice"], flips)
    js_rows = fused_js(clean.logits, pert.logits, reduction="none", backend=backend).float()
    count = torch.zeros(n_items, device=dev).index_add_(0, pert.item, torch.ones_like(js_rows))
    js = torch.zeros(n_items, device=dev).index_add_(0, pert.item, js_rows) / count.clamp_min(1)
    return {
        "clean_correct": mc["correct"],
        "correct": mp["correct"],
        "flip": flips,
        "effect": mc["p_correct"] - mp["p_correct"],
        "js": js,
    }


def mean_std(x: Tensor) -> dict:
    x = x.double()
    std = float(x.std(unbiased=True)) if x.numel() > 1 else 0.0
    return {"mean": float(x.mean()), "std": std}


# Below this pooled standard deviation (attention shares are fractions of 1) the shares are
# near-constant across items - an untrained model's, say - and a d is a ratio of noise to noise
# (an untrained checkpoint gave d = +-39.9): it is reported as undefined instead.
MIN_POOLED_SD = 1e-3
COHENS_D_NOTE = (
    "null where undefined: fewer than 2 items of a prompt type, or a pooled sd below "
    f"{MIN_POOLED_SD:g} (near-constant shares across items; a d there measures noise)"
)


def cohens_d(a: Tensor, b: Tensor, min_pooled_sd: float = MIN_POOLED_SD) -> Tensor:
    """Cohen's d of ``a [na, ...]`` against ``b [nb, ...]`` along dim 0, pooled std with n-1 variances:
    ``(mean_a - mean_b) / sqrt(((na-1) var_a + (nb-1) var_b) / (na+nb-2))``. NaN where it is
    undefined: fewer than two items on a side, or a pooled std below ``min_pooled_sd``."""
    a, b = a.double(), b.double()
    na, nb = a.shape[0], b.shape[0]
    if na < 2 or nb < 2:
        return torch.full(a.shape[1:], float("nan"), dtype=torch.float64)
    pooled = (((na - 1) * a.var(0, unbiased=True) + (nb - 1) * b.var(0, unbiased=True)) / (na + nb - 2)).sqrt()
    d = (a.mean(0) - b.mean(0)) / pooled
    return torch.where(pooled >= min_pooled_sd, d, torch.full_like(d, float("nan")))


def attention_share(attentions, query_rows: Tensor, categories: Tensor, num_categories: int) -> Tensor:
    """``[B, layers, num_categories]``: per item and layer, the attention that the query rows
    (``[B, L]`` bool) pay to each token category (``categories [B, L]``, -1 = none), averaged over
    heads and query rows. ``attentions``: per layer ``[B, heads, L, L]``."""
    onehot = F.one_hot(categories.clamp_min(0), num_categories).to(torch.float32)
    onehot = onehot * (categories >= 0)[..., None]
    q = query_rows.to(torch.float32)
    per_layer = []
    for a in attentions:  # one entry per layer
        mean_heads = a.float().mean(1)  # [B, L, L]
        share = torch.einsum("bqk,bkm->bqm", mean_heads, onehot)  # [B, L, M]
        per_layer.append((share * q[..., None]).sum(1) / q.sum(1).clamp_min(1)[:, None])
    return torch.stack(per_layer, dim=1)


def nan_to_none(x):
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def attention_report(shares: Tensor, kinds: Tensor, modalities: list) -> dict:
    """Mean share [layer][modality] overall and per prompt type, Cohen's d between prompt types."""
    out = {
        "query": "answer positions (the logits that predict the answer tokens), mean over heads and positions",
        "modalities": modalities,
        "layers": int(shares.shape[1]),
        "share": shares.mean(0).tolist(),
        "share_by_prompt_type": {},
        "items_by_prompt_type": {},
        "cohens_d": {},
        "cohens_d_note": COHENS_D_NOTE,
    }
    for i, k in enumerate(KINDS):
        sel = kinds == i
        if sel.any():
            out["share_by_prompt_type"][PROMPT_TYPES[k]] = shares[sel].mean(0).tolist()
            out["items_by_prompt_type"][PROMPT_TYPES[k]] = int(sel.sum())
    for a, b in PROMPT_PAIRS:
        sa, sb = kinds == KINDS.index(a), kinds == KINDS.index(b)
        if sa.any() and sb.any():
            d = cohens_d(shares[sa], shares[sb])
            out["cohens_d"][f"{PROMPT_TYPES[a]} vs {PROMPT_TYPES[b]}"] = nan_to_none(d.tolist())
    return out
