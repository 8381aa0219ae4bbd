"""Qwen-VL / Qwen2.5-Omni processors where torchvision is not installed: a torch-only video processor.

transformers 5 builds the Qwen families' video processor (``Qwen2VLVideoProcessor``) only with
torchvision, so without it neither ``AutoProcessor.from_pretrained`` of a Qwen2-VL / Qwen2.5-VL /
Qwen2.5-Omni checkpoint nor a processor for its tiny checkpoints can be made. Here:

* :class:`FramesVideoProcessor`: that video processor's computation on frame tensors in plain
  torch: each video's frames resized to Qwen's ``smart_resize`` grid (bicubic with antialiasing,
  rounded to 8 bits; no-op when the frames already have the size), rescaled, normalized (CLIP's
  mean / std), padded to a multiple of ``temporal_patch_size`` by repeating the last frame, cut into
  ``patch_size`` patches in ``merge_size`` blocks; it reads and writes the same
  ``video_preprocessor_config.json``;
* :func:`without_torchvision` ``(cls)``: the family's processor class holding one;
* :func:`load_processor`: ``AutoProcessor.from_pretrained``, falling back to those where the
  checkpoint's processor needs torchvision and it is missing.

Where torchvision is installed, the checkpoint loads with transformers' own classes.
"""

from __future__ import annotations

import importlib.util
import json
import os

import torch
import torch.nn.functional as F

from modkern.apps.tiny_models import qwen_video_pixel_values

CONFIG_NAME = "video_preprocessor_config.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's frame size: both sides multiples of ``factor``, the area within [min, max] pixels,
    the aspect ratio kept as closely as possible."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as qwen_smart_resize

    return qwen_smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


class FramesVideoProcessor:
    """``Qwen2VLVideoProcessor`` in plain torch (see the module): videos ``[T, 3, H, W]`` (8-bit
    values) -> ``pixel_values_videos`` ``[sum of patches, 3 * temporal_patch_size * patch_size²]`` and
    ``video_grid_thw`` ``[n, 3]``."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(
        self,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        size: dict | None = None,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        rescale_factor: float = 1 / 255,
        **_ignored,
    ):
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.size = dict(size or {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28})
        self.image_mean, self.image_std, self.rescale_factor = list(image_mean), list(image_std), rescale_factor

    def __call__(self, videos, size: dict | None = None, **_kwargs):
        from transformers import BatchFeature

        size = dict(size or self.size)
        factor = self.patch_size * self.merge_size
        info = {
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "spatial_merge_size": self.merge_size,
        }
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        pixels, grids = [], []
        for video in videos:
            frames = torch.as_tensor(video).float()
            h, w = smart_resize(frames.shape[-2], frames.shape[-1], factor, size["shortest_edge"], size["longest_edge"])
            if (h, w) != tuple(frames.shape[-2:]):
                frames = F.interpolate(frames, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
                frames = frames.round().clamp(0, 255)
            frames = (frames * self.rescale_factor - mean) / std
            if pad := -frames.shape[0] % self.temporal_patch_size:
                frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
            values, grid = qwen_video_pixel_values(frames.unsqueeze(0), info)
            pixels.append(values)
            grids.append(grid)
        return BatchFeature({"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.cat(grids)})

    def to_dict(self) -> dict:
        return {
            "video_processor_type": "Qwen2VLVideoProcessor",
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "size": self.size,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "rescale_factor": self.rescale_factor,
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "resample": 3,
        }

    def save_pretrained(self, path) -> str:
        os.makedirs(path, exist_ok=True)
        file = os.path.join(path, CONFIG_NAME)
        with open(file, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
        return file

    @classmethod
    def from_pretrained(cls, path) -> FramesVideoProcessor:
        with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
            return cls(**json.load(f))


def without_torchvision(cls):
    """A subclass of the processor class ``cls`` whose video processor is a
    :class:`FramesVideoProcessor` (None: images, text and audio only), saved and loaded with the
    checkpoint like transformers' own."""

    attributes = [a for a in cls.get_attributes() if a != "video_processor"]

    def __init__(self, video_processor=None, chat_template=None, **parts):
        from transformers.processing_utils import ProcessorMixin

        ProcessorMixin.__init__(self, chat_template=chat_template, **parts)
        self.video_processor = video_processor
        tok = self.tokenizer
        defaults = {"image": "<|image_pad|>", "video": "<|video_pad|>"}
        for name in ("image", "video", "audio"):
            token = getattr(tok, f"{name}_token", None) or defaults.get(name)
            if token is not None:
                setattr(self, f"{name}_token", token)
                setattr(self, f"{name}_token_id", tok.convert_tokens_to_ids(token))
        for name in ("vision_bos_token", "vision_eos_token", "audio_bos_token", "audio_eos_token"):
            if getattr(tok, name, None) is not None:
                setattr(self, name, getattr(tok, name))

    def save_pretrained(self, path, **kwargs):
        out = cls.save_pretrained(self, path, **kwargs)
        if self.video_processor is not None:
            self.video_processor.save_pretrained(path)
        return out

    def to_dict(self):
        video = self.__dict__.pop("video_processor", None)  # saved in its own file, not processor_config.json
        try:
            return cls.to_dict(self)
        finally:
            self.video_processor = video

    def from_pretrained(klass, path, **kwargs):
        processor = cls.from_pretrained.__func__(klass, path, **kwargs)
        if os.path.isfile(os.path.join(path, CONFIG_NAME)):
            processor.video_processor = FramesVideoProcessor.from_pretrained(path)
        return processor

    return type(
        cls.__name__,
        (cls,),
        {
            "__init__": __init__,
            "get_attributes": classmethod(lambda c: list(attributes)),
            "save_pretrained": save_pretrained,
            "to_dict": to_dict,
            "from_pretrained": classmethod(from_pretrained),
            "without_torchvision": True,
        },
    )


def load_processor(path: str):
    """``AutoProcessor.from_pretrained(path)``; where that fails for want of torchvision (a Qwen
    family's video processor), the family's class with a :class:`FramesVideoProcessor`."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except Exception:
        if importlib.util.find_spec("torchvision") is not None:
            raise
        name = _processor_class(path)
        import transformers

        cls = getattr(transformers, name or "", None)
        if cls is None or "video_processor" not in cls.get_attributes():
            raise
    return without_torchvision(cls).from_pretrained(path)


def _processor_class(path: str):
    for name in ("processor_config.json", "preprocessor_config.json"):
        try:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                found = json.load(f).get("processor_class")
        except (OSError, ValueError):
            continue
        if found:
            return found
    return None
