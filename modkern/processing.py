"""Data-file samples through the model's own processor and chat template: batches for the robust loss.

The path from a data file (:mod:`modkern.data`) to a batch of :func:`modkern.objective.robust.robust_loss`:

1. :func:`to_sample` turns a checked :class:`modkern.data.Sample` into an augmentation sample
   (:class:`modkern.objective.augment.Sample`): the image read from its file as ``[3, H, W]`` in
   [0, 1], the question's options, the facts; a text-heavy sample without an image gets a
   ``336 x 336`` uniform-noise one, as the official code gives it.
2. The paper's heuristic copies are made *on the sample* (:class:`modkern.objective.augment.HeuristicAugmenter`:
   text in front of the question, another / a black / a white image), so a copy is exactly what
   the processor makes of the changed sample.
3. :class:`ChatProcessor` renders each sample with the checkpoint's chat template (the official
   system prompt for image- and text-heavy samples, none for VQA; the image placeholder before the
   question), runs the processor on the prompts and images (its own image-token expansion and
   pixel layout: ``pixel_values`` plus ``image_sizes`` / ``image_grid_thw`` where the family has
   them) on the whole conversation, prompt and the template's assistant turn (the answer and the
   end-of-turn marker), and right-pads. ``labels`` are the assistant turn's tokens only, as the
   tokenizer makes them after the prompt.

:func:`processor_collator` ties the three together: the collator a ``DataLoader`` or a Hugging
Face ``Trainer`` takes, returning ``ref_index`` and ``sample_kind`` next to the model inputs.

Supported processors (:data:`SUPPORTED_PROCESSORS`): LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL,
the Qwen2.5-Omni thinker (image and audio-video samples), the Qwen3-Omni thinker (audio-video samples).
Example::

    from transformers import AutoProcessor
    from modkern.data import read_samples
    from modkern.processing import processor_collator, to_sample

    processor = AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")
    samples = [to_sample(s) for s in read_samples("train.jsonl").samples]
    collate = processor_collator(processor, seed=0)
    batch = collate(samples[:8])  # input_ids, attention_mask, labels, pixel_values, ref_index, sample_kind
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from modkern.constants import IGNORE_INDEX
from modkern.data import DataFileError
from modkern.data import Sample as DataSample
from modkern.media import load_image, load_video, load_wav, to_pil, to_uint8
from modkern.objective.alignment import AlignmentAugmenter, AlignmentConfig, AVSample
from modkern.objective.augment import AugmentConfig, HeuristicAugmenter, RobustCollator, Sample

# The official system prompt of image- and text-heavy samples (VQA samples have none).
OFFICIAL_SYSTEM_PROMPT = (
    "You are an expert at question answering. Given the question and the context image of the question, "
    "please output the answer. Please provide a concise answer, no explanation and further question."
)
SYSTEM_PROMPT_KINDS = ("image_heavy", "text_heavy")
NOISE_IMAGE_SIZE = 336  # the official text-heavy sample's noise image is 336 x 336
SAMPLING_RATE = 16000  # Whisper's feature extractor (the Omni thinkers' audio): 16 kHz
# Processor class -> the family's name (what modkern's processor path was tested with).
SUPPORTED_PROCESSORS = {
    "LlavaProcessor": "LLaVA-1.5",
    "LlavaNextProcessor": "LLaVA-NeXT",
    "Qwen2VLProcessor": "Qwen2-VL",
    "Qwen2_5_VLProcessor": "Qwen2.5-VL",
    "Qwen2_5OmniProcessor": "Qwen2.5-Omni thinker",
    "Qwen3OmniMoeProcessor": "Qwen3-Omni thinker",
}


class ProcessorError(ValueError):
    """A processor modkern cannot use (unsupported family, no chat template, a template it cannot split)."""


def to_sample(
    sample: DataSample, *, noise_size: int = NOISE_IMAGE_SIZE, seed: int = 0, sampling_rate: int = SAMPLING_RATE
):
    """A data-file sample as an augmentation :class:`~modkern.objective.augment.Sample` (image read),
    or an audio-video one as an :class:`~modkern.objective.alignment.AVSample` (frames and the WAV
    read, the audio resampled to ``sampling_rate``: the feature extractor's).

    A text-heavy sample without an image gets uniform noise of ``noise_size`` squared (its clean
    image is noise anyway, and the image copies need an image to replace)."""
    if sample.is_av:
        return _to_av_sample(sample, sampling_rate)
    if sample.image is not None:
        image = load_image(sample.image)
    elif sample.kind == "text_heavy":
        gen = torch.Generator().manual_seed(seed * 1_000_003 + sample.line)
        image = torch.rand((3, noise_size, noise_size), generator=gen)
    else:
        image = None
    return Sample(
        text=sample.question,
        answer=sample.answer,
        image=image,
        kind=sample.kind,
        facts=tuple(sample.facts),
        options=tuple(sample.options.values()),
    )


def sampling_rate_of(processor) -> int:
    """The audio sampling rate ``processor``'s feature extractor takes (:data:`SAMPLING_RATE` when
    it has none)."""
    return int(getattr(getattr(processor, "feature_extractor", None), "sampling_rate", None) or SAMPLING_RATE)


def _to_av_sample(sample: DataSample, sampling_rate: int) -> AVSample:
    try:
        video = load_video(sample.video)
        audio = load_wav(sample.audio, sampling_rate) if sample.audio is not None else None
    except ValueError as exc:  # a file that changed, or broke past its headers, since the data file was read
        raise DataFileError(f"{sample.source or 'data file'}:{sample.line}: {exc}") from None
    return AVSample(
        sample.question,
        sample.kind,
        video,
        audio,
        sample.answer,
        visual_label=sample.labels.get("visual"),
        audio_label=sample.labels.get("audio"),
        options=dict(sample.options),
    )


class ChatProcessor:
    """Samples -> a right-padded batch through ``processor`` and its chat template (see the module).

    Args:
        processor: a Hugging Face processor of :data:`SUPPORTED_PROCESSORS` with a chat template.
        system_prompt: the system turn of the samples of ``system_kinds`` (None: no system turn).
        system_kinds: the kinds that get it (the official code: image- and text-heavy).
    """

    def __init__(
        self,
        processor,
        *,
        system_prompt: Optional[str] = OFFICIAL_SYSTEM_PROMPT,
        system_kinds: Sequence[str] = SYSTEM_PROMPT_KINDS,
    ):
        check_processor(processor)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.system_prompt, self.system_kinds = system_prompt, tuple(system_kinds)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def messages(self, sample: Sample) -> list:
        """The chat of ``sample`` up to the assistant turn."""
        chat = []
        if self.system_prompt and sample.kind in self.system_kinds:
            chat.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        content = [{"type": name} for name, media in _media(sample) if media is not None]
        chat.append({"role": "user", "content": [*content, {"type": "text", "text": sample.prompt}]})
        return chat

    def prompt_text(self, sample: Sample) -> str:
        """The templated prompt, ending where the assistant's answer starts."""
        return self.processor.apply_chat_template(self.messages(sample), tokenize=False, add_generation_prompt=True)

    def turns(self, sample: Sample) -> tuple[str, str]:
        """``(prompt, assistant turn)``: :meth:`prompt_text`, and what the answered conversation
        adds to it (the answer and the template's end-of-turn marker, trailing whitespace dropped)."""
        messages = self.messages(sample)
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        answer = {"role": "assistant", "content": [{"type": "text", "text": sample.answer}]}
        full = self.processor.apply_chat_template([*messages, answer], tokenize=False)
        if not full.startswith(prompt):
            raise ProcessorError(
                "the chat template renders the conversation with the answer differently from the prompt with "
                "add_generation_prompt=True, so the answer tokens cannot be told apart; use a template whose "
                "generation prompt is a prefix of the answered conversation"
            )
        return prompt, full[len(prompt) :].rstrip()

    def answer_text(self, sample: Sample) -> str:
        """The assistant turn after :meth:`prompt_text` (see :meth:`turns`)."""
        return self.turns(sample)[1]

    def answer_ids(self, sample: Sample, turns: Optional[tuple[str, str]] = None) -> list:
        """The ids of :meth:`answer_text` as the tokenizer makes them *after the prompt* (a
        SentencePiece tokenizer encodes " A" alone differently from " A" after "ASSISTANT:"): the
        tail of the templated conversation's ids. A :class:`ProcessorError` when the prompt's ids
        are not a prefix of the conversation's (the answer would change the prompt's tokens).
        ``turns``: :meth:`turns` of ``sample``, when already rendered."""
        prompt, answer = self.turns(sample) if turns is None else turns
        head = self.tokenizer(prompt)["input_ids"]
        full = self.tokenizer(prompt + answer)["input_ids"]
        if full[: len(head)] != head:
            raise ProcessorError(
                "the tokenizer encodes the prompt differently when the answer follows it, so the answer tokens "
                "cannot be told apart; end the template's generation prompt at a token boundary"
            )
        return full[len(head) :]

    def __call__(self, samples: Sequence[Sample]) -> dict:
        samples = list(samples)
        if not samples:
            raise ValueError("samples must not be empty")
        turns = [self.turns(s) for s in samples]
        answers = [self.answer_ids(s, t) for s, t in zip(samples, turns)]
        conversations = [prompt + answer for prompt, answer in turns]
        media = {"image": [], "video": [], "audio": []}
        for s in samples:
            for name, value in _media(s):
                if value is not None:
                    media[name].append(value)
        if (media["video"] or media["audio"]) and getattr(self.processor, "feature_extractor", None) is None:
            raise ProcessorError(
                f"{type(self.processor).__name__} takes no audio or video: audio-video samples need the processor "
                "of an audio-video model (the Qwen2.5-Omni or Qwen3-Omni thinker)"
            )
        enc = self.processor(
            text=conversations,
            images=[to_pil(x) for x in media["image"]] or None,
            videos=[to_uint8(v) for v in media["video"]] or None,
            audio=[a.numpy() for a in media["audio"]] or None,
            return_tensors="pt",
            padding=True,
        )
        batch = _right_padded(dict(enc), [len(a) for a in answers], self.pad_token_id)
        batch["sample_kind"] = [s.kind for s in samples]
        return batch


def _media(sample) -> tuple:
    """``(name, value)`` of each input a sample can carry, in the prompt's order (the frames, then
    the sound, before the question; the image before the question)."""
    if isinstance(sample, AVSample):
        return (("video", sample.video), ("audio", sample.audio))
    return (("image", sample.image),)


def _right_padded(enc: dict, answer_lengths: list, pad_token_id: int) -> dict:
    """The processor's (padded) conversations right-padded, ``labels`` on each row's last
    ``answer_lengths[r]`` tokens (the assistant turn). Per-token keys of the processor
    (``mm_token_type_ids``, ...) follow their tokens."""
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    per_token = [k for k, v in enc.items() if isinstance(v, Tensor) and v.shape == ids.shape and k != "attention_mask"]
    lengths = [int(m.sum()) for m in mask]
    n, width = ids.shape[0], max(lengths)
    out = {k: torch.zeros((n, width), dtype=enc[k].dtype) for k in per_token}
    out["input_ids"].fill_(pad_token_id)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=enc["attention_mask"].dtype)
    for r, (length, answer) in enumerate(zip(lengths, answer_lengths)):
        for k in per_token:
            out[k][r, :length] = enc[k][r][mask[r]]
        labels[r, length - answer : length] = out["input_ids"][r, length - answer : length]
        attention[r, :length] = 1
    rest = {k: v for k, v in enc.items() if k not in per_token and k != "attention_mask"}
    return {**out, "attention_mask": attention, "labels": labels, **rest}


def check_processor(processor) -> str:
    """The family name of ``processor`` (:data:`SUPPORTED_PROCESSORS`), or a :class:`ProcessorError`
    naming what is missing."""
    name = next((c.__name__ for c in type(processor).__mro__ if c.__name__ in SUPPORTED_PROCESSORS), None)
    if name is None:
        name = type(processor).__name__
        raise ProcessorError(
            f"{name} is not a processor modkern supports; supported: "
            + ", ".join(f"{family} ({cls})" for cls, family in SUPPORTED_PROCESSORS.items())
        )
    for attr in ("tokenizer", "image_processor"):
        if getattr(processor, attr, None) is None:
            raise ProcessorError(f"{name} has no {attr}; save the checkpoint with its full processor")
    if not getattr(processor, "chat_template", None):
        raise ProcessorError(
            f"{name} has no chat_template: set processor.chat_template (the model's template) and save it "
            "with the checkpoint"
        )
    return SUPPORTED_PROCESSORS[name]


def processor_collator(
    processor,
    *,
    augment=None,
    copies: bool = True,
    seed: int = 0,
    system_prompt: Optional[str] = OFFICIAL_SYSTEM_PROMPT,
    return_tags: bool = False,
) -> RobustCollator:
    """The collator of the robust fine-tuning: clean samples, their heuristic copies (``augment``,
    default the official ones; ``copies=False``: none) and ``ref_index``, through :class:`ChatProcessor`.
    With an :class:`~modkern.objective.alignment.AlignmentConfig` as ``augment``, the samples are
    audio-video ones and the copies MMA-Bench's alignment copies."""
    if not copies:
        augmenter = None
    elif isinstance(augment, AlignmentConfig):
        augmenter = AlignmentAugmenter(augment, seed=seed)
    else:
        augmenter = HeuristicAugmenter(augment or AugmentConfig(), seed=seed)
    return RobustCollator(
        augmenter=augmenter, collate=ChatProcessor(processor, system_prompt=system_prompt), return_tags=return_tags
    )
