"""Media files of the data files: images, videos (frames) and audio (WAV), read without a download.

* Images: any file Pillow reads (PNG, JPEG, ...), as ``[3, H, W]`` float32 in [0, 1].
* Videos (:data:`VIDEO_FORMATS`): a **folder of frame images** (PNG / JPEG / ..., in the order of
  their names, numbers compared as numbers: ``frame_2.png`` before ``frame_10.png``), or a
  **multi-frame image file** Pillow reads: animated GIF, animated WebP, APNG, multi-page TIFF. As
  ``[T, 3, H, W]`` float32 in [0, 1]; every frame must have the first frame's size. Compressed clips
  (MP4, AVI, MOV, MKV, WebM) need a video decoder (PyAV, decord, torchcodec) that modkern does not
  depend on: extract their frames first (e.g. ``ffmpeg -i clip.mp4 -vf fps=2 clip/%04d.png``).
* Audio: **WAV** files of integer PCM (8, 16, 24 or 32 bits) or 32-bit float, plain or extensible
  headers, any number of channels (averaged to mono), any sampling rate (resampled linearly to the
  one asked for, the feature extractor's), as a float32 waveform in [-1, 1] (the RIFF chunks read
  here: nothing to install).

Every reader raises a :class:`ValueError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import os
import re
import wave
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

WAV_FORMATS = "integer PCM of 8, 16, 24 or 32 bits or 32-bit float"
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
    """A ValueError for a compressed clip file (``name``: how the data file writes ``path``)."""
    if path.lower().endswith(COMPRESSED_VIDEO) and not os.path.isdir(path):
        raise ValueError(
            f"video {name or path!r}: compressed clips need a video decoder modkern does not install; give "
            f"{VIDEO_FORMATS} (e.g. ffmpeg -i clip.mp4 -vf fps=2 clip/%04d.png)"
        )


def _frame_files(path: str) -> list:
    names = sorted((n for n in os.listdir(path) if not n.startswith(".")), key=_natural_key)
    return [os.path.join(path, n) for n in names]


def _video_frames(path: str, name: str, read, size) -> list:
    """``read(frame)`` of each frame of the video at ``path`` (a PIL image, open during the call);
    ``size(read(frame))``: the frame's size. A ValueError naming ``name`` for a compressed clip, an
    unreadable file or frame, no frames, or frames of different sizes."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    check_video_format(path, name)
    shown = repr(name or path)
    try:
        if os.path.isdir(path):
            frames = []
            for file in _frame_files(path):
                with Image.open(file) as img:
                    frames.append(read(img))
        else:
            with Image.open(path) as img:
                frames = [read(frame) for frame in ImageSequence.Iterator(img)]
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"video {shown}: not readable as {VIDEO_FORMATS} ({type(exc).__name__}: {exc})") from None
    if not frames:
        raise ValueError(f"video {shown}: no frames")
    sizes = {size(f) for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"video {shown}: frames of different sizes {sorted(sizes)}")
    return frames


def check_video(path: str, name: str = "") -> int:
    """The number of frames of the video at ``path``, from the image headers (no frame converted):
    the errors :func:`load_video` would raise later, naming ``name`` (how the data file writes it)."""
    return len(_video_frames(path, name, lambda img: img.size, lambda wh: wh))


def load_video(path: str) -> Tensor:
    """The video at ``path`` (:data:`VIDEO_FORMATS`) as ``[T, 3, H, W]`` float32 in [0, 1]."""
    return torch.stack(_video_frames(path, "", _rgb_tensor, lambda frame: tuple(frame.shape[1:])))


WAVE_PCM, WAVE_FLOAT, WAVE_EXTENSIBLE = 1, 3, 0xFFFE


@dataclass(frozen=True)
class WavLayout:
    """Where a WAV file's samples are and what they are (``encoding``: :data:`WAVE_PCM` or
    :data:`WAVE_FLOAT`, the sub-format of an extensible header already resolved)."""

    encoding: int
    channels: int
    rate: int
    width: int  # bytes a sample (of one channel)
    offset: int
    size: int


def wav_layout(path: str, name: str = "") -> WavLayout:
    """The layout of the WAV file at ``path`` from its RIFF chunks: integer PCM (8-32 bits) or 32-bit
    float, plain or ``WAVE_FORMAT_EXTENSIBLE`` (the header ffmpeg / sox write for > 2 channels or 24
    bits, which Python's ``wave`` module reads only from 3.12). A ValueError naming ``name`` (how the
    data file writes ``path``) and what is wrong."""
    shown = repr(name or path)
    fmt, data = None, None
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                raise ValueError(f"audio {shown}: not a WAV file (no RIFF/WAVE header)")
            while data is None:
                chunk = f.read(8)
                if len(chunk) < 8:
                    break
                size = int.from_bytes(chunk[4:], "little")
                if chunk[:4] == b"fmt ":
                    fmt = f.read(size)
                    f.seek(size & 1, os.SEEK_CUR)
                elif chunk[:4] == b"data":
                    start = f.tell()
                    data = (start, min(size, f.seek(0, os.SEEK_END) - start))  # streamed files: size 2^32 - 1
                else:
                    f.seek(size + (size & 1), os.SEEK_CUR)
    except OSError as exc:
        raise ValueError(f"audio {shown}: cannot read ({exc.strerror or exc})") from None
    if fmt is None or len(fmt) < 16 or data is None:
        raise ValueError(f"audio {shown}: not a readable WAV file (no {'fmt' if fmt is None else 'data'} chunk)")
    tag, channels = int.from_bytes(fmt[0:2], "little"), int.from_bytes(fmt[2:4], "little")
    rate, block = int.from_bytes(fmt[4:8], "little"), int.from_bytes(fmt[12:14], "little")
    if tag == WAVE_EXTENSIBLE and len(fmt) >= 26:
        tag = int.from_bytes(fmt[24:26], "little")  # the sub-format GUID starts with the format tag
    width = block // channels if channels else 0
    if tag not in (WAVE_PCM, WAVE_FLOAT) or channels == 0 or rate == 0 or (tag == WAVE_FLOAT and width != 4):
        raise ValueError(f"audio {shown}: format {tag} with {channels} channel(s) at {rate} Hz is not {WAV_FORMATS}")
    if width not in (1, 2, 3, 4):
        raise ValueError(f"audio {shown}: {8 * width}-bit samples are not {WAV_FORMATS}")
    if data[1] < block:
        raise ValueError(f"audio {shown}: no samples")
    return WavLayout(tag, channels, rate, width, data[0], data[1] - data[1] % block)


def load_wav(path: str, sampling_rate: int) -> Tensor:
    """The WAV file at ``path`` (:func:`wav_layout`) as a mono float32 waveform in [-1, 1] at
    ``sampling_rate`` Hz (channels averaged; resampled linearly when the file has another rate)."""
    layout = wav_layout(path)
    with open(path, "rb") as f:
        f.seek(layout.offset)
        raw = bytearray(f.read(layout.size))
    width = layout.width
    if layout.encoding == WAVE_FLOAT:
        samples = torch.frombuffer(raw, dtype=torch.float32).clone()
    elif width == 1:  # 8-bit WAV is unsigned
        samples = torch.frombuffer(raw, dtype=torch.uint8).float().sub_(128.0).div_(128.0)
    elif width in (2, 4):
        dtype = torch.int16 if width == 2 else torch.int32
        samples = torch.frombuffer(raw, dtype=dtype).double().div_(2.0 ** (8 * width - 1)).float()
    else:  # 24-bit little-endian: sign-extend each 3-byte sample
        b = torch.frombuffer(raw, dtype=torch.uint8).view(-1, 3).int()
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        samples = torch.where(value >= 2**23, value - 2**24, value).float().div_(2.0**23)
    wav = samples.view(-1, layout.channels).mean(dim=1)
    if layout.rate != sampling_rate:
        length = max(1, round(wav.numel() * sampling_rate / layout.rate))
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
