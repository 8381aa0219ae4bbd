"""Diagnosis items: :class:`Item`, the built-in tasks (the demo's colour task and an audio-visual one),
and the helpers the conditions use to change an item."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from modkern.apps.synthetic_task import InterferenceTask, TaskConfig, WordTokenizer

TOKENIZER_FILE = "modkern_tokenizer.json"  # the demo's word vocabulary next to its checkpoints

# Item kinds and the prompt type each one is (the white-box comparison is between two prompt types).
KINDS = ("image_heavy", "text_heavy", "av_visual", "av_audio", "vqa", "av_both")
PROMPT_TYPES = {
    "image_heavy": "image-focused",
    "text_heavy": "text-focused",
    "av_visual": "visual-focused",
    "av_audio": "audio-focused",
    "vqa": "image-and-text",
    "av_both": "audio-and-visual",
}
PROMPT_PAIRS = (("image_heavy", "text_heavy"), ("av_visual", "av_audio"))

VIDEO_QUESTION = "question : what colour is the video ? answer :"
AUDIO_QUESTION = "question : what colour is the sound ? answer :"
VIDEO_CAPTION = "caption : a {label} video with a {label} sound ."


class DiagnoseError(ValueError):
    """A problem with the inputs of :func:`diagnose` (missing checkpoint, unknown condition, ...)."""


# --- items -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One diagnosis item: ``context + " " + question`` then ``answer``, with optional media.

    ``kind`` (one of :data:`KINDS`) says which modality carries the answer and which conditions
    apply; ``image`` is ``[3, S, S]`` in [0, 1], ``video`` ``[T, 3, H, W]`` in [0, 1], ``audio``
    mel features ``[mel_bins, frames]`` (the built-in task) or a waveform ``[samples]`` (a data
    file, fed through the processor); ``label`` is the answer's class (for misleading text);
    ``options`` the ``(letter, text)`` answer options of a multiple-choice item (scored by the
    options' likelihood: see :mod:`modkern.apps.diagnose.metrics`); ``stream_labels`` the
    ``(stream, label)`` pairs of what an audio-video item's ``"audio"`` / ``"video"`` show, where
    known (a misaligned pair takes a stream of another label).
    """

    question: str
    answer: str
    kind: str
    context: str = ""
    image: Optional[Tensor] = None
    video: Optional[Tensor] = None
    audio: Optional[Tensor] = None
    label: Optional[str] = None
    options: tuple = ()
    stream_labels: tuple = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DiagnoseError(f"Item.kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def prompt(self) -> str:
        return f"{self.context} {self.question}" if self.context else self.question

    @property
    def target_class(self) -> str:
        return self.answer if self.label is None else self.label

    def stream_label(self, stream: str) -> Optional[str]:
        """What ``stream`` (``"audio"`` / ``"video"``) shows, when the item says."""
        return dict(self.stream_labels).get(stream)


def answer_classes(items: Sequence[Item]) -> list[str]:
    return sorted({it.target_class for it in items})


def other_class(label: str, classes: Sequence[str], rng: random.Random) -> str:
    options = [c for c in classes if c != label]
    if not options:
        raise DiagnoseError(f"misleading text needs at least two answer classes, got {list(classes)}")
    return rng.choice(options)


class NotBuilt(Exception):
    """A condition cannot build its variant of this item; the message is the reason (reported)."""


def needs(item: Item, attr: str, what: str) -> Tensor:
    value = getattr(item, attr)
    if value is None:
        raise NotBuilt(f"the item has no {attr} {what}")
    return value


def donor(items: Sequence[Item], i: int, attr: str, rng: random.Random) -> Tensor:
    """``attr`` (image / audio / video) of another item with another content: where the item names
    what its ``attr`` shows (:attr:`Item.stream_labels`), of any item whose ``attr`` shows something
    else; otherwise of an item of the same kind with another class."""
    me = items[i]
    mine = me.stream_label(attr)
    if mine is not None:
        different = [j for j, o in enumerate(items) if o.stream_label(attr) not in (None, mine)]
        what = f"{attr} showing something other than {mine!r}"
    else:
        different = [j for j, o in enumerate(items) if o.kind == me.kind and o.target_class != me.target_class]
        what = f"{me.kind} item with {'an ' if attr == 'image' else ''}{attr} of another class"
    different = [j for j in different if j != i and getattr(items[j], attr) is not None]
    if not different:  # never an item of the same class, nor another perturbation, in its place
        raise NotBuilt(f"no other {what}")
    return getattr(items[rng.choice(different)], attr)


# --- the built-in tasks ----------------------------------------------------------------------------


def image_task_items(n: int, *, image_size: int = 16, seed: int = 0) -> list[Item]:
    """``n`` image-heavy items (agreeing caption) and ``n`` text-heavy items (agreeing image) of the
    demo's colour task (:class:`modkern.apps.synthetic_task.InterferenceTask`), balanced over the colours."""

    task = InterferenceTask(TaskConfig(image_size=image_size, seed=seed))
    gen = torch.Generator().manual_seed(seed + 7)
    colours = [task.colours[i % len(task.colours)] for i in range(n)]
    out = []
    for k in colours:
        s = task.image_heavy(k, k, gen)
        out.append(Item(s.text, s.answer, "image_heavy", s.context, image=s.image))
    for k in colours:
        s = task.text_heavy(k, k, gen)
        out.append(Item(s.text, s.answer, "text_heavy", s.context, image=s.image))
    return out


def av_tone(colour_index: int, num_classes: int, mel_bins: int, frames: int, gen, noise: float = 0.3) -> Tensor:
    """Mel features ``[mel_bins, frames]`` of the tone of class ``colour_index``: the bins
    ``b % num_classes == colour_index`` are loud (1), the others quiet, plus Gaussian noise."""
    band = (torch.arange(mel_bins) % num_classes == colour_index).float()
    return band[:, None].expand(mel_bins, frames) + noise * torch.randn((mel_bins, frames), generator=gen)


def av_task_items(
    n: int, *, image_size: int = 16, frames: int = 4, mel_bins: int = 8, audio_frames: int = 16, seed: int = 0
) -> list[Item]:
    """``n`` visual-focused and ``n`` sound-focused audio-visual items: a video of ``frames`` frames
    showing a colour (the demo's images) and a tone of the same colour class (:func:`av_tone`); the
    question asks for the video's or the sound's colour."""

    task = InterferenceTask(TaskConfig(image_size=image_size, seed=seed))
    gen = torch.Generator().manual_seed(seed + 11)
    nc = len(task.colours)
    out = []
    for kind, question in (("av_visual", VIDEO_QUESTION), ("av_audio", AUDIO_QUESTION)):
        for i in range(n):
            k = task.colours[i % nc]
            video = torch.stack([task.image(k, gen) for _ in range(frames)])
            audio = av_tone(i % nc, nc, mel_bins, audio_frames, gen)
            out.append(Item(question, k, kind, video=video, audio=audio))
    return out


def data_file_items(path, *, skip_bad: bool = False, sampling_rate: Optional[int] = None, log=print) -> list[Item]:
    """The samples of a data file (:mod:`modkern.data`) as items: the image read, a text-heavy
    sample without one given uniform noise (:func:`modkern.processing.to_sample`), the label the
    answer option's text (so misleading text names another option) and the options; an audio-video
    sample's frames and waveform (resampled to ``sampling_rate``, default
    :data:`modkern.processing.SAMPLING_RATE`) and what each stream shows."""
    from modkern.data import DataFileError, read_samples
    from modkern.processing import SAMPLING_RATE, to_sample

    try:
        data = read_samples(path, skip_bad=skip_bad)
    except DataFileError as exc:
        raise DiagnoseError(str(exc)) from None
    if data.skipped:
        log(data.skipped_note())
    return [_data_file_item(s, to_sample(s, sampling_rate=sampling_rate or SAMPLING_RATE)) for s in data.samples]


def _data_file_item(s, read) -> Item:
    """The item of data-file sample ``s``, whose media ``read`` holds (:func:`modkern.processing.to_sample`)."""
    common = dict(label=s.options.get(s.answer.strip(), s.answer), options=tuple(s.options.items()))
    if not s.is_av:
        return Item(s.question, s.answer, s.kind, image=read.image, **common)
    labels = (("audio", read.audio_label), ("video", read.visual_label))
    labels = tuple((stream, label) for stream, label in labels if label is not None)
    return Item(s.question, s.answer, s.kind, video=read.video, audio=read.audio, stream_labels=labels, **common)


def task_words() -> list[str]:
    """The words of the built-in tasks (for a :class:`modkern.apps.synthetic_task.WordTokenizer`)."""

    extra = [VIDEO_QUESTION, AUDIO_QUESTION, VIDEO_CAPTION.replace("{label}", "")]
    return InterferenceTask().words() + [w for t in extra for w in WordTokenizer.split(t)]
