"""MMA-Bench's modality alignment tuning (arXiv 2511.22826): audio-video copies whose target follows the question.

MMA-Bench finds that multimodal models answer a question about the video from the sound (or the
reverse) when the two disagree, and are swayed by misleading text; its remedy is to train on
samples that teach *which* stream to use: the answer always follows the modality the question asks
about, whatever the other stream says. For an audio-video sample (:class:`AVSample`; ``kind``
``"av_visual"`` - the question asks about the frames - or ``"av_audio"`` - about the sound), the
copies (:data:`ALIGNMENT_COPIES`, made on the sample, before any processing) are:

* ``misaligned_audio``: the audio of another clip with another sound label. A visual question keeps
  its answer (the sound must be ignored); a sound question now has the other clip's sound label.
* ``misaligned_video``: the frames of another clip with another visual label; the mirror image.
* ``removed_audio``: no audio. A visual question keeps its answer; a sound question has none, so the
  copy is made only with ``AlignmentConfig.no_audio_answer`` (e.g. ``"none"``) as its target.
* ``zeroed_frames``: every frame zero. A sound question keeps its answer; a visual one only with
  ``no_video_answer``.
* ``misleading_caption``: a caption before the question naming, as the queried stream's content,
  a label other than the answer; the answer is unchanged (the text must be ignored).

A copy whose answer is its clean sample's pairs with it in ``ref_index`` (the consistency term
compares their answer distributions); a copy whose answer changed is a sample of its own
(``ref_index`` -1). The modality mask of the robust objective perturbs the stream the question
does not ask about: :data:`ALIGNMENT_POLICY` as ``RobustConfig(policy=...)``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

AV_KINDS = ("av_visual", "av_audio")
# The stream each kind's question asks about, and the one the attack perturbs (the other one).
QUERIED = {"av_visual": "video", "av_audio": "audio"}
ALIGNMENT_POLICY = {"av_visual": "audio", "av_audio": "video"}
ALIGNMENT_COPIES = ("misaligned_audio", "misaligned_video", "removed_audio", "zeroed_frames", "misleading_caption")
DEFAULT_COPIES = ALIGNMENT_COPIES[:4]
CAPTION_TEMPLATE = "caption : the {stream} is {label} ."


@dataclass(frozen=True)
class AVSample:
    """An audio-video sample: ``video`` ``[T, 3, H, W]`` in [0, 1], ``audio`` features (or None when
    removed), the label of each stream, and the question about one of them (``kind``). The answer
    is the queried stream's label."""

    question: str
    kind: str
    video: Optional[Tensor]
    audio: Optional[Tensor]
    visual_label: str
    audio_label: str
    context: str = ""
    tag: str = "clean"

    def __post_init__(self):
        if self.kind not in AV_KINDS:
            raise ValueError(f"kind must be one of {AV_KINDS}, got {self.kind!r}")

    @property
    def answer(self) -> str:
        return self.visual_label if self.kind == "av_visual" else self.audio_label

    @property
    def prompt(self) -> str:
        return f"{self.context} {self.question}" if self.context else self.question


@dataclass
class AlignmentConfig:
    """Which alignment copies to make (:data:`ALIGNMENT_COPIES`; default the four stream copies),
    the targets of questions about a removed stream (None: no such copy), the caption template
    (``{stream}``: "video" / "sound", ``{label}``) and the labels a caption may name."""

    copies: tuple = DEFAULT_COPIES
    no_audio_answer: Optional[str] = None
    no_video_answer: Optional[str] = None
    caption_template: str = CAPTION_TEMPLATE
    classes: tuple = ()

    def __post_init__(self):
        self.copies = tuple(self.copies)
        unknown = [c for c in self.copies if c not in ALIGNMENT_COPIES]
        if unknown:
            raise ValueError(f"copies: unknown alignment copies {unknown}; choose from {ALIGNMENT_COPIES}")
        if "misleading_caption" in self.copies and len(self.classes) < 2:
            raise ValueError("classes: misleading_caption needs at least two labels to name a wrong one")


class AlignmentAugmenter:
    """Makes the alignment copies of a batch of :class:`AVSample` (deterministic for a ``seed``);
    the augmenter protocol of :class:`modkern.objective.augment.RobustCollator`."""

    def __init__(self, config: Optional[AlignmentConfig] = None, seed: int = 0):
        self.config = config or AlignmentConfig()
        self.rng = random.Random(seed)

    def clean(self, samples: Sequence[AVSample]) -> list:
        return list(samples)

    def __call__(self, samples: Sequence[AVSample]) -> tuple[list, list]:
        """``(copies, sources)``: each copy and its clean sample's index, -1 where its answer changed."""
        copies, sources = [], []
        for i, s in enumerate(samples):
            for name in self.config.copies:
                copy = self.make(name, samples, i)
                if copy is not None:
                    copies.append(copy)
                    sources.append(i if copy.answer == s.answer else -1)
        return copies, sources

    def make(self, name: str, samples: Sequence[AVSample], i: int) -> Optional[AVSample]:
        """Copy ``name`` of ``samples[i]``, or None when it cannot be made (no donor of another
        label in the batch, no target for a question about a removed stream)."""
        s, cfg = samples[i], self.config
        if name in ("misaligned_audio", "misaligned_video"):
            stream, label = ("audio", "audio_label") if name == "misaligned_audio" else ("video", "visual_label")
            donors = [o for j, o in enumerate(samples) if j != i and getattr(o, stream) is not None]
            donors = [o for o in donors if getattr(o, label) != getattr(s, label)]
            if getattr(s, stream) is None or not donors:
                return None
            d = self.rng.choice(donors)
            return dataclasses.replace(s, **{stream: getattr(d, stream), label: getattr(d, label)}, tag=name)
        if name == "removed_audio":
            if s.kind == "av_audio" and cfg.no_audio_answer is None:
                return None
            target = cfg.no_audio_answer if s.kind == "av_audio" else s.audio_label
            return dataclasses.replace(s, audio=None, audio_label=target, tag=name)
        if name == "zeroed_frames":
            if s.video is None or (s.kind == "av_visual" and cfg.no_video_answer is None):
                return None
            target = cfg.no_video_answer if s.kind == "av_visual" else s.visual_label
            return dataclasses.replace(s, video=torch.zeros_like(s.video), visual_label=target, tag=name)
        if name == "misleading_caption":
            wrong = self.rng.choice([c for c in cfg.classes if c != s.answer])
            stream = "video" if s.kind == "av_visual" else "sound"
            caption = cfg.caption_template.format(stream=stream, label=wrong)
            return dataclasses.replace(s, context=f"{s.context} {caption}".strip(), tag=name)
        raise ValueError(f"unknown alignment copy {name!r}; choose from {ALIGNMENT_COPIES}")
