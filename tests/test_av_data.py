"""Audio-video samples in data files (issue 24, in part): WAV and frame files written here, read
through modkern.media / modkern.data, processed by a tiny Qwen2.5-Omni thinker's own processor
(torch-only video processor where torchvision is missing), alignment copies on the samples."""

import json
import math

import pytest
from tiny_models import write_clip

from modkern.apps.frames_video import load_processor
from modkern.apps.tiny_processors import save_tiny_checkpoint, tiny_model_and_processor
from modkern.data import DataFileError, read_samples
from modkern.media import load_video, load_wav
from modkern.objective.alignment import AlignmentConfig
from modkern.processing import processor_collator, to_sample

WORDS = ["What", "colour", "is", "the", "sound", "video", "red", "green", "caption"]


def _data_file(tmp_path):
    rows = []
    for k, (colour, rgb) in enumerate((("red", (255, 0, 0)), ("green", (0, 255, 0)))):
        video, audio = write_clip(tmp_path, f"clip{k}", rgb, colour, gif=k == 0)
        for modality, question in (("visual", "What colour is the video?"), ("audio", "What colour is the sound?")):
            rows.append(
                dict(type="audio_video", modality=modality, video=video, audio=audio, question=question,
                     answer=colour, audio_label=colour, visual_label=colour)
            )  # fmt: skip
    path = tmp_path / "av.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_media_readers(tmp_path):
    video, audio = write_clip(tmp_path, "c", (0, 0, 255), "red", gif=True)
    frames = load_video(str(tmp_path / video))
    assert frames.shape == (2, 3, 24, 20) and float(frames[0, 2].min()) == 1.0 and float(frames[0, 0].max()) == 0.0
    wav = load_wav(str(tmp_path / audio), 16000)
    assert wav.shape == (8000,) and 0.45 < float(wav.abs().max()) <= 0.5
    with pytest.raises(ValueError, match="decoder"):
        load_video(str(tmp_path / "clip.mp4"))


def test_av_data_file_through_the_omni_processor(tmp_path):
    data = read_samples(_data_file(tmp_path))
    assert [s.kind for s in data.samples] == ["av_visual", "av_audio", "av_visual", "av_audio"]
    samples = [to_sample(s) for s in data.samples]
    assert samples[0].video.shape == (2, 3, 24, 20) and samples[0].audio.shape == (8000,)
    model, processor = tiny_model_and_processor("qwen2_5_omni", words=WORDS)
    batch = processor_collator(processor, augment=AlignmentConfig(), seed=0, return_tags=True)(samples)
    tok = processor.tokenizer
    for r, (tag, ref) in enumerate(zip(batch["tags"], batch["ref_index"].tolist())):
        answer = tok.decode(batch["labels"][r][batch["labels"][r] >= 0]).replace("<|im_end|>", "").strip()
        kind = batch["sample_kind"][r]
        if tag == "clean":
            assert answer == samples[r].answer
        elif (tag == "misaligned_audio" and kind == "av_audio") or (tag == "misaligned_video" and kind == "av_visual"):
            assert ref == -1 and answer in ("red", "green")  # the queried stream changed: its own sample
        else:
            assert ref >= 0 and answer == samples[ref].answer  # the other stream changed: paired, same answer
    inputs = {k: v for k, v in batch.items() if k not in ("ref_index", "sample_kind", "tags")}
    out = model(**inputs)
    assert math.isfinite(float(out.loss.detach()))


def test_av_checkpoint_round_trip_and_bad_lines(tmp_path):
    ckpt = save_tiny_checkpoint("qwen2_5_omni", tmp_path / "ckpt", words=WORDS)
    processor = load_processor(ckpt)
    assert type(processor.video_processor).__name__ in ("FramesVideoProcessor", "Qwen2VLVideoProcessor")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(type="audio_video", modality="smell", video="x", question="q", answer="a")))
    with pytest.raises(DataFileError, match=r"bad.jsonl:1: 'modality'"):
        read_samples(bad)
