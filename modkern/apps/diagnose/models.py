"""What a model takes (:class:`ModelSpec`), how items become its batches (:class:`Collator`), loading a checkpoint."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from modkern.apps.diagnose.items import TOKENIZER_FILE, DiagnoseError, Item
from modkern.apps.synthetic_task import WordTokenizer, hf_text_encoder
from modkern.apps.tiny_models import omni_audio_tokens, qwen2_vl_pixel_values, qwen_video_pixel_values
from modkern.apps.train_loop import load_checkpoint
from modkern.constants import IGNORE_INDEX
from modkern.objective.alignment import AV_KINDS, AVSample
from modkern.objective.augment import right_pad
from modkern.objective.config import SAMPLE_KINDS
from modkern.objective.model_hooks import infer_token_ids

# --- models: what they take and how to feed them ---------------------------------------------------

QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# model_type of an Omni thinker -> its family (Qwen3-Omni's audio encoder places 13 tokens a second:
# its items come from data files, through its processor, never from the built-in Collator).
OMNI_TYPES = {"qwen2_5_omni_thinker": "qwen2_5_omni", "qwen3_omni_moe_thinker": "qwen3_omni"}


def config_value(config, name, default=None):
    value = getattr(config, name, None)
    return default if value is None else value


@dataclass
class ModelSpec:
    """What a multimodal checkpoint takes, read from its config."""

    family: str  # "llava", "qwen_vl", "qwen2_5_omni" or "qwen3_omni"
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
        if mt == "llava" or (mt not in (*QWEN_VL_TYPES, *OMNI_TYPES) and "image" in tid):
            vision = config.vision_config
            if "image" not in tid or not hasattr(vision, "image_size"):
                raise DiagnoseError(f"{type(model).__name__}: not a LLaVA-style model (image_token_id, vision_config)")
            n = (vision.image_size // vision.patch_size) ** 2
            n += 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0
            return cls("llava", ("image",), {"image": tid["image"]}, {}, vision.image_size, n)
        if mt in (*QWEN_VL_TYPES, *OMNI_TYPES):
            vision = config.vision_config
            ps, ms, tp = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
            size = 2 * ps * ms
            markers = {
                "vision_start": config_value(config, "vision_start_token_id", 151652),
                "vision_end": config_value(config, "vision_end_token_id", 151653),
            }
            common = dict(
                image_size=size,
                num_image_tokens=(size // ps // ms) ** 2,
                patch_size=ps,
                temporal_patch_size=tp,
                spatial_merge_size=ms,
                needs_mm_token_type_ids="mm_token_type_ids" in params,
            )
            if mt not in OMNI_TYPES:
                return cls("qwen_vl", ("image",), {"image": tid["image"]}, markers, **common)
            markers.update(
                audio_start=config_value(config, "audio_start_token_id", 151647),
                audio_end=config_value(config, "audio_end_token_id", 151648),
            )
            ids = {k: tid[k] for k in ("image", "video", "audio")}
            mel = config.audio_config.num_mel_bins
            return cls(
                OMNI_TYPES[mt],
                ("image", "video", "audio"),
                ids,
                markers,
                num_mel_bins=mel,
                video_frames=2 * tp,
                **common,
            )
        raise DiagnoseError(
            f"{type(model).__name__} (model_type {mt!r}): diagnose supports LLaVA, Qwen2-VL / Qwen2.5-VL and the "
            "Qwen2.5-Omni / Qwen3-Omni thinkers"
        )

    @property
    def num_video_tokens(self) -> int:
        return (self.video_frames // self.temporal_patch_size) * self.num_image_tokens


def text_encoder(tokenizer) -> Callable[[str], list]:
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
        if spec.family == "qwen3_omni":
            raise DiagnoseError("the Qwen3-Omni thinker is diagnosed on a data file (--data), through its processor")
        self.spec = spec
        self.encode_text = text_encoder(tokenizer)
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
        return token_categories(self.spec, input_ids, attention_mask)


def token_categories(spec: ModelSpec, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Per token: 0 text (every non-placeholder token, markers and BOS included), ``1 + i`` the
    i-th of ``spec.modalities``, -1 padding."""
    cat = torch.zeros_like(input_ids)
    for i, name in enumerate(spec.modalities):
        cat = cat.masked_fill(input_ids == spec.token_ids[name], i + 1)
    return cat.masked_fill(attention_mask == 0, -1)


class ChatItemCollator:
    """Items through the model's own processor and chat template (:class:`modkern.processing.ChatProcessor`):
    the batches of a data-file diagnosis, the same prompts as the robust fine-tuning's."""

    def __init__(self, spec: ModelSpec, processor):
        from modkern.processing import ChatProcessor

        self.spec = spec
        self.chat = ChatProcessor(processor)

    @staticmethod
    def sample(item: Item, answer: Optional[str] = None):
        """The sample :class:`~modkern.processing.ChatProcessor` takes: an audio-video one
        (:class:`~modkern.objective.alignment.AVSample`) for an item of :data:`AV_KINDS`."""
        from modkern.objective.augment import Sample

        answer = item.answer if answer is None else answer
        if item.kind in AV_KINDS:
            return AVSample(item.question, item.kind, item.video, item.audio, answer, context=item.context)
        kind = item.kind if item.kind in SAMPLE_KINDS else "vqa"
        return Sample(item.question, answer, item.image, kind, context=item.context)

    def __call__(self, items: Sequence[Item]) -> dict:
        batch = self.chat([self.sample(it) for it in items])
        batch.pop("sample_kind")
        return batch

    def option_targets(self, items: Sequence[Item]) -> tuple[Tensor, Tensor, Tensor]:
        """``(option_ids [n, max options], answer_option [n], position [n])`` of the multiple-choice
        items: the options' answers (the assistant turns with each letter) differ at one token, at
        answer position ``position``: each option's token there (-1 padding) and the index of the
        right one. -1 rows for free answers and for options that differ at more than one token
        (scored by exact match instead)."""
        width = max([len(it.options) for it in items] + [1])
        ids = torch.full((len(items), width), -1, dtype=torch.long)
        answer = torch.full((len(items),), -1, dtype=torch.long)
        position = torch.zeros(len(items), dtype=torch.long)
        for r, it in enumerate(items):
            letters = [letter for letter, _ in it.options]
            if it.answer.strip() not in letters:
                continue
            encoded = [self.chat.answer_ids(self.sample(it, letter)) for letter in letters]
            differing = {
                j for e in encoded for j, t in enumerate(e) if len(e) == len(encoded[0]) and t != encoded[0][j]
            }
            if any(len(e) != len(encoded[0]) for e in encoded) or len(differing) != 1:
                continue
            j = differing.pop()
            tokens = [e[j] for e in encoded]
            if len(set(tokens)) != len(tokens):
                continue
            ids[r, : len(tokens)] = torch.tensor(tokens)
            answer[r] = letters.index(it.answer.strip())
            position[r] = j
        return ids, answer, position

    def categories(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return token_categories(self.spec, input_ids, attention_mask)


# --- loading ---------------------------------------------------------------------------------------


def load_model(path: str):
    """``(model, tokenizer)`` from a local checkpoint directory (the demo's word vocabulary when the
    directory has one, else the Hugging Face tokenizer saved with the model)."""
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
