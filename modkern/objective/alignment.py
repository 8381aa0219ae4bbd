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
  the *other* stream's content (MMA-Bench's misleading text; :func:`caption_label`) or, where that
  is unknown or the same, another option; the answer is unchanged (the text must be ignored).

A question about both streams (``"av_both"``) gets only the caption copy (claiming the sound shows
what the frames show, where they differ): a change of either stream may change its answer. Where
a sample names what each stream shows (``visual_label`` / ``audio_label``) and its options, a copy
whose queried stream changed gets the option that names the new content (no such option: no copy).

A copy whose answer is its clean sample's pairs with it in ``ref_index`` (the consistency term
compares their answer distributions); a copy whose answer changed is a sample of its own
(``ref_index`` -1). The modality mask of the robust objective perturbs the stream the question
does not ask about: :data:`ALIGNMENT_POLICY` as ``RobustConfig(policy=...)``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

AV_KINDS = ("av_visual", "av_audio", "av_both")
# The stream each kind's question asks about, and the one the attack perturbs (the other one; a
# question about both streams leaves both clean: every perturbation of them could change its answer).
QUERIED = {"av_visual": "video", "av_audio": "audio"}
ALIGNMENT_POLICY = {"av_visual": "audio", "av_audio": "video", "av_both": "none"}
ALIGNMENT_COPIES = ("misaligned_audio", "misaligned_video", "removed_audio", "zeroed_frames", "misleading_caption")
DEFAULT_COPIES = ALIGNMENT_COPIES[:4]
CAPTION_TEMPLATE = "caption : the {stream} is {label} ."
# What a misleading caption claims to describe: the queried stream; for a question about both, the sound.
CAPTION_STREAM = {"av_visual": "video", "av_audio": "sound", "av_both": "sound"}
# The copy -> the stream it changes (the answer follows it where the question asks about it: QUERIED).
STREAM_COPIES = {
    "misaligned_audio": "audio",
    "misaligned_video": "video",
    "removed_audio": "audio",
    "zeroed_frames": "video",
}
LABEL_OF = {"audio": "audio_label", "video": "visual_label"}


def content_key(text: str) -> str:
    """What compares two namings of a stream's content (an option's text, a label, an answer):
    case and surrounding spaces ignored."""
    return text.strip().casefold()


@dataclass(frozen=True)
class AVSample:
    """An audio-video sample: ``video`` ``[T, 3, H, W]`` in [0, 1] (None: no frames), ``audio`` what
    the collator takes (a waveform through a processor, mel features in the demo; None: removed),
    the question (``kind``: :data:`AV_KINDS`, what it asks about) and its ``answer``; optionally what
    each stream shows (``visual_label`` / ``audio_label``) and the question's ``options`` (letter ->
    text), which let a copy whose queried stream changed know its new answer (:meth:`answer_for`)."""

    question: str
    kind: str
    video: Optional[Tensor]
    audio: Optional[Tensor]
    answer: str
    visual_label: Optional[str] = None
    audio_label: Optional[str] = None
    options: dict = field(default_factory=dict)
    context: str = ""
    tag: str = "clean"

    def __post_init__(self):
        if self.kind not in AV_KINDS:
            raise ValueError(f"kind must be one of {AV_KINDS}, got {self.kind!r}")

    @property
    def prompt(self) -> str:
        return f"{self.context} {self.question}" if self.context else self.question

    def answer_for(self, label: Optional[str]) -> Optional[str]:
        """The answer when the queried stream shows ``label``: the option whose text it is, written as
        :attr:`answer` is (its letter, or its text; None when no option is), or ``label`` itself for
        a free answer; None for no label."""
        if label is None or not self.options:
            return label
        key = content_key(label)
        letter = next((k for k, text in self.options.items() if content_key(text) == key), None)
        if letter is None or self.answer.strip() in self.options:
            return letter
        return self.options[letter]

    @property
    def answer_text(self) -> str:
        """The answer as content: the answer option's text, or the free answer."""
        return self.options.get(self.answer.strip(), self.answer)


@dataclass
class AlignmentConfig:
    """Which alignment copies to make (:data:`ALIGNMENT_COPIES`; default the four stream copies),
    the targets of questions about a removed stream (None: no such copy), the caption template
    (``{stream}``: "video" / "sound" / "clip", ``{label}``) and the labels a caption may name when
    the sample has no options of its own."""

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
        """Copy ``name`` of ``samples[i]``, or None when it cannot be made: no donor clip (of another
        label, where labels are known), a question about both streams (any stream change may change
        its answer), an unknown new answer (a queried stream from a clip without a label, or a label
        no option names), no target for a question about a removed stream, no wrong label to name."""
        s = samples[i]
        if name == "misleading_caption":
            return self._caption(s)
        if name not in STREAM_COPIES:
            raise ValueError(f"unknown alignment copy {name!r}; choose from {ALIGNMENT_COPIES}")
        stream = STREAM_COPIES[name]
        asked = QUERIED.get(s.kind) == stream
        if s.kind == "av_both" or getattr(s, stream) is None:
            return None
        label = LABEL_OF[stream]
        if name in ("misaligned_audio", "misaligned_video"):
            donors = [o for j, o in enumerate(samples) if j != i and getattr(o, stream) is not None]
            mine = getattr(s, label)
            if mine is not None:  # a donor whose content is unknown may show the same: not misaligned
                donors = [o for o in donors if getattr(o, label) not in (None, mine)]
            if asked:
                donors = [o for o in donors if s.answer_for(getattr(o, label)) is not None]
            if not donors:
                return None
            d = self.rng.choice(donors)
            value, new_label = getattr(d, stream), getattr(d, label)
            answer = s.answer_for(new_label) if asked else s.answer
        else:  # removed_audio / zeroed_frames: the stream carries nothing
            value = None if stream == "audio" else torch.zeros_like(s.video)
            target = self.config.no_audio_answer if stream == "audio" else self.config.no_video_answer
            if asked and target is None:
                return None
            new_label = target if asked else getattr(s, label)
            answer = s.answer_for(target) if asked else s.answer
            if answer is None:
                return None
        return dataclasses.replace(s, **{stream: value, label: new_label}, answer=answer, tag=name)

    def _caption(self, s: AVSample) -> Optional[AVSample]:
        candidates = () if s.kind == "av_both" else tuple(s.options.values())
        label = caption_label(
            s.kind, s.answer_text, s.visual_label, s.audio_label, candidates or self.config.classes, self.rng
        )
        if label is None:
            return None
        caption = self.config.caption_template.format(stream=CAPTION_STREAM[s.kind], label=label)
        return dataclasses.replace(s, context=f"{s.context} {caption}".strip(), tag="misleading_caption")


def caption_label(
    kind: str,
    answer_text: str,
    visual_label: Optional[str],
    audio_label: Optional[str],
    candidates: Sequence[str],
    rng: random.Random,
) -> Optional[str]:
    """What MMA-Bench's misleading caption names as the content of :data:`CAPTION_STREAM` ``[kind]``:
    the *other* stream's content where the sample gives it and it is not the answer (a question about
    the video is told the sound's label, and the reverse; a question about both, that the sound is
    what the video shows); otherwise a random one of ``candidates`` (the question's options, or
    the task's classes) that is not the true content. None: nothing wrong to name."""
    if kind == "av_both":
        other, truth = visual_label, audio_label
    else:
        other, truth = (audio_label, answer_text) if kind == "av_visual" else (visual_label, answer_text)
    if other is not None and (truth is None or content_key(other) != content_key(truth)):
        return other
    if truth is None:
        return None
    wrong = [c for c in candidates if content_key(c) != content_key(truth)]
    return rng.choice(wrong) if wrong else None
