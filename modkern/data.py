"""Data files in the official code's format: the samples of a robust fine-tuning or a diagnosis.

A file is a JSON list of samples or JSON Lines (one sample per line; ``.jsonl`` or any file whose
first non-blank character is not ``[``). A sample is an object with

* ``type``: ``image_heavy`` (the image decides; the text around it may mislead), ``text_heavy``
  (the text decides; the image is noise) or ``VQA`` (both needed), in any case;
* ``image``: the image's path, relative to the data file (or absolute); required for image-heavy
  and VQA samples, optional for text-heavy ones (the official code gives those a noise image);
* ``question`` (the options inside it, one ``A: cat`` per line, as in the official
  ``"Question:\\n...\\nOption:\\nA: x\\nB: y"``) and ``answer`` (text, or a number);
* optionally ``facts``: text about the image naming a wrong option (an object of option -> text,
  a list of texts, or one text; the first is the related text of the image-heavy copy).

An **audio-video** sample (MMA-Bench's alignment tuning, :mod:`modkern.objective.alignment`) has
``type`` ``audio_video`` and

* ``video``: a folder of frame images or a multi-frame image file (animated GIF / WebP / PNG,
  multi-page TIFF; :data:`modkern.media.VIDEO_FORMATS`), relative to the data file;
* ``audio``: a WAV file (integer PCM; optional: a clip without sound has none);
* ``modality``: what the question asks about, ``audio``, ``visual`` or ``both`` (the sample's kind
  is ``av_audio``, ``av_visual`` or ``av_both``);
* ``question`` and ``answer`` as above; optionally ``audio_label`` / ``visual_label``: what the sound
  and the frames show (an option's text or a free answer). They let a copy whose queried stream
  comes from another clip know its new answer; without them such copies are not made.

:func:`read_samples` checks every sample and names the file and line of the first bad one
(:class:`DataFileError`); with ``skip_bad=True`` it leaves the bad ones out and lists them.
:class:`KindMixSampler` makes batches of a fixed mix of the three kinds, as the official configs do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils.data import Sampler

try:  # the image reader of the checks (Pillow: with transformers' image processors, matplotlib)
    from PIL import Image
except ImportError:  # pragma: no cover - without Pillow the images are checked for existence only
    Image = None

SAMPLE_TYPES = {"image_heavy": "image_heavy", "text_heavy": "text_heavy", "vqa": "vqa"}
NEEDS_IMAGE = ("image_heavy", "vqa")
AV_TYPE = "audio_video"
# The modality an audio-video question asks about -> the sample's kind.
AV_MODALITIES = {"audio": "av_audio", "visual": "av_visual", "both": "av_both"}
AV_SAMPLE_KINDS = tuple(AV_MODALITIES.values())
# One option per line: "A: cat" (the official question format); the letter and the text.
OPTION_LINE = re.compile(r"^\s*([A-Z])\s*:\s*(.+?)\s*$", re.MULTILINE)


class DataFileError(ValueError):
    """A data file that cannot be read, or a bad sample in it (the message names the file and line)."""


@dataclass(frozen=True)
class Sample:
    """One checked sample. ``kind``: ``"image_heavy"``, ``"text_heavy"``, ``"vqa"`` or, for an
    audio-video sample, one of :data:`AV_SAMPLE_KINDS`; ``image`` / ``video`` / ``audio``: absolute
    paths or None; ``options``: letter -> text, parsed from the question; ``labels``: ``"audio"`` /
    ``"visual"`` -> what that stream shows (audio-video samples); ``line``: where the sample starts
    in its file (``source``)."""

    kind: str
    question: str
    answer: str
    image: Optional[str]
    facts: tuple = ()
    options: dict = field(default_factory=dict)
    line: int = 0
    video: Optional[str] = None
    audio: Optional[str] = None
    labels: dict = field(default_factory=dict)
    source: str = ""  # the data file

    @property
    def is_av(self) -> bool:
        return self.kind in AV_SAMPLE_KINDS


@dataclass
class DataFile:
    """The samples of a file, and the bad ones left out (``(line, reason)``, only with ``skip_bad``)."""

    path: str
    samples: list
    skipped: list

    def skipped_note(self) -> str:
        """``"FILE: skipped N bad sample(s): line L: why; ..."`` (empty when none was skipped)."""
        if not self.skipped:
            return ""
        lines = "; ".join(f"line {n}: {why}" for n, why in self.skipped)
        return f"{self.path}: skipped {len(self.skipped)} bad sample(s): {lines}"


def read_samples(path, *, skip_bad: bool = False) -> DataFile:
    """Read and check the samples of a JSON / JSONL data file (see the module docstring)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise DataFileError(f"{path}: cannot read the data file ({exc.strerror or exc})") from None
    base = os.path.dirname(os.path.abspath(path))
    samples, skipped = [], []
    for line, raw in _raw_samples(path, text):
        try:
            if isinstance(raw, Exception):
                raise raw
            samples.append(dataclasses.replace(check_sample(raw, base, line), source=path))
        except (DataFileError, ValueError, TypeError) as exc:
            if not skip_bad:
                raise DataFileError(f"{path}:{line}: {exc}") from None
            skipped.append((line, str(exc)))
    if not samples:
        raise DataFileError(f"{path}: no usable sample" + (f" ({len(skipped)} bad ones left out)" if skipped else ""))
    return DataFile(path, samples, skipped)


def _raw_samples(path: str, text: str):
    """``(line, object or the error)`` per sample: JSON Lines line by line (a broken line is one bad
    sample), a JSON list element by element (a syntax error breaks the whole file)."""
    stripped = text.lstrip()
    if not stripped:
        raise DataFileError(f"{path}: the data file is empty")
    if stripped[0] != "[":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield number, ValueError(f"not a JSON object ({exc.msg})")
        return
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]":
            return
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}:{exc.lineno}: broken JSON ({exc.msg})") from None
        yield text.count("\n", 0, pos) + 1, item
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            raise DataFileError(f"{path}:{text.count(chr(10), 0, pos) + 1}: broken JSON (',' or ']' expected)")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def check_sample(raw, base_dir: str, line: int = 0) -> Sample:
    """One raw sample as a :class:`Sample` (a ValueError / TypeError naming what is wrong)."""
    if not isinstance(raw, dict):
        raise TypeError(f"a sample must be a JSON object, got {type(raw).__name__}")
    kind = raw.get("type")
    if not isinstance(kind, str) or (kind.lower() not in SAMPLE_TYPES and kind.lower() != AV_TYPE):
        raise ValueError(f"unknown type {kind!r} (expected image_heavy, text_heavy, VQA or {AV_TYPE})")
    question = _text(raw, "question")
    answer = raw.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    answer = _text({"answer": answer}, "answer")
    options = dict(OPTION_LINE.findall(question))
    if kind.lower() == AV_TYPE:
        return _av_sample(raw, base_dir, line, question, answer, options)
    kind = SAMPLE_TYPES[kind.lower()]
    image = _image_path(raw.get("image"), base_dir, required=kind in NEEDS_IMAGE, kind=kind)
    return Sample(kind, question, answer, image, _facts(raw.get("facts")), options, line)


def _av_sample(raw: dict, base_dir: str, line: int, question: str, answer: str, options: dict) -> Sample:
    from modkern.media import VIDEO_FORMATS, check_video, wav_layout

    modality = raw.get("modality")
    if modality not in AV_MODALITIES:
        raise ValueError(f"'modality' must be one of {list(AV_MODALITIES)} (what the question asks), got {modality!r}")
    if raw.get("image") is not None:
        raise ValueError(f"an {AV_TYPE} sample takes 'video' and 'audio', not 'image'")
    video = _media_path(raw.get("video"), base_dir, "video", allow_dir=True)
    if video is None:
        raise ValueError(f"an {AV_TYPE} sample needs a 'video' ({VIDEO_FORMATS})")
    check_video(video, raw["video"])
    audio = _media_path(raw.get("audio"), base_dir, "audio", allow_dir=False)
    if audio is not None:
        wav_layout(audio, raw["audio"])
    labels = {}
    for stream in ("audio", "visual"):
        value = raw.get(f"{stream}_label")
        if value is not None:
            labels[stream] = _text({f"{stream}_label": value}, f"{stream}_label")
    kind = AV_MODALITIES[modality]
    _check_av_answer(kind, answer, options, labels)
    return Sample(kind, question, answer, None, (), options, line, video, audio, labels)


def _check_av_answer(kind: str, answer: str, options: dict, labels: dict) -> None:
    """The answer is one of the question's options (its letter or its text), and what the queried
    stream shows, where given, is the answer: the copies derive their answers from the labels."""
    from modkern.objective.alignment import content_key

    answer_text = answer.strip()
    if options:
        if answer_text not in options and content_key(answer_text) not in map(content_key, options.values()):
            listed = ", ".join(f"{k}: {t}" for k, t in options.items())
            raise ValueError(f"'answer' {answer!r} is neither an option's letter nor its text ({listed})")
        answer_text = options.get(answer_text, answer_text)
    stream = {"av_audio": "audio", "av_visual": "visual"}.get(kind)
    label = labels.get(stream)
    if label is not None and content_key(label) != content_key(answer_text):
        raise ValueError(
            f"'{stream}_label' {label!r} contradicts the answer {answer!r}: the question asks about the "
            f"{stream} stream, so its answer is what that stream shows"
        )


def _media_path(value, base_dir: str, key: str, *, allow_dir: bool) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' must be a path, got {value!r}")
    path = os.path.normpath(os.path.join(base_dir, value))
    if not (os.path.isfile(path) or (allow_dir and os.path.isdir(path))):
        raise ValueError(f"{key} {value!r} not found ({path})")
    return path


def _text(raw: dict, key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' must be a non-empty text, got {value!r}")
    return value


def _image_path(value, base_dir: str, *, required: bool, kind: str) -> Optional[str]:
    if value is None:
        if required:
            raise ValueError(f"a {kind} sample needs an 'image'")
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'image' must be a path, got {value!r}")
    path = os.path.normpath(os.path.join(base_dir, value))
    if not os.path.isfile(path):
        raise ValueError(f"image {value!r} not found ({path})")
    if Image is None:
        return path
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:  # noqa: BLE001 - any reader failure means: not an image PIL can read
        raise ValueError(f"image {value!r} is not a readable image ({type(exc).__name__}: {exc})") from None
    return path


def _facts(value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("'facts' must be a text, a list of texts or an object of option -> text")
    return tuple(value)


# The official LLaVA / Qwen KL + PGD configs: per batch of 8, int(8 x 0.25) image-heavy and
# text-heavy samples, the rest VQA.
OFFICIAL_MIX = {"image_heavy": 2, "text_heavy": 2, "vqa": 4}


def parse_mix(text: str) -> dict:
    """``"2:2:4"`` (image-heavy : text-heavy : VQA samples per batch) as a mix."""
    parts = text.split(":")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts) or not sum(int(p) for p in parts):
        raise ValueError(f"a mix is three counts per batch, image-heavy:text-heavy:VQA such as 2:2:4, got {text!r}")
    return dict(zip(("image_heavy", "text_heavy", "vqa"), (int(p) for p in parts)))


class KindMixSampler(Sampler):
    """Batches of ``mix[kind]`` samples of each kind (a ``batch_sampler`` for a DataLoader).

    Each kind's samples are shuffled once per epoch (``seed`` + :meth:`set_epoch`) and drawn without
    repetition; the epoch ends when a kind that the mix asks for runs out (its last, incomplete
    batch share is dropped). The official configs' mix is :data:`OFFICIAL_MIX` (2:2:4).
    """

    def __init__(self, kinds: Sequence[str], mix: Optional[dict] = None, *, seed: int = 0):
        mix = dict(OFFICIAL_MIX if mix is None else mix)
        unknown = set(mix) - set(SAMPLE_TYPES.values())
        if unknown or any(not isinstance(n, int) or n < 0 for n in mix.values()) or not sum(mix.values()):
            raise ValueError(f"mix must give a count >= 0 per kind of {tuple(SAMPLE_TYPES.values())}, got {mix}")
        self.pools = {k: [i for i, kind in enumerate(kinds) if kind == k] for k in mix if mix[k]}
        missing = [k for k, pool in self.pools.items() if len(pool) < mix[k]]
        if missing:
            have = {k: len(p) for k, p in self.pools.items()}
            raise ValueError(f"the mix {mix} needs more samples of {missing} than the data has ({have})")
        self.mix, self.seed, self.epoch = mix, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return min(len(pool) // self.mix[k] for k, pool in self.pools.items())

    def __iter__(self) -> Iterator[list]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = {
            k: [pool[i] for i in torch.randperm(len(pool), generator=gen).tolist()] for k, pool in self.pools.items()
        }
        for b in range(len(self)):
            yield [i for k, n in self.mix.items() if n for i in order[k][b * n : (b + 1) * n]]
