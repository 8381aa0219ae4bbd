"""``modkern train --av``: the three-modality demo of MMA-Bench's modality alignment tuning, on CPU in minutes.

A synthetic audio-video task generated in code: a clip is a few video frames of one colour and a tone
whose mel band names a colour (:func:`modkern.apps.diagnose.items.av_tone`); a question asks for the
colour of the video or of the sound. Training clips are aligned (both streams the same colour), as
most real clips are, so a model can answer either question from either stream: the shortcut
MMA-Bench finds in real models. On the embedded tiny Qwen2.5-Omni thinker (random weights), the same
initial weights and batches per seed:

* ``sft``: the clean clips only (plain CE);
* ``align``: + the alignment copies (:mod:`modkern.objective.alignment`: the other clip's audio or
  frames, the audio removed, the frames zeroed, a misleading caption "caption : the video is
  {another colour} ."; the target follows the queried stream);
* ``align_robust``: + the robust objective (PGD on the stream the question does not ask about,
  KL consistency of the copies that keep their answer; :data:`ALIGNMENT_POLICY`).

Evaluated on fresh clips: clean, misaligned (the other stream from another colour), removed audio
(video questions), zeroed frames (sound questions), and a held-out interference: misleading text in
a template no training copy has ("note : this video is {another colour} ."). Mean ± sd over the seeds.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils.data import DataLoader

from modkern.apps.diagnose.items import AUDIO_QUESTION, VIDEO_QUESTION, Item, av_tone, task_words
from modkern.apps.diagnose.models import Collator, ModelSpec
from modkern.apps.synthetic_task import InterferenceTask, TaskConfig, WordTokenizer
from modkern.apps.tiny_models import tiny_qwen2_5_omni
from modkern.apps.train_loop import TrainConfig, answer_correct, resolve_device, train
from modkern.objective.alignment import (
    ALIGNMENT_COPIES,
    ALIGNMENT_POLICY,
    AlignmentAugmenter,
    AlignmentConfig,
    AVSample,
)
from modkern.objective.augment import RobustCollator
from modkern.objective.config import RobustConfig

METHODS = (("sft", "SFT"), ("align", "alignment tuning"), ("align_robust", "alignment tuning + robust objective"))
EVAL_SETS = ("clean", "misaligned", "removed_audio", "zeroed_frames", "caption_held_out")
HELD_OUT_CAPTION = "note : this {stream} is {label} ."


@dataclass
class AVDemoConfig:
    """Settings of :func:`run_av_demo`: ``steps`` optimizer steps of ``batch_size`` clean clips (plus
    copies) per method and seed; ``eval_size`` clips per question kind and evaluation set."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 3e-3
    num_layers: int = 1
    seeds: tuple = (0, 1, 2)
    frames: int = 2
    mel_bins: int = 8
    audio_frames: int = 16
    eval_size: int = 32
    out: str = "runs/av_demo"
    device: str = "cpu"
    progress: bool = True
    workers: Optional[int] = None  # seeds trained in parallel processes (None: one per CPU core, at most one per seed)
    robust: RobustConfig = field(default_factory=lambda: RobustConfig(policy=ALIGNMENT_POLICY, epsilon=0.05, lam=0.1))


class AVTask:
    """Clips of the synthetic audio-video task (seeded)."""

    def __init__(self, cfg: AVDemoConfig, seed: int):
        self.cfg = cfg
        self.images = InterferenceTask(TaskConfig(image_size=16, seed=seed))
        self.colours = tuple(self.images.colours)
        self.gen = torch.Generator().manual_seed(seed * 7919 + 3)

    def clip(self, kind: str, visual: int, audio: int) -> AVSample:
        cfg, nc = self.cfg, len(self.colours)
        video = torch.stack([self.images.image(self.colours[visual], self.gen) for _ in range(cfg.frames)])
        tone = av_tone(audio, nc, cfg.mel_bins, cfg.audio_frames, self.gen)
        question = VIDEO_QUESTION if kind == "av_visual" else AUDIO_QUESTION
        vis, aud = self.colours[visual], self.colours[audio]
        answer = vis if kind == "av_visual" else aud
        return AVSample(question, kind, video, tone, answer, visual_label=vis, audio_label=aud)

    def aligned(self, n: int) -> list:
        """``n`` aligned clips, question kinds and colours alternating."""
        nc = len(self.colours)
        return [self.clip(("av_visual", "av_audio")[i % 2], (i // 2) % nc, (i // 2) % nc) for i in range(n)]

    def eval_sets(self) -> dict:
        nc, n = len(self.colours), self.cfg.eval_size
        clean = self.aligned(2 * n)
        misaligned = [
            self.clip(("av_visual", "av_audio")[i % 2], (i // 2) % nc, (i // 2 + 1 + i % (nc - 1)) % nc)
            for i in range(2 * n)
        ]
        removed = [dataclasses.replace(s, audio=None) for s in clean if s.kind == "av_visual"]
        zeroed = [dataclasses.replace(s, video=torch.zeros_like(s.video)) for s in clean if s.kind == "av_audio"]
        caption = []
        for i, s in enumerate(clean):
            wrong = self.colours[(self.colours.index(s.answer) + 1 + i % (nc - 1)) % nc]
            stream = "video" if s.kind == "av_visual" else "sound"
            text = HELD_OUT_CAPTION.format(stream=stream, label=wrong)
            caption.append(dataclasses.replace(s, context=text))
        return dict(zip(EVAL_SETS, (clean, misaligned, removed, zeroed, caption)))


def tokenizer() -> WordTokenizer:
    extra = [HELD_OUT_CAPTION.format(stream="video", label=""), "sound", "note", "caption", "the"]
    return WordTokenizer(task_words() + [w for t in extra for w in WordTokenizer.split(t)])


class ClipCollator:
    """:class:`AVSample` s -> a model batch (the diagnosis' Omni collator) with ``sample_kind``."""

    def __init__(self, spec: ModelSpec, tok: WordTokenizer):
        self.items = Collator(spec, tok)

    def __call__(self, samples) -> dict:
        items = [Item(s.question, s.answer, s.kind, s.context, video=s.video, audio=s.audio) for s in samples]
        batch = self.items(items)
        batch["sample_kind"] = [s.kind for s in samples]
        return batch


def accuracy(model, samples, collate, device, batch_size: int = 64) -> float:
    model.eval()
    hits = []
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            batch = {
                k: v.to(device) if isinstance(v, torch.Tensor) else v
                for k, v in collate(samples[i : i + batch_size]).items()
            }
            batch.pop("sample_kind")
            hits.append(answer_correct(model, batch).cpu())
    model.train()
    return float(torch.cat(hits).float().mean())


def run_seed(cfg: AVDemoConfig, seed: int, log=print) -> dict:
    """Every method from the same initial weights on the same clean batches; accuracy per eval set."""
    tok = tokenizer()
    model, _ = tiny_qwen2_5_omni(len(tok) + 7, num_layers=cfg.num_layers, num_mel_bins=cfg.mel_bins, seed=seed)
    spec = ModelSpec.from_model(model)
    collate = ClipCollator(spec, tok)
    task = AVTask(cfg, seed)
    train_set, eval_sets = task.aligned(cfg.steps * cfg.batch_size), task.eval_sets()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    device = resolve_device(cfg.device)
    results = {}
    for method, label in METHODS:
        model.load_state_dict(initial)
        alignment = AlignmentConfig(copies=ALIGNMENT_COPIES, classes=tuple(task.colours))
        augmenter = None if method == "sft" else AlignmentAugmenter(alignment, seed=seed)
        loader = DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            shuffle=True,
            collate_fn=RobustCollator(augmenter=augmenter, collate=collate),
            generator=torch.Generator().manual_seed(seed),
        )
        tcfg = TrainConfig(
            steps=cfg.steps, lr=cfg.lr, warmup_steps=5, device=str(device), seed=seed, progress=cfg.progress
        )
        start = time.perf_counter()
        train(model, loader, tcfg, robust=cfg.robust if method == "align_robust" else None, desc=f"seed {seed} {label}")
        acc = {name: accuracy(model, samples, collate, device) for name, samples in eval_sets.items()}
        results[method] = {"accuracy": acc, "seconds": time.perf_counter() - start}
        log(f"seed {seed} {label:<38} " + " ".join(f"{k} {100 * v:5.1f}%" for k, v in acc.items()))
    return results


def summarize(runs: list) -> dict:
    out = {}
    for method, _ in METHODS:
        out[method] = {}
        for name in EVAL_SETS:
            vals = torch.tensor([r[method]["accuracy"][name] for r in runs], dtype=torch.float64)
            out[method][name] = {"mean": float(vals.mean()), "sd": float(vals.std()) if len(runs) > 1 else 0.0}
    return out


def format_table(summary: dict, seeds: int) -> str:
    head = f"{'accuracy, % (mean ± sd over ' + str(seeds) + ' seeds)':<40}" + "".join(f"{n:>18}" for n in EVAL_SETS)
    lines = [head]
    for method, label in METHODS:
        cells = "".join(f"{100 * c['mean']:>10.1f} ± {100 * c['sd']:<5.1f}" for c in summary[method].values())
        lines.append(f"{label:<40}" + cells)
    return "\n".join(lines)


def _seed_worker(cfg: AVDemoConfig, seed: int) -> tuple:
    torch.set_num_threads(1)  # tiny tensors: one thread per process, the seeds spread over the cores
    lines = []
    return run_seed(cfg, seed, lines.append), lines


def _run_seeds(cfg: AVDemoConfig, log) -> list:
    """Every seed: in this process with ``workers == 1``, else in parallel processes (each seed's lines
    printed when it ends)."""
    workers = cfg.workers or min(len(cfg.seeds), os.cpu_count() or 1)
    if workers <= 1:
        return [run_seed(cfg, seed, log) for seed in cfg.seeds]
    quiet = dataclasses.replace(cfg, progress=False)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_seed_worker, quiet, seed) for seed in cfg.seeds]
        runs = []
        for future in futures:
            result, lines = future.result()
            for line in lines:
                log(line)
            runs.append(result)
    return runs


def run_av_demo(cfg: AVDemoConfig = None, log=print) -> dict:
    """All seeds and methods; prints the table and writes ``out/av_results.json``."""
    cfg = cfg or AVDemoConfig()
    start = time.perf_counter()
    log(
        f"three-modality demo: tiny Qwen2.5-Omni thinker, {cfg.steps} steps x {cfg.batch_size} clips per method, "
        f"seeds {list(cfg.seeds)}"
    )
    runs = _run_seeds(cfg, log)
    summary = summarize(runs)
    log(format_table(summary, len(cfg.seeds)))
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "robust"}
    out = {
        "summary": summary,
        "runs": runs,
        "seeds": list(cfg.seeds),
        "settings": {**settings, "robust": dataclasses.asdict(cfg.robust)},
        "seconds": time.perf_counter() - start,
    }
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "av_results.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    log(f"wrote {os.path.join(cfg.out, 'av_results.json')} ({out['seconds']:.0f} s)")
    return out
