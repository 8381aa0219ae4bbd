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
sound) with misaligned audio-video pairs, removed audio, zeroed frames and a misleading caption.
A condition that the model cannot take (audio on LLaVA) is skipped with the reason in the report;
so is one that can build no variant (no image of another class to swap in, items without the
input it changes), and an item a condition cannot build is left out of it and counted, never
replaced by another perturbation.

Data: without ``items``, the built-in synthetic tasks (the demo's colour task of
:mod:`modkern.data`, and an audio-visual colour task for models with audio and video); or a list of
:class:`Item`.

Example::

    from modkern.diagnose import diagnose
    report = diagnose("runs/demo/checkpoints/sft", out="runs/diag", max_items=64)
    report["conditions"]["mislead_text"]["flip_rate"]
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import random
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modkern.model_hooks import infer_token_ids
from modkern.robust import IGNORE_INDEX, shift_labels

TOKENIZER_FILE = "modkern_tokenizer.json"  # the demo's word vocabulary next to its checkpoints

# Item kinds and the prompt type each one is (the white-box comparison is between two prompt types).
KINDS = ("image_heavy", "text_heavy", "av_visual", "av_audio")
PROMPT_TYPES = {
    "image_heavy": "image-focused",
    "text_heavy": "text-focused",
    "av_visual": "visual-focused",
    "av_audio": "audio-focused",
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
    apply; ``image`` is ``[3, S, S]`` in [0, 1], ``video`` ``[T, 3, S, S]`` in [0, 1], ``audio``
    mel features ``[mel_bins, frames]``; ``label`` is the answer's class (for misleading text).
    """

    question: str
    answer: str
    kind: str
    context: str = ""
    image: Optional[Tensor] = None
    video: Optional[Tensor] = None
    audio: Optional[Tensor] = None
    label: Optional[str] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DiagnoseError(f"Item.kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def prompt(self) -> str:
        return f"{self.context} {self.question}" if self.context else self.question

    @property
    def target_class(self) -> str:
        return self.answer if self.label is None else self.label


def _classes(items: Sequence[Item]) -> list[str]:
    return sorted({it.target_class for it in items})


def _other(label: str, classes: Sequence[str], rng: random.Random) -> str:
    options = [c for c in classes if c != label]
    if not options:
        raise DiagnoseError(f"misleading text needs at least two answer classes, got {list(classes)}")
    return rng.choice(options)


class _NotBuilt(Exception):
    """A condition cannot build its variant of this item; the message is the reason (reported)."""


def _needs(item: Item, attr: str, what: str) -> Tensor:
    value = getattr(item, attr)
    if value is None:
        raise _NotBuilt(f"the item has no {attr} {what}")
    return value


def _donor(items: Sequence[Item], i: int, attr: str, rng: random.Random) -> Tensor:
    """``attr`` (image / audio / video) of another item of the same kind with another class."""
    me = items[i]
    different = [
        j
        for j, o in enumerate(items)
        if j != i and o.kind == me.kind and getattr(o, attr) is not None and o.target_class != me.target_class
    ]
    if not different:  # never an item of the same class, nor another perturbation, in its place
        raise _NotBuilt(f"no other {me.kind} item with {'an ' if attr == 'image' else ''}{attr} of another class")
    return getattr(items[rng.choice(different)], attr)


# --- conditions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """A perturbation of clean items: ``make(items, i, ctx)`` returns the perturbed ``items[i]``
    (or raises ``_NotBuilt`` with the reason: the item is left out of the condition and counted).

    ``kinds``: the item kinds it applies to; ``requires``: the model inputs it needs.
    """

    name: str
    kinds: tuple
    requires: tuple
    description: str
    make: Callable


@dataclass
class _Ctx:
    rng: random.Random
    gen: torch.Generator
    classes: tuple


def _condition_ctx(seed: int, name: str, classes) -> _Ctx:
    """Random state of one condition: seeded from the run's seed and the condition's name."""
    own = (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62
    return _Ctx(random.Random(own), torch.Generator().manual_seed(own + 1), tuple(classes))


def _mislead_text(items, i, ctx):
    from modkern.data import CAPTION

    it = items[i]
    return dataclasses.replace(it, context=CAPTION.format(label=_other(it.target_class, ctx.classes, ctx.rng)))


def _unrelated_text(items, i, ctx):
    from modkern.data import EVAL_OBJECTS, FACT

    it = items[i]
    fact = FACT.format(obj=ctx.rng.choice(EVAL_OBJECTS), label=_other(it.target_class, ctx.classes, ctx.rng))
    return dataclasses.replace(it, context=fact)


def _long_context(items, i, ctx, sentences: int = 8):
    from modkern.data import EVAL_OBJECTS, FACT

    it = items[i]
    facts = [FACT.format(obj=ctx.rng.choice(EVAL_OBJECTS), label=ctx.rng.choice(ctx.classes)) for _ in range(sentences)]
    return dataclasses.replace(it, context=" ".join([*facts, it.context]).strip())


def _word_list(items, i, ctx, words: int = 6):
    from modkern.data import EVAL_OBJECTS, WORD_LIST

    it = items[i]
    picked = [ctx.rng.choice(EVAL_OBJECTS) for _ in range(words // 2)]
    picked += [_other(it.target_class, ctx.classes, ctx.rng)] + [
        ctx.rng.choice(ctx.classes) for _ in range(words // 2 - 1)
    ]
    ctx.rng.shuffle(picked)
    return dataclasses.replace(it, context=f"{WORD_LIST.format(words=' , '.join(picked))} {it.context}".strip())


def _mislead_note(items, i, ctx):
    from modkern.data import MISLEADING_NOTE

    it = items[i]
    return dataclasses.replace(it, context=MISLEADING_NOTE.format(label=_other(it.target_class, ctx.classes, ctx.rng)))


def _swap_image(items, i, ctx):
    _needs(items[i], "image", "to swap")
    return dataclasses.replace(items[i], image=_donor(items, i, "image", ctx.rng))


def _const_image(value):
    def make(items, i, ctx):
        return dataclasses.replace(items[i], image=torch.full_like(_needs(items[i], "image", "to replace"), value))

    return make


def _noise_image(items, i, ctx):
    img = _needs(items[i], "image", "to replace")
    noise = 0.5 + 0.3 * torch.randn(img.shape, generator=ctx.gen)
    return dataclasses.replace(items[i], image=noise.clamp_(0.0, 1.0).to(img.dtype))


def _misaligned(items, i, ctx):
    # The stream the question does not ask about comes from an item of another class.
    it = items[i]
    attr = "audio" if it.kind == "av_visual" else "video"
    _needs(it, attr, "to misalign")
    return dataclasses.replace(it, **{attr: _donor(items, i, attr, ctx.rng)})


def _removed_audio(items, i, ctx):
    _needs(items[i], "audio", "to remove")  # else the variant would be the clean item
    return dataclasses.replace(items[i], audio=None)


def _zeroed_frames(items, i, ctx):
    return dataclasses.replace(items[i], video=torch.zeros_like(_needs(items[i], "video", "to zero")))


def _mislead_caption(items, i, ctx):
    it = items[i]
    return dataclasses.replace(it, context=VIDEO_CAPTION.format(label=_other(it.target_class, ctx.classes, ctx.rng)))


CONDITIONS = {
    c.name: c
    for c in (
        Condition(
            "mislead_text",
            ("image_heavy",),
            ("image",),
            "image-heavy items; the caption names another colour",
            _mislead_text,
        ),
        Condition(
            "unrelated_text",
            ("image_heavy",),
            ("image",),
            "image-heavy items; an unrelated fact naming another colour replaces the caption",
            _unrelated_text,
        ),
        Condition(
            "long_irrelevant_context",
            ("image_heavy",),
            ("image",),
            "image-heavy items; eight facts about other objects in front of the caption",
            _long_context,
        ),
        Condition(
            "word_list",
            ("image_heavy",),
            ("image",),
            "image-heavy items; a list of unrelated words (objects and colours, one of them another colour) in "
            "front of the caption (held out: no training text of the demo is a list)",
            _word_list,
        ),
        Condition(
            "mislead_note",
            ("image_heavy",),
            ("image",),
            "image-heavy items; a note (the text-heavy items' form) names another colour for the picture "
            "(held out: the demo's augmentation never uses this template)",
            _mislead_note,
        ),
        Condition(
            "swap_image", ("text_heavy",), ("image",), "text-heavy items; the image of another item", _swap_image
        ),
        Condition("black_image", ("text_heavy",), ("image",), "text-heavy items; a black image", _const_image(0.0)),
        Condition("white_image", ("text_heavy",), ("image",), "text-heavy items; a white image", _const_image(1.0)),
        Condition("noise_image", ("text_heavy",), ("image",), "text-heavy items; a Gaussian noise image", _noise_image),
        Condition(
            "misaligned_audio_video",
            ("av_visual", "av_audio"),
            ("audio", "video"),
            "audio-visual items; the stream the question does not ask about comes from another class",
            _misaligned,
        ),
        Condition(
            "removed_audio",
            ("av_visual",),
            ("audio", "video"),
            "visual questions; the audio track is removed",
            _removed_audio,
        ),
        Condition(
            "zeroed_frames",
            ("av_audio",),
            ("audio", "video"),
            "sound questions; every video frame is zero",
            _zeroed_frames,
        ),
        Condition(
            "mislead_caption_av",
            ("av_visual", "av_audio"),
            ("audio", "video"),
            "audio-visual items; a caption names another colour for both streams",
            _mislead_caption,
        ),
    )
}


# --- the built-in tasks ----------------------------------------------------------------------------


def image_task_items(n: int, *, image_size: int = 16, seed: int = 0) -> list[Item]:
    """``n`` image-heavy items (agreeing caption) and ``n`` text-heavy items (agreeing image) of the
    demo's colour task (:class:`modkern.data.InterferenceTask`), balanced over the colours."""
    from modkern.data import InterferenceTask, TaskConfig

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
    from modkern.data import InterferenceTask, TaskConfig

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


def task_words() -> list[str]:
    """The words of the built-in tasks (for a :class:`modkern.data.WordTokenizer`)."""
    from modkern.data import InterferenceTask, WordTokenizer

    extra = [VIDEO_QUESTION, AUDIO_QUESTION, VIDEO_CAPTION.replace("{label}", "")]
    return InterferenceTask().words() + [w for t in extra for w in WordTokenizer.split(t)]


# --- models: what they take and how to feed them ---------------------------------------------------


def _cfg(config, name, default=None):
    value = getattr(config, name, None)
    return default if value is None else value


@dataclass
class ModelSpec:
    """What a multimodal checkpoint takes, read from its config."""

    family: str  # "llava", "qwen_vl" or "qwen2_5_omni"
    modalities: tuple  # of "image", "video", "audio"
    token_ids: dict  # modality -> placeholder id
    markers: dict  # "vision_start" / "vision_end" / "audio_start" / "audio_end" -> id
    image_size: int
    num_image_tokens: int
    patch_size: int = 0
    temporal_patch_size: int = 1
    spatial_merge_size: int = 1
    num_mel_bins: int = 0
    video_frames: int = 0
    audio_frames: int = 16
    needs_mm_token_type_ids: bool = False

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelSpec:
        config = model.config
        mt = getattr(config, "model_type", "")
        tid = infer_token_ids(model)
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        if mt == "llava" or (mt not in ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni_thinker") and "image" in tid):
            vision = config.vision_config
            if "image" not in tid or not hasattr(vision, "image_size"):
                raise DiagnoseError(f"{type(model).__name__}: not a LLaVA-style model (image_token_id, vision_config)")
            n = (vision.image_size // vision.patch_size) ** 2
            n += 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0
            return cls("llava", ("image",), {"image": tid["image"]}, {}, vision.image_size, n)
        if mt in ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni_thinker"):
            vision = config.vision_config
            ps, ms, tp = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
            size = 2 * ps * ms
            markers = {
                "vision_start": _cfg(config, "vision_start_token_id", 151652),
                "vision_end": _cfg(config, "vision_end_token_id", 151653),
            }
            common = dict(
                image_size=size,
                num_image_tokens=(size // ps // ms) ** 2,
                patch_size=ps,
                temporal_patch_size=tp,
                spatial_merge_size=ms,
                needs_mm_token_type_ids="mm_token_type_ids" in params,
            )
            if mt != "qwen2_5_omni_thinker":
                return cls("qwen_vl", ("image",), {"image": tid["image"]}, markers, **common)
            markers.update(
                audio_start=_cfg(config, "audio_start_token_id", 151647),
                audio_end=_cfg(config, "audio_end_token_id", 151648),
            )
            ids = {k: tid[k] for k in ("image", "video", "audio")}
            mel = config.audio_config.num_mel_bins
            return cls(
                "qwen2_5_omni",
                ("image", "video", "audio"),
                ids,
                markers,
                num_mel_bins=mel,
                video_frames=2 * tp,
                **common,
            )
        raise DiagnoseError(
            f"{type(model).__name__} (model_type {mt!r}): diagnose supports LLaVA, Qwen2-VL / Qwen2.5-VL and the "
            "Qwen2.5-Omni thinker"
        )

    @property
    def num_video_tokens(self) -> int:
        return (self.video_frames // self.temporal_patch_size) * self.num_image_tokens


def _text_encoder(tokenizer) -> Callable[[str], list]:
    from modkern.data import WordTokenizer, hf_text_encoder

    if isinstance(tokenizer, WordTokenizer):
        return tokenizer.encode
    if callable(tokenizer):
        return hf_text_encoder(tokenizer)
    if hasattr(tokenizer, "encode"):
        return tokenizer.encode
    raise DiagnoseError(
        f"tokenizer must be a WordTokenizer or a Hugging Face tokenizer, got {type(tokenizer).__name__}"
    )


class Collator:
    """Turns :class:`Item` s into a right-padded model batch for ``spec``'s model.

    LLaVA: ``[bos] <image>*n prompt answer``; Qwen-VL / Omni: each medium between its markers
    (``<vision_start> <image>*n <vision_end>``, the same for video, ``<audio_start> <audio>*n
    <audio_end>``). Keys: ``input_ids``, ``attention_mask``, ``labels`` (the answer tokens) and the
    media inputs (``pixel_values`` [+ ``image_grid_thw``], ``pixel_values_videos``,
    ``video_grid_thw``, ``video_second_per_grid``, ``input_features``, ``feature_attention_mask``).
    """

    def __init__(self, spec: ModelSpec, tokenizer, pad_token_id: Optional[int] = None):
        self.spec = spec
        self.encode_text = _text_encoder(tokenizer)
        self.bos = getattr(tokenizer, "bos_token_id", None)
        pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
        self.pad = pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)

    def _block(self, name: str, n: int) -> list:
        s = self.spec
        body = [s.token_ids[name]] * n
        if s.family == "llava":
            return body
        start, end = ("audio_start", "audio_end") if name == "audio" else ("vision_start", "vision_end")
        return [s.markers[start], *body, s.markers[end]]

    def encode(self, item: Item) -> tuple[list, list]:
        from modkern.tiny import omni_audio_tokens

        s = self.spec
        ids = [] if self.bos is None else [self.bos]
        for name, value in (("image", item.image), ("video", item.video), ("audio", item.audio)):
            if value is None:
                continue
            if name not in s.modalities:
                raise DiagnoseError(f"an item has {name} input but the model ({s.family}) takes no {name}")
            if name == "image":
                n = s.num_image_tokens
            elif name == "video":
                n = (value.shape[0] // s.temporal_patch_size) * s.num_image_tokens
            else:
                n = omni_audio_tokens(value.shape[-1])
            ids += self._block(name, n)
        ids += list(self.encode_text(item.prompt))
        answer = list(self.encode_text(" " + item.answer))
        if not answer:
            raise DiagnoseError(f"answer {item.answer!r} encodes to no tokens")
        return ids + answer, [IGNORE_INDEX] * len(ids) + answer

    def __call__(self, items: Sequence[Item]) -> dict:
        from modkern.augment import right_pad
        from modkern.tiny import qwen2_vl_pixel_values, qwen_video_pixel_values

        s = self.spec
        input_ids, attention_mask, labels = right_pad([self.encode(it) for it in items], self.pad)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        info = dict(
            patch_size=s.patch_size, temporal_patch_size=s.temporal_patch_size, spatial_merge_size=s.spatial_merge_size
        )
        images = [it.image for it in items if it.image is not None]
        if images:
            pixels = (torch.stack(images).float() - 0.5) / 0.5
            if s.family == "llava":
                batch["pixel_values"] = pixels
            else:
                batch["pixel_values"], batch["image_grid_thw"] = qwen2_vl_pixel_values(pixels, info)
        videos = [it.video for it in items if it.video is not None]
        if videos:
            frames = (torch.stack(videos).float() - 0.5) / 0.5
            batch["pixel_values_videos"], batch["video_grid_thw"] = qwen_video_pixel_values(frames, info)
            batch["video_second_per_grid"] = torch.ones(len(videos))
        audios = [it.audio for it in items if it.audio is not None]
        if audios:
            frames = max(a.shape[-1] for a in audios)
            feats = torch.zeros(len(audios), audios[0].shape[0], frames)
            fmask = torch.zeros(len(audios), frames, dtype=torch.long)
            for k, a in enumerate(audios):
                feats[k, :, : a.shape[-1]] = a
                fmask[k, : a.shape[-1]] = 1
            batch["input_features"], batch["feature_attention_mask"] = feats, fmask
        if s.needs_mm_token_type_ids:
            types = torch.zeros_like(input_ids, dtype=torch.int32)
            for code, name in ((1, "image"), (2, "video")):
                if name in s.token_ids:
                    types = types.masked_fill(input_ids == s.token_ids[name], code)
            batch["mm_token_type_ids"] = types
        return batch

    def categories(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Per token: 0 text (every non-placeholder token, markers and BOS included), ``1 + i`` the
        i-th of ``spec.modalities``, -1 padding."""
        cat = torch.zeros_like(input_ids)
        for i, name in enumerate(self.spec.modalities):
            cat = cat.masked_fill(input_ids == self.spec.token_ids[name], i + 1)
        return cat.masked_fill(attention_mask == 0, -1)


# --- loading ---------------------------------------------------------------------------------------


def load_model(path: str):
    """``(model, tokenizer)`` from a local checkpoint directory (the demo's word vocabulary when the
    directory has one, else the Hugging Face tokenizer saved with the model)."""
    from modkern.data import WordTokenizer
    from modkern.train import load_checkpoint

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DiagnoseError(f"--model {path}: no such directory (a local Hugging Face checkpoint is expected)")
    try:
        model = load_checkpoint(path)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DiagnoseError(f"--model {path}: {exc}") from None
    vocab = os.path.join(path, TOKENIZER_FILE)
    if os.path.exists(vocab):
        return model, WordTokenizer.load(vocab)
    try:
        from transformers import AutoTokenizer

        return model, AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any loader failure means: no usable tokenizer there
        raise DiagnoseError(f"--model {path}: no tokenizer ({TOKENIZER_FILE} or a Hugging Face one): {exc}") from None


# --- metrics ---------------------------------------------------------------------------------------


def _to(batch: dict, device) -> dict:
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


def _forward(model, batch: dict, device, attentions: bool = False):
    inputs = {k: v for k, v in _to(batch, device).items() if k != "labels"}
    inputs["use_cache"] = False
    if attentions:
        inputs["output_attentions"] = True
    out = model(**inputs)
    shifted = shift_labels(batch["labels"]).to(out.logits.device)
    rows = shifted != IGNORE_INDEX
    b_idx = rows.nonzero()[:, 0]
    ans = AnswerRows(out.logits[rows].float(), shifted[rows], b_idx)
    return ans, rows, out


def item_metrics(rows: AnswerRows, n_items: int) -> dict:
    """Per item (``[n_items]``): ``correct`` (bool), ``p_correct`` (probability of the whole answer,
    teacher-forced), and per row ``pred`` (argmax)."""
    logp = torch.log_softmax(rows.logits, dim=-1)
    tok_logp = logp.gather(1, rows.target[:, None])[:, 0]
    pred = rows.logits.argmax(-1)
    wrong = torch.zeros(n_items, device=pred.device).index_add_(0, rows.item, (pred != rows.target).float())
    logp_item = torch.zeros(n_items, device=pred.device).index_add_(0, rows.item, tok_logp)
    return {"correct": wrong == 0, "p_correct": logp_item.exp(), "pred": pred}


def compare(clean: AnswerRows, pert: AnswerRows, n_items: int, backend: str = "auto") -> dict:
    """Per item metrics of a perturbed batch against its clean batch (rows paired in order)."""
    from modkern import fused_js

    if clean.logits.shape != pert.logits.shape:
        raise RuntimeError(
            f"clean and perturbed items have different answer lengths ({clean.logits.shape[0]} vs "
            f"{pert.logits.shape[0]} answer tokens); a condition must keep the answer"
        )
    mc, mp = item_metrics(clean, n_items), item_metrics(pert, n_items)
    dev = clean.logits.device
    flips = torch.zeros(n_items, device=dev).index_add_(0, pert.item, (mc["pred"] != mp["pred"]).float())
    js_rows = fused_js(clean.logits, pert.logits, reduction="none", backend=backend).float()
    count = torch.zeros(n_items, device=dev).index_add_(0, pert.item, torch.ones_like(js_rows))
    js = torch.zeros(n_items, device=dev).index_add_(0, pert.item, js_rows) / count.clamp_min(1)
    return {
        "clean_correct": mc["correct"],
        "correct": mp["correct"],
        "flip": flips > 0,
        "effect": mc["p_correct"] - mp["p_correct"],
        "js": js,
    }


def _stats(x: Tensor) -> dict:
    x = x.double()
    std = float(x.std(unbiased=True)) if x.numel() > 1 else 0.0
    return {"mean": float(x.mean()), "std": std}


def cohens_d(a: Tensor, b: Tensor) -> Tensor:
    """Cohen's d of ``a [na, ...]`` against ``b [nb, ...]`` along dim 0, pooled std with n-1 variances;
    NaN where it is undefined (fewer than two items on a side, or zero pooled std)."""
    a, b = a.double(), b.double()
    na, nb = a.shape[0], b.shape[0]
    if na < 2 or nb < 2:
        return torch.full(a.shape[1:], float("nan"), dtype=torch.float64)
    pooled = (((na - 1) * a.var(0, unbiased=True) + (nb - 1) * b.var(0, unbiased=True)) / (na + nb - 2)).sqrt()
    d = (a.mean(0) - b.mean(0)) / pooled
    return torch.where(pooled > 0, d, torch.full_like(d, float("nan")))


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


# --- progress --------------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar on a terminal, plain periodic lines otherwise (logs, CI), nothing when disabled."""

    def __init__(self, total: int, enabled: bool, log, desc: str = "diagnose"):
        self.total, self.done, self.log, self.desc = total, 0, log, desc
        self.bar = None
        # the bar goes to stderr (tqdm's stream), so it is drawn only when stderr is a terminal
        from modkern.train import _interactive

        self.tty = enabled and _interactive(sys.stderr)
        self.enabled = enabled
        self.next_pct = 10
        self.start = time.perf_counter()
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True, leave=False)

    def update(self, n: int):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            pct = 100 * self.done // max(self.total, 1)
            if pct >= self.next_pct or self.done >= self.total:
                self.log(
                    f"{self.desc}: {self.done}/{self.total} items ({pct}%), {time.perf_counter() - self.start:.1f} s"
                )
                self.next_pct = (pct // 10 + 1) * 10

    def close(self):
        if self.bar is not None:
            self.bar.close()


# --- the diagnosis ---------------------------------------------------------------------------------


def _set_eager(model: nn.Module):
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


def resolve_conditions(names, spec: ModelSpec, kinds_present) -> tuple[list[Condition], dict]:
    """The conditions to run and ``{name: reason}`` for those skipped (never silently)."""
    if names is None:
        names = list(CONDITIONS)
    elif isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:  # e.g. --conditions "" from an unset variable: not a run that measures nothing
        raise DiagnoseError(f"no condition names given; choose from {', '.join(CONDITIONS)} (or leave it out for all)")
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        raise DiagnoseError(f"unknown condition(s) {unknown}; choose from {', '.join(CONDITIONS)}")
    run, skipped = [], {}
    for n in names:
        c = CONDITIONS[n]
        missing = [m for m in c.requires if m not in spec.modalities]
        if missing:
            skipped[n] = f"the model ({spec.family}) takes no {' or '.join(missing)} input"
        elif not any(k in kinds_present for k in c.kinds):
            skipped[n] = f"no {' or '.join(c.kinds)} items in the data"
        else:
            run.append(c)
    return run, skipped


def diagnose(
    model,
    *,
    out: Optional[str] = None,
    tokenizer=None,
    items: Optional[Sequence[Item]] = None,
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
        tokenizer: a :class:`modkern.data.WordTokenizer` or a Hugging Face tokenizer (read from the
            checkpoint directory when ``model`` is a path).
        items: clean :class:`Item` s (default: the built-in tasks the model can take: the demo's
            image/text colour task, and an audio-visual one for models with audio and video).
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
    from modkern.train import resolve_device

    log = log or (lambda *a, **k: None)
    start = time.perf_counter()
    if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
        raise DiagnoseError(f"max_items must be an int >= 1, got {max_items!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DiagnoseError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if out is not None:  # before the run, not after it: a bad --out or no matplotlib would lose the results
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise DiagnoseError("diagnosis.png needs matplotlib: pip install 'modkern[demo]' (or pass out=None)")
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as exc:
            raise DiagnoseError(f"--out {out}: cannot create the output directory ({exc})") from None
    source = None
    if isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        model, loaded_tok = load_model(source)
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    elif not isinstance(model, nn.Module):
        raise DiagnoseError(f"model must be a checkpoint directory or a Hugging Face model, got {type(model).__name__}")
    if tokenizer is None:
        raise DiagnoseError("tokenizer is required when model is a loaded model")
    spec = ModelSpec.from_model(model)
    try:
        dev = resolve_device(device)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError / ValueError for bad names
        raise DiagnoseError(f"--device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiagnoseError(f"--device {device}: CUDA is not available on this machine")
    torch.manual_seed(seed)

    builtin = items is None
    if builtin:
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
    else:
        items = list(items)
        if not all(isinstance(it, Item) for it in items):
            raise DiagnoseError("items must be modkern.diagnose.Item objects")
        per_kind: dict = {}
        kept = []
        for it in items:
            if per_kind.get(it.kind, 0) < max_items:
                per_kind[it.kind] = per_kind.get(it.kind, 0) + 1
                kept.append(it)
        items = kept
    if not items:
        raise DiagnoseError("no items to diagnose")
    kinds_present = sorted({it.kind for it in items}, key=KINDS.index)
    run, skipped = resolve_conditions(conditions, spec, kinds_present)

    # Perturbed copies of every item, made up front (deterministic for the seed).
    classes = _classes(items)
    if builtin:  # the task's colours, also when max_items leaves some out
        from modkern.data import InterferenceTask

        classes = sorted(set(classes) | set(InterferenceTask().colours))
    # An item a condition cannot build (no image to replace, no donor of another class) is left out
    # of it and counted with the reason; a condition with no item at all is skipped with the reasons.
    perturbed, not_built = {}, {}
    for c in run:
        ctx = _condition_ctx(seed, c.name, classes)  # a condition's variants do not depend on the others chosen
        idx, variants, reasons = [], [], {}
        for i, it in enumerate(items):
            if it.kind not in c.kinds:
                continue
            try:
                variants.append(c.make(items, i, ctx))
            except _NotBuilt as exc:
                reasons[str(exc)] = reasons.get(str(exc), 0) + 1
                continue
            idx.append(i)
        if idx:
            perturbed[c.name], not_built[c.name] = (idx, variants), reasons
        else:
            skipped[c.name] = "; ".join(f"{reason} ({n} item{'s' if n > 1 else ''})" for reason, n in reasons.items())
    run = [c for c in run if c.name in perturbed]

    collate = Collator(spec, tokenizer)
    was_training = model.training
    model.eval()
    model.to(dev)
    previous_attn = _set_eager(model) if attention else None
    n = len(items)
    acc = {name: {k: [] for k in ("idx", "clean_correct", "correct", "flip", "effect", "js")} for name in perturbed}
    clean_correct = torch.zeros(n, dtype=torch.bool)
    shares = []
    bar = _Progress(n, progress, log)
    try:
        with torch.no_grad():
            for lo in range(0, n, batch_size):
                chunk = list(range(lo, min(lo + batch_size, n)))
                batch = collate([items[i] for i in chunk])
                clean, rows, output = _forward(model, batch, dev, attentions=attention)
                clean_correct[lo : lo + len(chunk)] = item_metrics(clean, len(chunk))["correct"].cpu()
                if attention:
                    atts = getattr(output, "attentions", None)
                    if not atts:
                        raise DiagnoseError(
                            f"{type(model).__name__} returned no attentions with output_attentions=True under eager "
                            "attention; run without the white-box part (--no-attention / attention=False)"
                        )
                    cats = collate.categories(batch["input_ids"], batch["attention_mask"]).to(rows.device)
                    shares.append(attention_share(atts, rows, cats, 1 + len(spec.modalities)).cpu())
                del output
                for name, (idx, variants) in perturbed.items():
                    local = [j for j, i in enumerate(idx) if lo <= i < lo + len(chunk)]
                    if not local:
                        continue
                    sub_items = torch.tensor([idx[j] - lo for j in local], device=clean.item.device)
                    pert, _, _ = _forward(model, collate([variants[j] for j in local]), dev)
                    pert.item = sub_items[pert.item]
                    m = compare(clean.select(sub_items), pert, len(chunk), backend=backend)
                    a = acc[name]
                    a["idx"].append(sub_items.cpu() + lo)
                    for key in ("clean_correct", "correct", "flip", "effect", "js"):
                        a[key].append(m[key][sub_items].cpu())
                bar.update(len(chunk))
    finally:
        bar.close()
        if previous_attn is not None:
            model.set_attn_implementation(previous_attn)
        model.train(was_training)

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
        a = acc[c.name]
        cat = {k: torch.cat(v) for k, v in a.items()}
        report["conditions"][c.name] = {
            "description": c.description,
            "applies_to": [k for k in c.kinds if k in kinds_present],
            "items": int(cat["idx"].numel()),
            "items_skipped": sum(not_built[c.name].values()),
            "items_skipped_reasons": not_built[c.name],
            "accuracy": float(cat["correct"].double().mean()),
            "clean_accuracy": float(cat["clean_correct"].double().mean()),
            "flip_rate": float(cat["flip"].double().mean()),
            "causal_effect": _stats(cat["effect"]),
            "js": _stats(cat["js"]),
        }
    if attention:
        report["attention"] = _attention_report(torch.cat(shares), kinds, report["modalities"])
    report.update(
        settings=dict(max_items=max_items, batch_size=batch_size, device=str(dev), seed=seed, backend=backend),
        seconds=time.perf_counter() - start,
    )
    log(format_table(report))
    if out is not None:
        os.makedirs(out, exist_ok=True)
        report["files"] = {"json": os.path.join(out, "diagnosis.json"), "png": os.path.join(out, "diagnosis.png")}
        plot_report(report, report["files"]["png"])
        with open(report["files"]["json"], "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, allow_nan=False)
        log(f"wrote {report['files']['json']} and {report['files']['png']}")
    return report


def _nan_to_none(x):
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _attention_report(shares: Tensor, kinds: Tensor, modalities: list) -> dict:
    """Mean share [layer][modality] overall and per prompt type, Cohen's d between prompt types."""
    out = {
        "query": "answer positions (the logits that predict the answer tokens), mean over heads and positions",
        "modalities": modalities,
        "layers": int(shares.shape[1]),
        "share": shares.mean(0).tolist(),
        "share_by_prompt_type": {},
        "items_by_prompt_type": {},
        "cohens_d": {},
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
            out["cohens_d"][f"{PROMPT_TYPES[a]} vs {PROMPT_TYPES[b]}"] = _nan_to_none(d.tolist())
    return out


# --- report ----------------------------------------------------------------------------------------


def format_table(report: dict) -> str:
    """The console table: clean accuracy per item kind, then one row per condition (and the skipped
    ones with their reason), then the attention share per layer x modality."""
    lines = [
        f"{'condition':<26} {'items':>5} {'acc.':>6} {'clean':>6} {'flip':>6} {'causal effect':>15} {'JS':>17}",
    ]
    for k, v in report["clean"].items():
        lines.append(f"{'clean ' + k:<26} {report['items'][k]:>5} {v['accuracy']:>6.3f}")
    for name, c in report["conditions"].items():
        ce, js = c["causal_effect"], c["js"]
        lines.append(
            f"{name:<26} {c['items']:>5} {c['accuracy']:>6.3f} {c['clean_accuracy']:>6.3f} {c['flip_rate']:>6.3f} "
            f"{ce['mean']:>+7.3f} ± {ce['std']:<5.3f} {js['mean']:>8.2e} ± {js['std']:<6.1e}"
        )
        for reason, count in c.get("items_skipped_reasons", {}).items():
            lines.append(f"{'':<26} {count} item(s) left out: {reason}")
    for name, reason in report["skipped"].items():
        lines.append(f"{name:<26} skipped: {reason}")
    att = report.get("attention")
    if att:
        mods = att["modalities"]
        lines.append("")
        lines.append("attention share of the answer positions (rows: layer)")
        for ptype, share in [("all items", att["share"]), *att["share_by_prompt_type"].items()]:
            lines.append(f"  {ptype:<16}" + "".join(f"{m:>9}" for m in mods))
            for li, row in enumerate(share):
                lines.append(f"  {'layer ' + str(li):<16}" + "".join(f"{v:>9.3f}" for v in row))
        for pair, d in att["cohens_d"].items():
            lines.append(f"  Cohen's d, {pair}")
            for li, row in enumerate(d):
                cells = "".join(f"{'-':>9}" if v is None else f"{v:>+9.2f}" for v in row)
                lines.append(f"  {'layer ' + str(li):<16}" + cells)
    return "\n".join(lines)


def plot_report(report: dict, path: str) -> str:
    """``diagnosis.png``: flip rate and JS per condition (bars), attention share (layer x modality)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["conditions"])
    att = report.get("attention")
    fig, axes = plt.subplots(1, 3 if att else 2, figsize=(15 if att else 11, 4.2))
    xs = range(len(names))
    flip = [report["conditions"][n]["flip_rate"] for n in names]
    js = [report["conditions"][n]["js"]["mean"] for n in names]
    for ax, vals, title in ((axes[0], flip, "flip rate"), (axes[1], js, "JS (clean vs perturbed), nats")):
        ax.bar(list(xs), vals, color="tab:blue" if title == "flip rate" else "tab:orange")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
    axes[0].set_ylim(0, 1.05)
    if att:
        share = torch.tensor(att["share"])
        ax = axes[2]
        im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(att["modalities"])))
        ax.set_xticklabels(att["modalities"])
        ax.set_yticks(range(att["layers"]))
        ax.set_ylabel("layer")
        ax.set_title("attention share of the answer positions")
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"modkern diagnose: {report['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
