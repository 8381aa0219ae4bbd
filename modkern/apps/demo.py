"""The main job (``modkern train``): modality interference, and what the paper's recipe does about it.

1. Build a tiny LLaVA from a config (random weights, no download) - or load a local checkpoint.
2. Generate the synthetic task of :mod:`modkern.apps.synthetic_task`: the image decides the answer of image-heavy
   items (which carry no text about the image, as the official image-heavy data); the note decides
   the answer of text-heavy items, whose images mostly agree with it (a shortcut).
3. For each seed, train five models from the same initial weights on the same batches:
   (a) plain SFT; (b) SFT + the paper's heuristic augmentation (:mod:`modkern.objective.augment`); (c) the
   paper's objective (augmentation + PGD on the embeddings restricted by the modality mask + KL
   consistency over the official pairs); and its two ablations, (d) augmentation + consistency
   without the attack and (e) augmentation + attack without the consistency term.
4. Evaluate accuracy on clean items and under interferences, and diagnose each model with
   :func:`modkern.apps.diagnose.diagnose` on the same clean items (flip rate and Jensen-Shannon divergence
   under each interference, two held-out forms included: a misleading note and a word list, never
   shown in training); print mean ± sd over the seeds, write ``results.json`` and ``results.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils.data import DataLoader

from modkern.apps.diagnose import Item, diagnose
from modkern.apps.synthetic_task import (
    MISLEADING_NOTE,
    WORD_LIST,
    InterferenceTask,
    TaskConfig,
    TaskEncoder,
    WordTokenizer,
    hf_text_encoder,
)
from modkern.apps.tiny_models import tiny_llava
from modkern.apps.train_loop import TrainConfig, answer_correct, jsonable, load_checkpoint, resolve_device, train
from modkern.objective.augment import HeuristicAugmenter, RobustCollator, collate_samples
from modkern.objective.robust import RobustConfig

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
# The interferences that the heuristic augmentation never shows in training (evaluation only):
# misleading text in a template the augmenter does not use (modkern.apps.synthetic_task.MISLEADING_NOTE) and a
# distractor of another form, a list of unrelated words (modkern.apps.synthetic_task.WORD_LIST). The paper's claim
# for the adversarial + consistency terms is generalization beyond the heuristics.
HELD_OUT = ("mislead_note", "word_list")
# (modkern.apps.diagnose condition, column title, whether the augmentation shows that kind of input).
DIAGNOSIS_COLUMNS = (
    ("mislead_text", "image-heavy: misleading text", True),
    ("unrelated_text", "image-heavy: unrelated text", True),
    ("long_irrelevant_context", "image-heavy: long irrelevant context", True),
    ("mislead_note", "image-heavy: misleading note (held out)", False),
    ("word_list", "image-heavy: word list (held out)", False),
    ("swap_image", "text-heavy: swapped image", True),
    ("black_image", "text-heavy: black image", True),
    ("white_image", "text-heavy: white image", True),
    ("noise_image", "text-heavy: noise image", True),
)
METHODS = (
    ("sft", "(a) SFT"),
    ("sft_aug", "(b) SFT + paper augmentation"),
    ("modkern", "(c) aug. + PGD + consistency (the paper)"),
    ("consistency_only", "(d) aug. + consistency, no attack"),
    ("attack_only", "(e) aug. + PGD, no consistency"),
)


def default_robust() -> RobustConfig:
    """The objective of run (c): modkern's defaults, the official LLaVA-1.5 KL + PGD recipe (epsilon
    1e-3, alpha 0.1, raw-gradient steps, Linf projection, K = 2, KL(Q||P) consistency over the copies'
    clean and every row's adversarial forward, lambda 0.01 per clean sample), with the paper's modality
    mask (image-heavy: text, text-heavy: image)."""
    return RobustConfig()


def method_objective(method: str, robust: RobustConfig) -> Optional[RobustConfig]:
    """The objective of a method: None (plain CE) for (a) and (b); ``robust`` for (c); the paper's
    ablations for (d) (the copies' consistency, no attack and no adversarial forward) and (e) (the
    attack and the adversarial CE, no consistency)."""
    return {
        "sft": None,
        "sft_aug": None,
        "modkern": robust,
        "consistency_only": robust.replace(pairs="heuristic"),
        "attack_only": robust.replace(lam=0.0),
    }[method]


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo` (the CLI options map onto these).

    Every method trains ``steps`` x ``batch_size`` clean items (plus their copies) from the same
    initial weights on the same batches, once per seed of ``seeds``; the tables give mean ± sd over
    the seeds. ``paragraph_sentences``: sentences of the unrelated-paragraph copy (the paper's 10;
    the demo uses 4 to fit its time budget). ``threads``: CPU threads of torch (None: see
    :func:`cpu_threads`). The task's image-heavy items carry no caption
    (``TaskConfig(caption_rate=0.0)``), as the official image-heavy data has no text about the image:
    text in front of an image question only appears in the copies and as an interference.
    """

    steps: int = 160
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 10
    seeds: tuple = (0, 1, 2)
    out: str = "runs/demo"
    device: str = "auto"
    model: Optional[str] = None
    quick: bool = False
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    paragraph_sentences: int = 4
    task: TaskConfig = field(default_factory=lambda: TaskConfig(caption_rate=0.0))
    robust: RobustConfig = field(default_factory=default_robust)
    methods: tuple = tuple(m for m, _ in METHODS)
    progress: bool = True
    save_checkpoints: bool = True
    threads: Optional[int] = None

    def __post_init__(self):
        if self.threads is not None and (isinstance(self.threads, bool) or int(self.threads) < 1):
            raise ValueError(f"threads must be None (auto) or an integer >= 1, got {self.threads!r}")
        if self.quick:  # a smoke run for tests: a smaller model, task and schedule
            self.steps = min(self.steps, 12)
            self.batch_size = min(self.batch_size, 8)
            self.hidden_size, self.num_layers, self.num_heads = 32, 1, 2
            self.task = dataclasses.replace(self.task, train_size=128, eval_size=16)
            self.seeds = tuple(self.seeds)[:2]
        unknown = set(self.methods) - {m for m, _ in METHODS}
        if unknown:
            raise ValueError(f"methods: unknown {sorted(unknown)}; choose from {[m for m, _ in METHODS]}")
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")


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


def build_model(cfg: DemoConfig, task: InterferenceTask, seed: int = 0) -> ModelBundle:
    """The tiny LLaVA of the demo (initial weights from ``seed``), or the local checkpoint at ``cfg.model``."""
    if cfg.model is None:
        tok = task.tokenizer()
        model, info = tiny_llava(
            len(tok),
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            image_size=task.config.image_size,
            seed=seed,
        )
        if info["image_token_id"] != tok.image_token_id or info["bos_token_id"] != tok.bos_token_id:
            raise RuntimeError("modkern.apps.tiny_models and WordTokenizer disagree on the special token ids")
        encode = TaskEncoder(tok.encode, tok.image_token_id, info["num_image_tokens"], tok.bos_token_id)
        return ModelBundle(model, encode, tok.pad_token_id, info["image_size"], tok, "tiny_llava (random weights)")

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
    (:func:`modkern.apps.diagnose.diagnose`, black-box part) on the clean evaluation items
    (``clean`` image-heavy, ``text_clean`` text-heavy): per condition ``flip_rate``, ``js`` (mean
    over items of the per-item mean over answer tokens) and ``js_std``, ``accuracy``,
    ``clean_accuracy``, ``causal_effect`` (mean), ``items``, ``held_out`` and ``in_augmentation``."""

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
            "held_out": cond in HELD_OUT,
            "in_augmentation": seen,
        }
    return out


# --- report ----------------------------------------------------------------------------------------


def chance_level(task: InterferenceTask) -> float:
    """Accuracy of a random guess: every answer is one of the task's colours, classes balanced."""
    return 1.0 / len(task.colours)


def mean_sd(values) -> dict:
    """``{"mean", "sd", "values"}`` of a list of numbers (sample sd, 0 for one value)."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "values": values}


def summarize(runs: dict) -> dict:
    """Per method, mean ± sd over the seeds of ``runs[seed][method]``: every accuracy column, and
    flip rate, JS and accuracy of every diagnosis condition."""
    seeds = list(runs)
    summary = {}
    for method in runs[seeds[0]]:
        per_seed = [runs[s][method] for s in seeds]
        summary[method] = {
            "accuracy": {key: mean_sd([r["accuracy"][key] for r in per_seed]) for key, _ in EVAL_COLUMNS},
            "diagnosis": {
                cond: {q: mean_sd([r["diagnosis"][cond][q] for r in per_seed]) for q in ("flip_rate", "js", "accuracy")}
                for cond, _, _ in DIAGNOSIS_COLUMNS
            },
            "train_seconds": mean_sd([r["train_seconds"] for r in per_seed]),
        }
    return summary


def _cell(stat: dict, scale: float) -> str:
    return f"{scale * stat['mean']:.1f} ± {scale * stat['sd']:.1f}"


def format_table(summary: dict, chance: Optional[float] = None) -> str:
    """Markdown: one row per method, one column per evaluation set (accuracy in %, mean ± sd over
    the seeds), the training seconds, and a last row with the chance level when ``chance`` is given."""
    labels = dict(METHODS)
    lines = [
        "| method | " + " | ".join(t for _, t in EVAL_COLUMNS) + " | train s |",
        "|" + "---|" * (len(EVAL_COLUMNS) + 2),
    ]
    for method, res in summary.items():
        cells = [_cell(res["accuracy"][key], 100) for key, _ in EVAL_COLUMNS]
        lines.append(f"| {labels[method]} | " + " | ".join(cells) + f" | {res['train_seconds']['mean']:.0f} |")
    if chance is not None:
        lines.append(
            "| chance (a random colour) | " + " | ".join([f"{100 * chance:.1f}"] * len(EVAL_COLUMNS)) + " | - |"
        )
    return "\n".join(lines)


DIAGNOSIS_QUANTITIES = (
    ("flip_rate", 100, "Flip rate (%, mean ± sd over seeds): the answer differs from the clean answer"),
    ("js", 1e3, "JS (10^-3 nats, mean ± sd over seeds) between the clean and perturbed answer distributions"),
)


def format_diagnosis_tables(summary: dict) -> str:
    """Markdown tables of :data:`DIAGNOSIS_QUANTITIES`: one row per method, one column per
    interference of :data:`DIAGNOSIS_COLUMNS`, mean ± sd over the seeds."""
    labels = dict(METHODS)
    header = "| method | " + " | ".join(title for _, title, _ in DIAGNOSIS_COLUMNS) + " |"
    rule = "|" + "---|" * (len(DIAGNOSIS_COLUMNS) + 1)
    blocks = []
    for quantity, scale, title in DIAGNOSIS_QUANTITIES:
        lines = [title + ":", header, rule]
        for method, res in summary.items():
            cells = [_cell(res["diagnosis"][cond][quantity], scale) for cond, _, _ in DIAGNOSIS_COLUMNS]
            lines.append(f"| {labels[method]} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_run_line(seed: int, method: str, seconds: float, accuracy: dict, diagnosis: dict) -> str:
    """One run's result (accuracy and flip rate in %), with the tables' method and column names."""
    acc = ", ".join(f"{title} {100 * accuracy[key]:.1f}" for key, title in EVAL_COLUMNS)
    flips = ", ".join(f"{title} {100 * diagnosis[c]['flip_rate']:.1f}" for c, title, _ in DIAGNOSIS_COLUMNS)
    return f"seed {seed} {dict(METHODS)[method]}: {seconds:.1f} s; accuracy (%): {acc}; flip rate (%): {flips}"


def plot_results(summary: dict, path: str, chance: Optional[float] = None) -> str:
    """Two panels with error bars (sd over the seeds): the flip rate under each interference (the
    held-out ones hatched) and the accuracy per evaluation set (chance as a dashed line); matplotlib's
    Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = dict(METHODS)
    n = len(summary)
    width = 0.8 / max(n, 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(13, 9))
    panels = (
        (
            top,
            [(c, t, not seen) for c, t, seen in DIAGNOSIS_COLUMNS],
            lambda r, c: r["diagnosis"][c]["flip_rate"],
            "flip rate (%)",
        ),
        (bottom, [(k, t, "held out" in t) for k, t in EVAL_COLUMNS], lambda r, k: r["accuracy"][k], "accuracy (%)"),
    )
    for ax, columns, stat, ylabel in panels:
        xs = range(len(columns))
        for j, (method, res) in enumerate(summary.items()):
            means = [100 * stat(res, c)["mean"] for c, _, _ in columns]
            sds = [100 * stat(res, c)["sd"] for c, _, _ in columns]
            pos = [x + (j - (n - 1) / 2) * width for x in xs]
            bars = ax.bar(pos, means, width, yerr=sds, capsize=2, label=labels[method], color=f"C{j}")
            for bar, (_, _, held) in zip(bars, columns):
                if held:
                    bar.set_hatch("//")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([t.replace(": ", ":\n") for _, t, _ in columns], fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 110)
    if chance is not None:
        bottom.axhline(100 * chance, color="black", lw=0.8, ls="--", label=f"chance ({100 * chance:.0f}%)")
    seeds = len(next(iter(summary.values()))["train_seconds"]["values"])
    top.set_title(
        f"flip rate under each interference (hatched: held out, never in training); mean ± sd over {seeds} seeds"
    )
    bottom.set_title("accuracy per evaluation set")
    bottom.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the job ---------------------------------------------------------------------------------------


def cpu_threads(requested: Optional[int] = None) -> int:
    """CPU threads for the demo: ``requested``, else torch's default less the cores other processes
    keep busy (the 1-minute load average), at least 1. The tiny models' operators are short: threads
    that wait for a core another process holds spin instead of working (measured on 2 cores next to a
    busy torch process: 2 threads 3.9x slower than alone, 1 thread 1.9x)."""
    if requested is not None:
        return int(requested)
    default = torch.get_num_threads()
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average on this platform
        return default
    return max(1, min(default, (os.cpu_count() or default) - busy))


def _check_requirements():
    import importlib.util

    missing = [m for m in ("transformers", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:  # fail before training, not at the plot
        raise RuntimeError(f"the demo needs {' and '.join(missing)}: pip install 'modkern[demo]'")


def train_method(cfg: DemoConfig, bundle: ModelBundle, task: InterferenceTask, method: str, seed: int, device) -> dict:
    """Train ``bundle.model`` (already at its initial weights) with ``method`` on ``task``'s training
    set; returns the training result's summary, the checkpoint and the accuracy / diagnosis."""
    augmenter = None
    if method != "sft":
        augmenter = HeuristicAugmenter(task.augment_config(paragraph_sentences=cfg.paragraph_sentences), seed=seed)
    collate = RobustCollator(bundle.encode, augmenter, bundle.pad_token_id, normalize_pixels)
    loader = DataLoader(
        task.train_set(),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    save = cfg.save_checkpoints and seed == cfg.seeds[0]
    tcfg = TrainConfig(
        steps=cfg.steps,
        lr=cfg.lr,
        warmup_steps=min(cfg.warmup_steps, cfg.steps // 4),
        device=str(device),
        seed=seed,
        progress=cfg.progress,
        log_every=max(1, cfg.steps // 50),
        save_dir=os.path.join(cfg.out, "checkpoints", method) if save else None,
    )
    desc = f"seed {seed} {dict(METHODS)[method]}"
    res = train(bundle.model, loader, tcfg, robust=method_objective(method, cfg.robust), desc=desc)
    if tcfg.save_dir and isinstance(bundle.tokenizer, WordTokenizer):
        bundle.tokenizer.save(os.path.join(tcfg.save_dir, TOKENIZER_FILE))
    eval_sets = task.eval_sets()
    return {
        "accuracy": evaluate(bundle.model, eval_sets, bundle, device),
        "diagnosis": diagnose_model(bundle.model, eval_sets, bundle, device, seed=seed),
        "train_seconds": res.seconds,
        "final_loss": res.history[-1] if res.history else None,
        "history": res.history,
        "checkpoint": res.checkpoint,
    }


def run_seed(cfg: DemoConfig, seed: int, device, log=print) -> tuple[dict, InterferenceTask, ModelBundle]:
    """Every method of ``cfg`` from the same initial weights (``seed``) on the same batches."""
    probe = InterferenceTask(cfg.task)
    bundle = build_model(cfg, probe, seed)
    task = InterferenceTask(dataclasses.replace(cfg.task, image_size=bundle.image_size, seed=seed))
    if seed == cfg.seeds[0]:
        log(_describe(cfg, bundle, task, device))
    initial = copy.deepcopy(bundle.model.state_dict())
    results = {}
    for method in cfg.methods:
        bundle.model.load_state_dict(initial)
        results[method] = run = train_method(cfg, bundle, task, method, seed, device)
        log(format_run_line(seed, method, run["train_seconds"], run["accuracy"], run["diagnosis"]))
    return results, task, bundle


def _describe(cfg: DemoConfig, bundle: ModelBundle, task: InterferenceTask, device) -> str:
    r, t = cfg.robust, task.config
    captions = (
        "image-heavy items without captions"
        if t.caption_rate == 0
        else f"{100 * t.caption_rate:.0f}% of image-heavy items with a caption agreeing {100 * t.caption_agree:.0f}%"
    )
    return (
        f"modkern demo: {bundle.source}, {sum(p.numel() for p in bundle.model.parameters()):,} parameters, "
        f"device {device}{f', threads: {torch.get_num_threads()}' if device.type == 'cpu' else ''}; "
        f"{t.train_size} training items ({captions}; text-heavy images agree with the note "
        f"{100 * t.image_agree:.0f}%), {cfg.steps} steps x {cfg.batch_size} per method, seeds {list(cfg.seeds)}\n"
        f"(c) objective: epsilon {r.epsilon:g}, alpha {r.alpha:g}, {r.step} steps x {r.steps}, {r.norm} ball, "
        f"{r.divergence} ({r.kl_direction}) consistency over the {r.pairs} pairs x {r.lam:g} per clean sample; "
        f"modality mask: {r.policy}"
    )


def run_demo(cfg: Optional[DemoConfig] = None, log=print) -> dict:
    """Run the whole demo; returns the results dict that is also written to ``results.json``."""
    cfg = DemoConfig() if cfg is None else cfg
    _check_requirements()
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.threads))
    os.makedirs(cfg.out, exist_ok=True)
    runs = {}
    for seed in cfg.seeds:
        runs[seed], task, bundle = run_seed(cfg, seed, device, log=log)
    summary = summarize(runs)
    chance = chance_level(task)
    out = {
        "table": format_table(summary, chance),
        "diagnosis_tables": format_diagnosis_tables(summary),
        "chance": chance,
        "held_out": {
            "conditions": list(HELD_OUT),
            "accuracy_column": "misleading_note",
            "templates": {"mislead_note": MISLEADING_NOTE, "word_list": WORD_LIST},
            "why": "interferences in forms the heuristic augmentation never shows in training "
            "(modkern.apps.synthetic_task.InterferenceTask.augment_config refuses them): "
            "generalization beyond the heuristics",
        },
        "summary": summary,
        "runs": {str(s): r for s, r in runs.items()},
        "config": jsonable(cfg),
        "device": str(device),
        "torch": torch.__version__,
    }
    json_path, png_path = os.path.join(cfg.out, "results.json"), os.path.join(cfg.out, "results.png")
    plot_results(summary, png_path, chance)
    out["wall_seconds"] = time.perf_counter() - start
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    _print_tables(out, task, len(cfg.seeds), log)
    log(f"\nwrote {json_path} and {png_path} ({out['wall_seconds']:.0f} s in all)")
    return out


def _print_tables(out: dict, task: InterferenceTask, seeds: int, log):
    log("")
    log(f"Accuracy (%, mean ± sd over {seeds} seeds) on {task.config.eval_size} items per column:")
    log(out["table"])
    log(
        "image-heavy items: the image decides; no interference = the question alone (a caption that agrees "
        "with the image when the task has captions), misleading text = a caption naming another colour, "
        "unrelated text = an unrelated fact naming another colour, misleading note (held out) = a note naming "
        "another colour for the picture, a template the augmentation never shows. text-heavy items: the note "
        "decides; no interference = an image of the same colour, then a swapped (other colour) or a black image. "
        f"Chance: {100 * out['chance']:.0f}%."
    )
    log("")
    log(f"Diagnosis (modkern.apps.diagnose) of the same {task.config.eval_size} clean items per item kind:")
    log(out["diagnosis_tables"])
    log(
        "In training the augmentation shows related / unrelated text (a paragraph of facts) and swapped / black / "
        "white images, with noise as the text-heavy clean image; the misleading note and the word list "
        "(held out) never."
    )
