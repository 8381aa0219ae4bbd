"""Media files of the data files: images, videos (frames) and audio (WAV), read without a download.

* Images: any file Pillow reads (PNG, JPEG, ...), as ``[3, H, W]`` float32 in [0, 1].
* Videos (:data:`VIDEO_FORMATS`): a **folder of frame images** (PNG / JPEG / ..., in the order of
  their names, numbers compared as numbers: ``frame_2.png`` before ``frame_10.png``), or a
  **multi-frame image file** Pillow reads: animated GIF, animated WebP, APNG, multi-page TIFF. As
  ``[T, 3, H, W]`` float32 in [0, 1]; every frame must have the first frame's size. Compressed clips
  (MP4, AVI, MOV, MKV, WebM) need a video decoder (PyAV, decord, torchcodec) that modkern does not
  depend on: extract their frames first (e.g. ``ffmpeg -i clip.mp4 -vf fps=2 clip/%04d.png``).
* Audio: **WAV** files of integer PCM (8, 16, 24 or 32 bits), any number of channels (averaged to
  mono), any sampling rate (resampled linearly to the one asked for, the feature extractor's), as a
  float32 waveform in [-1, 1] (Python's own ``wave`` module: nothing to install).

Every reader raises a :class:`ValueError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import os
import re
import wave

import torch
import torch.nn.functional as F
from torch import Tensor

VIDEO_FORMATS = "a folder of frame images, or an animated GIF / WebP / PNG or a multi-page TIFF"
COMPRESSED_VIDEO = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def _rgb_tensor(img) -> Tensor:
    rgb = img.convert("RGB")
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float().div_(255.0)


def load_image(path: str) -> Tensor:
    """The image file at ``path`` as ``[3, H, W]`` float32 in [0, 1] (RGB)."""
    from PIL import Image

    with Image.open(path) as img:
        return _rgb_tensor(img)


def to_pil(image: Tensor):
    """A ``[3, H, W]`` image in [0, 1] as an 8-bit RGB PIL image (what every image processor takes)."""
    from PIL import Image

    pixels = to_uint8(image).permute(1, 2, 0).contiguous()
    return Image.frombytes("RGB", (pixels.shape[1], pixels.shape[0]), pixels.numpy().tobytes())


def to_uint8(pixels: Tensor) -> Tensor:
    """Pixels in [0, 1] as 8-bit values (rounded): what an image file stores, what processors take."""
    return pixels.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def check_video_format(path: str, name: str = "") -> None:
    """A ValueError for a compressed clip (``name``: how the data file writes ``path``)."""
    if path.lower().endswith(COMPRESSED_VIDEO):
        raise ValueError(
            f"video {name or path!r}: compressed clips need a video decoder modkern does not install; give "
            f"{VIDEO_FORMATS} (e.g. ffmpeg -i clip.mp4 -vf fps=2 clip/%04d.png)"
        )


def load_video(path: str) -> Tensor:
    """The video at ``path`` (:data:`VIDEO_FORMATS`) as ``[T, 3, H, W]`` float32 in [0, 1]."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    check_video_format(path)
    try:
        if os.path.isdir(path):
            names = sorted((n for n in os.listdir(path) if not n.startswith(".")), key=_natural_key)
            frames = []
            for name in names:
                with Image.open(os.path.join(path, name)) as img:
                    frames.append(_rgb_tensor(img))
        else:
            with Image.open(path) as img:
                frames = [_rgb_tensor(frame) for frame in ImageSequence.Iterator(img)]
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"video {path!r}: not readable as {VIDEO_FORMATS} ({type(exc).__name__}: {exc})") from None
    if not frames:
        raise ValueError(f"video {path!r}: no frames")
    sizes = {tuple(f.shape[1:]) for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"video {path!r}: frames of different sizes {sorted(sizes)}")
    return torch.stack(frames)


def load_wav(path: str, sampling_rate: int) -> Tensor:
    """The WAV file at ``path`` as a mono float32 waveform in [-1, 1] at ``sampling_rate`` Hz
    (channels averaged; resampled linearly when the file has another rate)."""
    try:
        with wave.open(path, "rb") as f:
            width, channels, rate, n = f.getsampwidth(), f.getnchannels(), f.getframerate(), f.getnframes()
            raw = f.readframes(n)
    except (wave.Error, EOFError, OSError) as exc:
        raise ValueError(f"audio {path!r}: not a readable PCM WAV file ({exc})") from None
    if n == 0:
        raise ValueError(f"audio {path!r}: no samples")
    if width == 1:  # 8-bit WAV is unsigned
        samples = torch.frombuffer(bytearray(raw), dtype=torch.uint8).float().sub_(128.0).div_(128.0)
    elif width in (2, 4):
        dtype = torch.int16 if width == 2 else torch.int32
        samples = torch.frombuffer(bytearray(raw), dtype=dtype).double().div_(2.0 ** (8 * width - 1)).float()
    elif width == 3:  # 24-bit little-endian: sign-extend each 3-byte sample
        b = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, 3).int()
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        samples = torch.where(value >= 2**23, value - 2**24, value).float().div_(2.0**23)
    else:
        raise ValueError(f"audio {path!r}: {8 * width}-bit samples are not supported (8, 16, 24 or 32-bit PCM)")
    wav = samples.view(-1, channels).mean(dim=1)
    if rate != sampling_rate:
        length = max(1, round(wav.numel() * sampling_rate / rate))
        wav = F.interpolate(wav.view(1, 1, -1), size=length, mode="linear", align_corners=False).view(-1)
    return wav.contiguous()


def write_wav(path: str, waveform: Tensor, sampling_rate: int) -> str:
    """``waveform`` (1-D, in [-1, 1]) as a 16-bit mono WAV file at ``path``."""
    pcm = waveform.detach().float().clamp(-1, 1).mul(32767).round().to(torch.int16)
    with wave.open(os.fspath(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sampling_rate)
        f.writeframes(pcm.numpy().tobytes())
    return os.fspath(path)
