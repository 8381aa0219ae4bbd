"""The main job (``modkern train``): modality interference, and how robust fine-tuning fixes it.

1. Build a tiny LLaVA from a config (random weights, no download) - or load a local checkpoint.
2. Generate the synthetic task of :mod:`modkern.data`: the image decides the answer of image-heavy
   items, whose training captions agree with it most of the time (a shortcut); the note decides the
   answer of text-heavy items, whose images mostly agree with it.
3. Train three models from the same initial weights on the same batches:
   (a) plain SFT; (b) SFT + heuristic augmentation (:mod:`modkern.augment`); (c) the full modkern
   objective (augmentation + PGD on the embeddings restricted by the modality mask + consistency).
4. Evaluate accuracy on clean items, with misleading / unrelated text, with the held-out misleading
   note (a template the augmentation never shows), and on text-heavy items with matching / swapped /
   black images; diagnose each model with :func:`modkern.diagnose.diagnose` on the same clean items
   (flip rate and Jensen-Shannon divergence under each interference, the held-out one included);
   print the tables, write ``results.json`` and ``results.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils.data import DataLoader

from modkern.augment import HeuristicAugmenter, RobustCollator, collate_samples
from modkern.data import (
    MISLEADING_NOTE,
    InterferenceTask,
    TaskConfig,
    TaskEncoder,
    WordTokenizer,
    hf_text_encoder,
)
from modkern.robust import RobustConfig
from modkern.train import TrainConfig, _jsonable, answer_correct, resolve_device, train

TOKENIZER_FILE = "modkern_tokenizer.json"
# (evaluation set, column title). Two columns have no interference (the baselines of their item
# kind); the others add one interfering input to the same items.
EVAL_COLUMNS = (
    ("clean", "image-heavy: no interference"),
    ("misleading_text", "image-heavy: misleading text"),
    ("unrelated_text", "image-heavy: unrelated text"),
    ("misleading_note", "image-heavy: misleading note (held out)"),
    ("text_clean", "text-heavy: no interference"),
    ("text_swapped_image", "text-heavy: swapped image"),
    ("text_blank_image", "text-heavy: black image"),
)
INTERFERENCE_FREE = ("clean", "text_clean")
# The interference that the heuristic augmentation never shows in training (evaluation only): a
# misleading text in a template the augmenter does not use (modkern.data.MISLEADING_NOTE). The
# paper's claim for the adversarial + consistency terms is generalization beyond the heuristics.
HELD_OUT = "mislead_note"
# (modkern.diagnose condition, column title, whether the augmentation shows that kind of input).
DIAGNOSIS_COLUMNS = (
    ("mislead_text", "image-heavy: misleading text", True),
    ("unrelated_text", "image-heavy: unrelated text", True),
    ("long_irrelevant_context", "image-heavy: long irrelevant context", False),
    (HELD_OUT, "image-heavy: misleading note (held out)", False),
    ("swap_image", "text-heavy: swapped image", True),
    ("black_image", "text-heavy: black image", True),
    ("white_image", "text-heavy: white image", True),
    ("noise_image", "text-heavy: noise image", True),
)
METHODS = (
    ("sft", "(a) SFT"),
    ("sft_aug", "(b) SFT + heuristic aug."),
    ("modkern", "(c) modkern: aug. + PGD + consistency"),
)


def default_robust() -> RobustConfig:
    """The objective of run (c): modkern's defaults, the paper's LLaVA-1.5 hyper-parameters
    (epsilon 1e-3, alpha 0.1, raw-gradient steps, Linf projection, K = 2, KL consistency with
    lambda 0.01), with the paper's modality mask (image-heavy: text, text-heavy: image)."""
    return RobustConfig()


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo` (the CLI options map onto these)."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 10
    seed: int = 0
    out: str = "runs/demo"
    device: str = "auto"
    model: Optional[str] = None
    quick: bool = False
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    copies_per_sample: int = 1
    task: TaskConfig = field(default_factory=TaskConfig)
    robust: RobustConfig = field(default_factory=default_robust)
    methods: tuple = tuple(m for m, _ in METHODS)
    progress: bool = True
    save_checkpoints: bool = True

    def __post_init__(self):
        if self.quick:  # a smoke run for tests: a smaller model, task and schedule
            self.steps = min(self.steps, 12)
            self.batch_size = min(self.batch_size, 8)
            self.hidden_size, self.num_layers, self.num_heads = 32, 1, 2
            self.task = dataclasses.replace(self.task, train_size=128, eval_size=16)
        unknown = set(self.methods) - {m for m, _ in METHODS}
        if unknown:
            raise ValueError(f"methods: unknown {sorted(unknown)}; choose from {[m for m, _ in METHODS]}")


# --- model + tokenizer ----------------------------------------------------------------------------


@dataclass
class ModelBundle:
    model: torch.nn.Module
    encode: TaskEncoder
    pad_token_id: int
    image_size: int
    tokenizer: object
    source: str


def _llava_image_tokens(config) -> int:
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    return n + 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else n


def build_model(cfg: DemoConfig, task: InterferenceTask) -> ModelBundle:
    """The tiny LLaVA of the demo, or the local checkpoint at ``cfg.model``."""
    if cfg.model is None:
        from modkern.tiny import tiny_llava

        tok = task.tokenizer()
        model, info = tiny_llava(
            len(tok),
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            image_size=task.config.image_size,
            seed=cfg.seed,
        )
        if info["image_token_id"] != tok.image_token_id or info["bos_token_id"] != tok.bos_token_id:
            raise RuntimeError("modkern.tiny and WordTokenizer disagree on the special token ids")
        encode = TaskEncoder(tok.encode, tok.image_token_id, info["num_image_tokens"], tok.bos_token_id)
        return ModelBundle(model, encode, tok.pad_token_id, info["image_size"], tok, "tiny_llava (random weights)")

    from modkern.train import load_checkpoint

    model = load_checkpoint(cfg.model)
    config = model.config
    if not hasattr(config, "vision_config") or getattr(config, "image_token_id", None) is None:
        raise ValueError(
            f"--model {cfg.model}: the demo needs a LLaVA-style checkpoint (vision_config, image_token_id)"
        )
    word_vocab = os.path.join(cfg.model, TOKENIZER_FILE)
    if os.path.exists(word_vocab):
        tok = WordTokenizer.load(word_vocab)
        text_encoder, bos, pad = tok.encode, tok.bos_token_id, tok.pad_token_id
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.model)
        text_encoder, bos = hf_text_encoder(tok), tok.bos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    encode = TaskEncoder(text_encoder, config.image_token_id, _llava_image_tokens(config), bos)
    return ModelBundle(model, encode, pad, config.vision_config.image_size, tok, cfg.model)


def normalize_pixels(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images to the [-1, 1] range vision towers expect (mean 0.5, std 0.5)."""
    return (images - 0.5) / 0.5


# --- evaluation ------------------------------------------------------------------------------------


def evaluate(model, eval_sets: dict, bundle: ModelBundle, device, batch_size: int = 64) -> dict:
    """Accuracy (all answer tokens right) on each evaluation set."""
    was_training = model.training
    model.eval()
    out = {}
    with torch.no_grad():
        for name, samples in eval_sets.items():
            hits = []
            for i in range(0, len(samples), batch_size):
                chunk = samples[i : i + batch_size]
                batch = collate_samples(chunk, bundle.encode, bundle.pad_token_id, normalize_pixels)
                batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                hits.append(answer_correct(model, batch).cpu())
            out[name] = float(torch.cat(hits).float().mean())
    model.train(was_training)
    return out


def diagnose_model(model, eval_sets: dict, bundle: ModelBundle, device, seed: int = 0, batch_size: int = 64) -> dict:
    """Flip rate and JS under each interference of :data:`DIAGNOSIS_COLUMNS`
    (:func:`modkern.diagnose.diagnose`, black-box part) on the clean evaluation items
    (``clean`` image-heavy, ``text_clean`` text-heavy): per condition ``flip_rate``, ``js`` (mean
    over items of the per-item mean over answer tokens) and ``js_std``, ``accuracy``,
    ``clean_accuracy``, ``causal_effect`` (mean), ``items``, ``held_out`` and ``in_augmentation``."""
    from modkern.diagnose import Item, diagnose

    items = [
        Item(s.text, s.answer, s.kind, s.context, image=s.image, label=s.label)
        for key in ("clean", "text_clean")
        for s in eval_sets[key]
    ]
    per_kind = max(len(eval_sets["clean"]), len(eval_sets["text_clean"]))
    report = diagnose(
        model,
        tokenizer=bundle.tokenizer,
        items=items,
        conditions=[c for c, _, _ in DIAGNOSIS_COLUMNS],
        max_items=per_kind,
        batch_size=batch_size,
        device=device,
        seed=seed,
        attention=False,
        progress=False,
        log=None,
    )
    if report["skipped"]:
        raise RuntimeError(f"diagnosis skipped conditions: {report['skipped']}")
    out = {}
    for cond, _, seen in DIAGNOSIS_COLUMNS:
        c = report["conditions"][cond]
        out[cond] = {
            "flip_rate": c["flip_rate"],
            "js": c["js"]["mean"],
            "js_std": c["js"]["std"],
            "accuracy": c["accuracy"],
            "clean_accuracy": c["clean_accuracy"],
            "causal_effect": c["causal_effect"]["mean"],
            "items": c["items"],
            "held_out": cond == HELD_OUT,
            "in_augmentation": seen,
        }
    return out


# --- report ----------------------------------------------------------------------------------------


def chance_level(task: InterferenceTask) -> float:
    """Accuracy of a random guess: every answer is one of the task's colours, classes balanced."""
    return 1.0 / len(task.colours)


def format_table(results: dict, chance: Optional[float] = None) -> str:
    """A Markdown table: one row per method, one column per evaluation set (accuracy in %), and a
    last row with the chance level when ``chance`` is given."""
    labels = dict(METHODS)
    header = "| method | " + " | ".join(title for _, title in EVAL_COLUMNS) + " | train s |"
    lines = [header, "|" + "---|" * (len(EVAL_COLUMNS) + 2)]
    for method, res in results.items():
        cells = [f"{100 * res['accuracy'][key]:.1f}" for key, _ in EVAL_COLUMNS]
        lines.append(f"| {labels[method]} | " + " | ".join(cells) + f" | {res['train_seconds']:.0f} |")
    if chance is not None:
        cells = [f"{100 * chance:.1f}"] * len(EVAL_COLUMNS)
        lines.append("| chance (a random colour) | " + " | ".join(cells) + " | - |")
    return "\n".join(lines)


def format_diagnosis_tables(results: dict) -> str:
    """Two Markdown tables (flip rate in %, then JS in 10^-3 nats): one row per method, one column
    per interference of :data:`DIAGNOSIS_COLUMNS`."""
    labels = dict(METHODS)
    header = "| method | " + " | ".join(title for _, title, _ in DIAGNOSIS_COLUMNS) + " |"
    rule = "|" + "---|" * (len(DIAGNOSIS_COLUMNS) + 1)
    blocks = []
    for title, fmt in (
        ("Flip rate (%): the answer differs from the clean answer", lambda d: f"{100 * d['flip_rate']:.1f}"),
        ("JS (10^-3 nats) between the clean and perturbed answer distributions", lambda d: f"{1e3 * d['js']:.1f}"),
    ):
        lines = [title + ":", header, rule]
        for method, res in results.items():
            cells = [fmt(res["diagnosis"][cond]) for cond, _, _ in DIAGNOSIS_COLUMNS]
            lines.append(f"| {labels[method]} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_method_line(method: str, seconds: float, accuracy: dict) -> str:
    """One method's result, with the same method and column names as the table."""
    cells = ", ".join(f"{title} {100 * accuracy[key]:.1f}%" for key, title in EVAL_COLUMNS)
    return f"{dict(METHODS)[method]}: {seconds:.1f} s; {cells}"


def format_diagnosis_line(diagnosis: dict) -> str:
    """One method's diagnosis: flip rate and JS per interference, with the tables' column names."""
    cells = ", ".join(
        f"{title} {100 * diagnosis[cond]['flip_rate']:.1f}% / {1e3 * diagnosis[cond]['js']:.1f}"
        for cond, title, _ in DIAGNOSIS_COLUMNS
    )
    return f"  flip rate / JS (10^-3 nats): {cells}"


def plot_results(results: dict, path: str, chance: Optional[float] = None) -> str:
    """Grouped bar chart of the accuracies (values on the bars, the chance level as a dashed line),
    written with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = dict(METHODS)
    n = len(results)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(11, 5))
    xs = range(len(EVAL_COLUMNS))
    for j, (method, res) in enumerate(results.items()):
        vals = [100 * res["accuracy"][key] for key, _ in EVAL_COLUMNS]
        bars = ax.bar([x + (j - (n - 1) / 2) * width for x in xs], vals, width, label=labels[method])
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    if chance is not None:
        ax.axhline(100 * chance, color="black", lw=0.8, ls="--", label=f"chance ({100 * chance:.0f}%)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([title.replace(": ", ":\n") for _, title in EVAL_COLUMNS], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 110)
    first_text = next(i for i, (_, title) in enumerate(EVAL_COLUMNS) if title.startswith("text-heavy"))
    ax.axvline(first_text - 0.5, color="grey", lw=0.8, ls=":")
    ax.set_title("image-heavy items (left: the image decides) / text-heavy items (right: the note decides)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=n + 1, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the job ---------------------------------------------------------------------------------------


def run_demo(cfg: Optional[DemoConfig] = None, log=print) -> dict:
    """Run the whole demo; returns the results dict that is also written to ``results.json``."""
    cfg = DemoConfig() if cfg is None else cfg
    import importlib.util

    missing = [m for m in ("transformers", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:  # fail before training, not at the plot
        raise RuntimeError(f"the demo needs {' and '.join(missing)}: pip install 'modkern[demo]'")
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)

    probe = InterferenceTask(cfg.task)
    bundle = build_model(cfg, probe)
    task = InterferenceTask(dataclasses.replace(cfg.task, image_size=bundle.image_size, seed=cfg.seed))
    train_set, eval_sets = task.train_set(), task.eval_sets()
    initial = copy.deepcopy(bundle.model.state_dict())
    log(
        f"modkern demo: {bundle.source}, {sum(p.numel() for p in bundle.model.parameters()):,} parameters, "
        f"device {device}; {len(train_set)} training items (captions agree with the image "
        f"{100 * task.config.caption_agree:.0f}% of the time), {cfg.steps} steps x {cfg.batch_size} per method"
    )
    r = cfg.robust
    log(
        f"(c) objective: epsilon {r.epsilon:g}, alpha {r.alpha:g}, {r.step} steps x {r.steps}, {r.norm} ball, "
        f"{r.divergence} consistency x {r.lam:g}; modality mask: {r.policy}"
    )

    results = {}
    for method in cfg.methods:
        model = bundle.model
        model.load_state_dict(initial)
        augmenter = None
        if method != "sft":
            augmenter = HeuristicAugmenter(task.augment_config(cfg.copies_per_sample), seed=cfg.seed)
        collate = RobustCollator(bundle.encode, augmenter, bundle.pad_token_id, normalize_pixels)
        loader = DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        tcfg = TrainConfig(
            steps=cfg.steps,
            lr=cfg.lr,
            warmup_steps=min(cfg.warmup_steps, cfg.steps // 4),
            device=str(device),
            seed=cfg.seed,
            progress=cfg.progress,
            log_every=max(1, cfg.steps // 50),
            save_dir=os.path.join(cfg.out, "checkpoints", method) if cfg.save_checkpoints else None,
        )
        robust = cfg.robust if method == "modkern" else None
        res = train(model, loader, tcfg, robust=robust, desc=dict(METHODS)[method])
        if tcfg.save_dir and isinstance(bundle.tokenizer, WordTokenizer):
            bundle.tokenizer.save(os.path.join(tcfg.save_dir, TOKENIZER_FILE))
        accuracy = evaluate(model, eval_sets, bundle, device)
        diagnosis = diagnose_model(model, eval_sets, bundle, device, seed=cfg.seed)
        results[method] = {
            "accuracy": accuracy,
            "diagnosis": diagnosis,
            "train_seconds": res.seconds,
            "final_loss": res.history[-1] if res.history else None,
            "history": res.history,
            "checkpoint": res.checkpoint,
        }
        log(format_method_line(method, res.seconds, accuracy))
        log(format_diagnosis_line(diagnosis))

    chance = chance_level(task)
    table = format_table(results, chance)
    diagnosis_tables = format_diagnosis_tables(results)
    out = {
        "table": table,
        "diagnosis_tables": diagnosis_tables,
        "chance": chance,
        "held_out": {
            "condition": HELD_OUT,
            "accuracy_column": "misleading_note",
            "template": MISLEADING_NOTE,
            "why": "misleading text in a template the heuristic augmentation never shows in training "
            "(modkern.data.InterferenceTask.augment_config refuses it): generalization beyond the heuristics",
        },
        "results": results,
        "config": _jsonable(cfg),
        "device": str(device),
        "torch": torch.__version__,
        "wall_seconds": time.perf_counter() - start,
    }
    json_path = os.path.join(cfg.out, "results.json")
    png_path = os.path.join(cfg.out, "results.png")
    plot_results(results, png_path, chance)
    out["wall_seconds"] = time.perf_counter() - start
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    log("")
    log(f"Accuracy (%) on {task.config.eval_size} items per column:")
    log(table)
    log(
        "image-heavy items: the image decides; no interference = a caption that agrees with it, misleading "
        "text = a caption naming another colour, unrelated text = an unrelated fact naming another colour. "
        "misleading note (held out) = a note naming another colour for the picture, a template the "
        "augmentation never shows. text-heavy items: the note decides; no interference = an image of the same "
        f"colour, then a swapped (other colour) or a black image. Chance (a random colour of {len(task.colours)}): "
        f"{100 * chance:.0f}%; below it on misleading text or a swapped image, a model follows the interfering input."
    )
    log("")
    log(f"Diagnosis (modkern.diagnose) of the same {task.config.eval_size} clean items per item kind:")
    log(diagnosis_tables)
    log(
        "Augmentation shows misleading / unrelated text and swapped / black / white / noise images in training; "
        "the long irrelevant context and the misleading note (held out) never."
    )
    log(f"\nwrote {json_path} and {png_path} ({out['wall_seconds']:.0f} s in all)")
    return out
