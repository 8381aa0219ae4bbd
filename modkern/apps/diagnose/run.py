"""``modkern diagnose``: how much modality interference does a model have?

The diagnosis of both source papers, for any Hugging Face multimodal checkpoint modkern can feed
(LLaVA, Qwen2-VL / Qwen2.5-VL, the Qwen2.5-Omni thinker; the demo's checkpoints):

* **Black-box, causal** (*Diagnosing and Mitigating Modality Interference*, 2505.19616; MMA-Bench,
  2511.22826): every clean item gets perturbed variants in which only a modality that should not
  matter changes. Per condition: ``accuracy`` (every answer token is the teacher-forced argmax),
  ``flip_rate`` (the perturbed answer differs from the clean answer at some answer token),
  ``causal_effect`` (probability of the correct answer, clean minus perturbed: mean and std) and
  ``js`` (Jensen-Shannon divergence between the clean and perturbed next-token distributions at the
  answer positions, :func:`modkern.fused_js`, averaged over an item's answer tokens: mean and std).
* **White-box** (MMA-Bench): the share of attention that the answer positions (the positions whose
  logits predict the answer tokens) pay to each modality's tokens (``text``, ``image``, ``video``,
  ``audio``), per layer, averaged over heads and answer positions, with eager attention; and Cohen's
  d of that share between the two prompt types of a task (image- vs text-focused items;
  visual- vs audio-focused questions).

Conditions (:data:`CONDITIONS`): image-heavy items (the image decides) with misleading text, an
unrelated fact, a long irrelevant context, a list of unrelated words and a misleading note (two
forms the demo's augmentation never uses: its held-out interferences); text-heavy items (the text
decides) with a swapped,
black, white or noise image; audio-visual items (the question asks about the video or about the
sound, or about both) with misaligned audio-video pairs, removed audio, zeroed frames, a misleading
caption and (data files) a paragraph of irrelevant text: MMA-Bench's conditions.
A condition that the model cannot take (audio on LLaVA) is skipped with the reason in the report;
so is one that can build no variant (no image of another class to swap in, items without the
input it changes), and an item a condition cannot build is left out of it and counted, never
replaced by another perturbation.

Data: without ``items``, the built-in synthetic tasks (the demo's colour task of
:mod:`modkern.apps.synthetic_task`, and an audio-visual colour task for models with audio and video); or a list of
:class:`Item`; or ``data``, a data file (:mod:`modkern.data`) fed through the checkpoint's own processor and chat
template (:class:`modkern.apps.diagnose.models.ChatItemCollator`, the fine-tuning's prompts), with the paper's
interferences (:data:`DATA_FILE_CONDITIONS`) by default. Multiple-choice items (options in the question, the
answer a letter) are scored by the options' likelihood; free answers by exact match of the greedy answer
(every answer token the argmax).

Example::

    from modkern.apps.diagnose import diagnose
    report = diagnose("runs/demo/checkpoints/sft", out="runs/diag", max_items=64)
    report["conditions"]["mislead_text"]["flip_rate"]
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from modkern.apps.diagnose.conditions import (
    BUILTIN_CONDITIONS,
    condition_context,
    data_file_conditions,
    resolve_conditions,
)
from modkern.apps.diagnose.items import (
    KINDS,
    DiagnoseError,
    Item,
    NotBuilt,
    answer_classes,
    av_task_items,
    data_file_items,
    image_task_items,
)
from modkern.apps.diagnose.metrics import (
    attention_report,
    attention_share,
    compare,
    forward_answer_rows,
    item_metrics,
    mean_std,
)
from modkern.apps.diagnose.models import ChatItemCollator, Collator, ModelSpec, load_model
from modkern.apps.diagnose.report import comparison, format_comparison, format_table, plot_comparison, plot_report
from modkern.apps.progress import Progress
from modkern.apps.synthetic_task import InterferenceTask
from modkern.apps.train_loop import resolve_device

# --- the diagnosis ---------------------------------------------------------------------------------


def set_eager_attention(model: nn.Module):
    """Switch to eager attention (returns the previous implementation, or None when unchanged)."""
    current = getattr(model.config, "_attn_implementation", None)
    if current == "eager":
        return None
    if not hasattr(model, "set_attn_implementation"):
        raise DiagnoseError(f"{type(model).__name__} cannot switch to eager attention; pass attention=False")
    try:
        model.set_attn_implementation("eager")
    except Exception as exc:  # noqa: BLE001
        raise DiagnoseError(
            f"{type(model).__name__} cannot switch to eager attention ({exc}); pass attention=False"
        ) from None
    return current


def diagnose(
    model,
    *,
    out: Optional[str] = None,
    tokenizer=None,
    items: Optional[Sequence[Item]] = None,
    data: Optional[str] = None,
    processor=None,
    skip_bad: bool = False,
    conditions=None,
    max_items: int = 64,
    batch_size: int = 16,
    device="auto",
    seed: int = 0,
    attention: bool = True,
    progress: bool = True,
    backend: str = "auto",
    log=print,
) -> dict:
    """Diagnose ``model``'s modality interference; returns the report (also ``out/diagnosis.json``).

    Args:
        model: a local checkpoint directory, or a loaded Hugging Face model (then pass ``tokenizer``).
        out: directory for ``diagnosis.json`` and ``diagnosis.png`` (None: write nothing).
        tokenizer: a :class:`modkern.apps.synthetic_task.WordTokenizer` or a Hugging Face tokenizer (read from the
            checkpoint directory when ``model`` is a path).
        items: clean :class:`Item` s (default: the built-in tasks the model can take: the demo's
            image/text colour task, and an audio-visual one for models with audio and video).
        data: a data file instead (JSON / JSONL samples, :mod:`modkern.data`), fed through ``processor``
            (read from the checkpoint directory when ``model`` is a path); ``skip_bad`` leaves its
            bad samples out (and says how many) instead of stopping at the first.
        conditions: names of :data:`CONDITIONS` (list or comma-separated string; default all).
        max_items: clean items per item kind (for the built-in tasks: generated; else the first ones).
        batch_size: items per forward.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        seed: seeds the data and the perturbations.
        attention: also the white-box attention analysis (eager attention, ``output_attentions``).
        progress: a progress bar over items (plain lines when stdout is not a terminal).
        backend: backend of :func:`modkern.fused_js`.
        log: where the table and messages go (``None``: nowhere).

    Returns a dict with ``"conditions"`` (per condition: ``accuracy``, ``clean_accuracy``,
    ``flip_rate``, ``causal_effect`` and ``js`` (``mean``, ``std``), ``items``, ``items_skipped``
    and ``items_skipped_reasons`` (reason -> count: items the condition could not build, e.g. no
    image, no donor of another class), ``applies_to``, ``description``), ``"clean"`` (accuracy per
    item kind), ``"skipped"`` (condition -> reason, also a condition that could build no item),
    ``"attention"`` (``modalities``, ``share`` [layer][modality], ``share_by_prompt_type``,
    ``cohens_d``) and the settings.
    """
    log = log or (lambda *a, **k: None)
    start = time.perf_counter()
    _check_settings(max_items, batch_size, out)
    if data is not None and items is not None:
        raise DiagnoseError("give items or data, not both")
    if data is not None:
        source, model, processor = _load_with_processor(model, processor)
    else:
        source, model, tokenizer = _load(model, tokenizer)
    spec = ModelSpec.from_model(model)
    dev = _device(device)
    torch.manual_seed(seed)
    builtin = items is None and data is None
    if data is not None:
        from modkern.processing import sampling_rate_of

        items = data_file_items(data, skip_bad=skip_bad, sampling_rate=sampling_rate_of(processor), log=log)
    items = _builtin_items(spec, max_items, seed) if builtin else _first_items(items, max_items)
    if not items:
        raise DiagnoseError("no items to diagnose")
    kinds_present = sorted({it.kind for it in items}, key=KINDS.index)
    default = data_file_conditions(kinds_present) if data is not None else BUILTIN_CONDITIONS
    run, skipped = resolve_conditions(conditions, spec, kinds_present, default)
    classes = answer_classes(items)
    if builtin:  # the task's colours, also when max_items leaves some out
        classes = sorted(set(classes) | set(InterferenceTask().colours))
    perturbed, not_built = build_variants(run, items, classes, seed, skipped)
    run = [c for c in run if c.name in perturbed]
    collate = ChatItemCollator(spec, processor) if data is not None else Collator(spec, tokenizer)
    measured = _measure(model, items, perturbed, collate, spec, dev, batch_size, attention, progress, backend, log)
    report = _report(model, source, spec, items, kinds_present, run, skipped, not_built, *measured, attention)
    report.update(
        settings=dict(
            max_items=max_items, batch_size=batch_size, device=str(dev), seed=seed, backend=backend, data=data
        ),
        seconds=time.perf_counter() - start,
    )
    log(format_table(report))
    if out is not None:
        _write(report, out, log)
    return report


def _check_settings(max_items, batch_size, out):
    if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
        raise DiagnoseError(f"max_items must be an int >= 1, got {max_items!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DiagnoseError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if out is not None:  # before the run, not after it: a bad --out or no matplotlib would lose the results
        if importlib.util.find_spec("matplotlib") is None:
            raise DiagnoseError("diagnosis.png needs matplotlib: pip install 'modkern[demo]' (or pass out=None)")
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as exc:
            raise DiagnoseError(f"--out {out}: cannot create the output directory ({exc})") from None


def _load(model, tokenizer):
    """``(source path or None, model, tokenizer)`` from a checkpoint directory or a loaded model."""
    source = None
    if isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        model, loaded_tok = load_model(source)
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    elif not isinstance(model, nn.Module):
        raise DiagnoseError(f"model must be a checkpoint directory or a Hugging Face model, got {type(model).__name__}")
    if tokenizer is None:
        raise DiagnoseError("tokenizer is required when model is a loaded model")
    return source, model, tokenizer


def _load_with_processor(model, processor):
    """``(source path or None, model, processor)`` for a data-file diagnosis."""
    if isinstance(model, (str, os.PathLike)):
        from modkern.apps.finetune import FinetuneError, load_model_and_processor

        try:
            loaded, loaded_processor = load_model_and_processor(os.fspath(model))
        except FinetuneError as exc:
            raise DiagnoseError(str(exc)) from None
        return os.fspath(model), loaded, processor if processor is not None else loaded_processor
    if not isinstance(model, nn.Module):
        raise DiagnoseError(f"model must be a checkpoint directory or a Hugging Face model, got {type(model).__name__}")
    if processor is None:
        raise DiagnoseError("processor is required with data when model is a loaded model")
    return None, model, processor


def _device(device) -> torch.device:
    try:
        dev = resolve_device(device)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError / ValueError for bad names
        raise DiagnoseError(f"--device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiagnoseError(f"--device {device}: CUDA is not available on this machine")
    return dev


def _builtin_items(spec: ModelSpec, max_items: int, seed: int) -> list:
    """The built-in tasks the model can take: the colour task, and the audio-visual one."""
    items = []
    if "image" in spec.modalities:
        items += image_task_items(max_items, image_size=spec.image_size, seed=seed)
    if "audio" in spec.modalities and "video" in spec.modalities:
        items += av_task_items(
            max_items,
            image_size=spec.image_size,
            frames=spec.video_frames,
            mel_bins=spec.num_mel_bins,
            audio_frames=spec.audio_frames,
            seed=seed,
        )
    return items


def _first_items(items, max_items: int) -> list:
    """The first ``max_items`` items of each kind."""
    items = list(items)
    if not all(isinstance(it, Item) for it in items):
        raise DiagnoseError("items must be modkern.apps.diagnose.Item objects")
    per_kind: dict = {}
    kept = []
    for it in items:
        if per_kind.get(it.kind, 0) < max_items:
            per_kind[it.kind] = per_kind.get(it.kind, 0) + 1
            kept.append(it)
    return kept


def build_variants(run, items, classes, seed: int, skipped: dict):
    """Perturbed copies of every item, made up front (deterministic for the seed): ``(perturbed,
    not_built)``, condition -> ``(item indices, variants)`` and -> ``{reason: count}``.

    An item a condition cannot build (no image to replace, no donor of another class) is left out
    of it and counted with the reason; a condition with no item at all is added to ``skipped``."""
    perturbed, not_built = {}, {}
    for c in run:
        ctx = condition_context(seed, c.name, classes)  # a condition's variants do not depend on the others chosen
        idx, variants, reasons = [], [], {}
        for i, it in enumerate(items):
            if it.kind not in c.kinds:
                continue
            try:
                variants.append(c.make(items, i, ctx))
            except NotBuilt as exc:
                reasons[str(exc)] = reasons.get(str(exc), 0) + 1
                continue
            idx.append(i)
        if idx:
            perturbed[c.name], not_built[c.name] = (idx, variants), reasons
        else:
            skipped[c.name] = "; ".join(f"{reason} ({n} item{'s' if n > 1 else ''})" for reason, n in reasons.items())
    return perturbed, not_built


def _measure(model, items, perturbed, collate, spec, dev, batch_size, attention, progress, backend, log):
    """Every chunk of clean items, then each condition's variants of them: ``(clean_correct [n],
    per-condition lists of measurements, attention shares)``."""
    was_training = model.training
    model.eval()
    model.to(dev)
    previous_attn = set_eager_attention(model) if attention else None
    n = len(items)
    acc = {name: {k: [] for k in ("idx", "clean_correct", "correct", "flip", "effect", "js")} for name in perturbed}
    clean_correct = torch.zeros(n, dtype=torch.bool)
    shares = []
    bar = Progress(n, "diagnose", enabled=progress, unit="item", log=log)
    try:
        with torch.no_grad():
            for lo in range(0, n, batch_size):
                chunk = list(range(lo, min(lo + batch_size, n)))
                chunk_items = [items[i] for i in chunk]
                batch = collate(chunk_items)
                options = collate.option_targets(chunk_items) if hasattr(collate, "option_targets") else None
                clean, rows, output = forward_answer_rows(model, batch, dev, attentions=attention)
                clean_correct[lo : lo + len(chunk)] = item_metrics(clean, len(chunk), options)["correct"].cpu()
                if attention:
                    shares.append(_chunk_shares(model, output, collate, batch, rows, spec))
                del output
                _measure_variants(model, perturbed, collate, clean, lo, len(chunk), dev, backend, acc, options)
                bar.update(len(chunk))
    finally:
        bar.close()
        if previous_attn is not None:
            model.set_attn_implementation(previous_attn)
        model.train(was_training)
    return clean_correct, acc, shares


def _chunk_shares(model, output, collate, batch, rows, spec):
    atts = getattr(output, "attentions", None)
    if not atts:
        raise DiagnoseError(
            f"{type(model).__name__} returned no attentions with output_attentions=True under eager "
            "attention; run without the white-box part (--no-attention / attention=False)"
        )
    cats = collate.categories(batch["input_ids"], batch["attention_mask"]).to(rows.device)
    return attention_share(atts, rows, cats, 1 + len(spec.modalities)).cpu()


def _measure_variants(model, perturbed, collate, clean, lo: int, size: int, dev, backend, acc, options=None):
    """Each condition's variants of the chunk ``[lo, lo + size)``, compared with the clean rows."""
    for name, (idx, variants) in perturbed.items():
        local = [j for j, i in enumerate(idx) if lo <= i < lo + size]
        if not local:
            continue
        sub_items = torch.tensor([idx[j] - lo for j in local], device=clean.item.device)
        pert, _, _ = forward_answer_rows(model, collate([variants[j] for j in local]), dev)
        pert.item = sub_items[pert.item]
        m = compare(clean.select(sub_items), pert, size, backend=backend, options=options)
        a = acc[name]
        a["idx"].append(sub_items.cpu() + lo)
        for key in ("clean_correct", "correct", "flip", "effect", "js"):
            a[key].append(m[key][sub_items].cpu())


def _report(model, source, spec, items, kinds_present, run, skipped, not_built, clean_correct, acc, shares, attention):
    kinds = torch.tensor([KINDS.index(it.kind) for it in items])
    report = {
        "model": source if source is not None else type(model).__name__,
        "family": spec.family,
        "modalities": ["text", *spec.modalities],
        "items": {k: int((kinds == KINDS.index(k)).sum()) for k in kinds_present},
        "clean": {
            k: {"accuracy": float(clean_correct[kinds == KINDS.index(k)].double().mean())} for k in kinds_present
        },
        "conditions": {},
        "skipped": skipped,
    }
    for c in run:
        cat = {k: torch.cat(v) for k, v in acc[c.name].items()}
        report["conditions"][c.name] = {
            "description": c.description,
            "applies_to": [k for k in c.kinds if k in kinds_present],
            "items": int(cat["idx"].numel()),
            "items_skipped": sum(not_built[c.name].values()),
            "items_skipped_reasons": not_built[c.name],
            "accuracy": float(cat["correct"].double().mean()),
            "clean_accuracy": float(cat["clean_correct"].double().mean()),
            "flip_rate": float(cat["flip"].double().mean()),
            "causal_effect": mean_std(cat["effect"]),
            "js": mean_std(cat["js"]),
        }
    if attention:
        report["attention"] = attention_report(torch.cat(shares), kinds, report["modalities"])
    return report


def _write(report: dict, out: str, log):
    os.makedirs(out, exist_ok=True)
    report["files"] = {"json": os.path.join(out, "diagnosis.json"), "png": os.path.join(out, "diagnosis.png")}
    plot_report(report, report["files"]["png"])
    with open(report["files"]["json"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, allow_nan=False)
    log(f"wrote {report['files']['json']} and {report['files']['png']}")


def diagnose_compare(before, after, *, out: Optional[str] = None, log=print, **kwargs) -> dict:
    """:func:`diagnose` of two checkpoints on the same items and conditions (same seed), and the two
    side by side (``before`` -> ``after``): ``out/diagnosis.json`` / ``.png`` are ``before``'s,
    ``out/after/`` holds ``after``'s, ``out/comparison.json`` / ``.png`` the comparison."""
    log = log or (lambda *a, **k: None)
    first = diagnose(before, out=out, log=log, **kwargs)
    second = diagnose(after, out=None if out is None else os.path.join(out, "after"), log=log, **kwargs)
    comp = comparison(first, second)
    log(format_comparison(comp))
    if out is not None:
        comp["files"] = {"json": os.path.join(out, "comparison.json"), "png": os.path.join(out, "comparison.png")}
        plot_comparison(comp, comp["files"]["png"])
        with open(comp["files"]["json"], "w", encoding="utf-8") as f:
            json.dump(comp, f, indent=2, allow_nan=False)
        log(f"wrote {comp['files']['json']} and {comp['files']['png']}")
    return comp
