"""Audio-video samples in data files (issue 24): WAV and frame files written here, read through
modkern.media / modkern.data, processed by the own processor of a tiny Qwen2.5-Omni or Qwen3-Omni
thinker (torch-only video processor where torchvision is missing), alignment copies on the samples:
the answer rule of each copy kind, each copy the changed sample processed on its own."""

import json
import math

import pytest
import torch
from tiny_models import write_clip

from modkern.apps.frames_video import load_processor
from modkern.apps.tiny_processors import save_tiny_checkpoint, tiny_model_and_processor
from modkern.data import DataFileError, read_samples
from modkern.media import load_video, load_wav
from modkern.objective.alignment import AlignmentAugmenter, AlignmentConfig
from modkern.processing import ChatProcessor, processor_collator, to_sample

WORDS = ["What", "colour", "is", "the", "sound", "video", "red", "green", "caption"]
OMNI_FAMILIES = {"qwen2_5_omni": "Qwen2_5OmniProcessor", "qwen3_omni": "Qwen3OmniMoeProcessor"}


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


@pytest.mark.parametrize("family", OMNI_FAMILIES)
def test_av_data_file_through_the_omni_processor(tmp_path, family):
    data = read_samples(_data_file(tmp_path))
    assert [s.kind for s in data.samples] == ["av_visual", "av_audio", "av_visual", "av_audio"]
    samples = [to_sample(s) for s in data.samples]
    assert samples[0].video.shape == (2, 3, 24, 20) and samples[0].audio.shape == (8000,)
    model, processor = tiny_model_and_processor(family, words=WORDS)
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
    out.loss.backward()
    assert all(p.grad is not None for p in model.get_input_embeddings().parameters())


def _media_rows(batch, samples):
    """Per sample of a processed batch: its video patches and its audio features (None: no audio)."""
    patches = batch["pixel_values_videos"].split(batch["video_grid_thw"].prod(-1).tolist())
    features = iter(zip(batch["input_features"], batch["feature_attention_mask"]))
    rows = []
    for r, s in enumerate(samples):
        feature = None
        if s.audio is not None:
            f, mask = next(features)
            feature = f[:, mask.bool()]
        rows.append((patches[r], feature))
    return rows


@pytest.mark.parametrize("family", OMNI_FAMILIES)
def test_copies_are_the_changed_samples_processed_alone(tmp_path, family):
    samples = [to_sample(s) for s in read_samples(_data_file(tmp_path)).samples]
    _, processor = tiny_model_and_processor(family, words=WORDS)
    config = AlignmentConfig()
    batch = processor_collator(processor, augment=config, seed=3, return_tags=True)(samples)
    copies, _ = AlignmentAugmenter(config, seed=3)(samples)  # the collator's copies: same seed, same draws
    rows = samples + copies
    assert batch["tags"] == ["clean"] * len(samples) + [c.tag for c in copies] and len(copies) >= 8
    assert {c.tag for c in copies} == set(config.copies)
    chat = ChatProcessor(processor)
    for r, (sample, (patches, feature)) in enumerate(zip(rows, _media_rows(batch, rows))):
        alone = chat([sample])
        keep = batch["attention_mask"][r].bool()
        assert torch.equal(batch["input_ids"][r][keep], alone["input_ids"][0]), (r, batch["tags"][r])
        assert torch.equal(batch["labels"][r][keep], alone["labels"][0])
        assert torch.equal(patches, alone["pixel_values_videos"])
        if feature is None:
            assert "input_features" not in alone and processor.audio_token_id not in alone["input_ids"][0]
        else:
            _, alone_feature = _media_rows(alone, [sample])[0]
            torch.testing.assert_close(feature, alone_feature, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", OMNI_FAMILIES)
def test_av_checkpoint_round_trip_and_bad_lines(tmp_path, family):
    ckpt = save_tiny_checkpoint(family, tmp_path / "ckpt", words=WORDS)
    processor = load_processor(ckpt)
    assert type(processor).__name__ == OMNI_FAMILIES[family]
    assert type(processor.video_processor).__name__ in ("FramesVideoProcessor", "Qwen2VLVideoProcessor")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(type="audio_video", modality="smell", video="x", question="q", answer="a")))
    with pytest.raises(DataFileError, match=r"bad.jsonl:1: 'modality'"):
        read_samples(bad)
