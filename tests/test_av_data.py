"""Audio-video samples in data files (issue 24): WAV and frame files written here, read through
modkern.media / modkern.data, processed by the own processor of a tiny Qwen2.5-Omni or Qwen3-Omni
thinker (torch-only video processor where torchvision is missing), alignment copies on the samples:
the answer rule of each copy kind, each copy the changed sample processed on its own."""

import json
import math
import pathlib
import re
import struct

import pytest
import torch
from PIL import Image
from tiny_models import AV_WORDS, write_av_data, write_clip

from modkern.apps.frames_video import load_processor
from modkern.apps.tiny_processors import save_tiny_checkpoint, tiny_model_and_processor
from modkern.data import DataFileError, read_samples
from modkern.media import load_video, load_wav, wav_layout
from modkern.objective.alignment import ALIGNMENT_COPIES, AlignmentAugmenter, AlignmentConfig
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


def _origins(config, samples, seed):
    """The clean sample of each copy :class:`AlignmentAugmenter` makes (its order: samples x copies)."""
    aug = AlignmentAugmenter(config, seed=seed)
    return [i for i in range(len(samples)) for name in config.copies if aug.make(name, samples, i) is not None]


def _changed_row(tag, row, rows, copy, samples, options):
    """The data-file row of the changed sample, by the rule of ``tag`` (a test-only port of it)."""
    row = dict(row)
    stream = {"misaligned_audio": "audio", "misaligned_video": "video"}.get(tag)
    if stream is not None:  # the donor: the clip whose stream the copy carries, showing something else
        label = "audio_label" if stream == "audio" else "visual_label"
        donor = next(j for j, s in enumerate(samples) if torch.equal(getattr(s, stream), getattr(copy, stream)))
        assert rows[donor][label] != row[label]
        row[stream], row[label] = rows[donor][stream], rows[donor][label]
        if QUERIED_BY[row["modality"]] == stream:  # the answer follows the queried stream
            row["answer"] = next(k for k, text in options.items() if text == rows[donor][label])
    elif tag == "removed_audio":
        assert row["modality"] == "visual"
        del row["audio"]
    elif tag == "zeroed_frames":
        assert row["modality"] == "audio"
        row["video"] = "black"
    else:  # the caption names the other stream's content as the queried one's (for both: the frames')
        named, what = ("audio_label", "video") if row["modality"] == "visual" else ("visual_label", "sound")
        row["question"] = f"caption : the {what} is {row[named]} . {row['question']}"
    return row


QUERIED_BY = {"audio": "audio", "visual": "video", "both": None}


@pytest.mark.parametrize("family", OMNI_FAMILIES)
def test_each_copy_is_its_changed_sample_written_as_a_data_file_row(tmp_path, family):
    """Every alignment copy of clips whose sound and frames show different colours: its answer by the
    rule of its kind, its pairing, and its processed row identical to the changed sample written as
    a row of a data file (the donor's WAV / frames file, no audio, black frames, the caption) and
    processed on its own."""
    path = write_av_data(tmp_path)
    rows = [json.loads(line) for line in open(path)]
    data = read_samples(path).samples
    samples = [to_sample(s) for s in data]
    _, processor = tiny_model_and_processor(family, words=AV_WORDS)
    config = AlignmentConfig(copies=ALIGNMENT_COPIES)
    batch = processor_collator(processor, augment=config, seed=3, return_tags=True)(samples)
    copies, sources = AlignmentAugmenter(config, seed=3)(samples)  # the collator's copies: same seed
    assert batch["tags"] == ["clean"] * len(samples) + [c.tag for c in copies]
    assert {c.tag for c in copies} == set(ALIGNMENT_COPIES)
    (tmp_path / "black").mkdir()
    for k in range(2):
        Image.new("RGB", (20, 24), (0, 0, 0)).save(tmp_path / "black" / f"{k}.png")
    origins = _origins(config, samples, 3)
    changed = [_changed_row(c.tag, rows[i], rows, c, samples, data[i].options) for c, i in zip(copies, origins)]
    for c, src, row, i in zip(copies, sources, changed, origins):
        assert c.answer == row["answer"] and src == (i if row["answer"] == rows[i]["answer"] else -1), c.tag
    (tmp_path / "changed.jsonl").write_text("\n".join(json.dumps(r) for r in changed))
    direct = [to_sample(s) for s in read_samples(tmp_path / "changed.jsonl").samples]
    chat = ChatProcessor(processor)
    all_rows = samples + direct
    for r, (sample, (patches, feature)) in enumerate(zip(all_rows, _media_rows(batch, all_rows))):
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


def _riff(fmt: bytes, data: bytes, extra: bytes = b"") -> bytes:
    chunks = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra + b"data" + struct.pack("<I", len(data))
    return b"RIFF" + struct.pack("<I", len(chunks) + len(data)) + chunks + data


def test_wav_extensible_24_bit_stereo_and_float(tmp_path):
    t = torch.arange(800) / 8000.0
    left, right = 0.5 * torch.sin(2 * math.pi * 440 * t), torch.full((800,), -0.25)
    ints = torch.stack([left, right], 1).mul(2**23).round().long().flatten().tolist()
    pcm24 = b"".join(struct.pack("<i", v)[:3] for v in ints)
    guid_pcm = struct.pack("<H", 1) + bytes.fromhex("000000001000800000aa00389b71")
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 2, 8000, 8000 * 6, 6, 24, 22, 24, 3) + guid_pcm
    odd = b"LIST" + struct.pack("<I", 3) + b"abc\x00"  # a chunk of odd size before the samples (padded)
    (tmp_path / "ext.wav").write_bytes(_riff(fmt, pcm24, odd))
    wav = load_wav(str(tmp_path / "ext.wav"), 8000)
    torch.testing.assert_close(wav, (left + right) / 2, rtol=0, atol=2.0**-22)
    assert load_wav(str(tmp_path / "ext.wav"), 16000).shape == (1600,)  # resampled
    fmt = struct.pack("<HHIIHH", 3, 1, 8000, 8000 * 4, 4, 32)
    (tmp_path / "float.wav").write_bytes(_riff(fmt, left.numpy().tobytes()))
    assert torch.equal(load_wav(str(tmp_path / "float.wav"), 8000), left)
    (tmp_path / "alaw.wav").write_bytes(_riff(struct.pack("<HHIIHH", 6, 1, 8000, 8000, 1, 8), b"\x01" * 10))
    with pytest.raises(ValueError, match="'alaw.wav': format 6"):
        wav_layout(str(tmp_path / "alaw.wav"), "alaw.wav")
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(ValueError, match="not a WAV file"):
        load_wav(str(tmp_path / "text.wav"), 8000)


def _rows(path, **changes):
    """A copy of the data file at ``path`` with the changes of its lines (``l1=dict(...)``)."""
    rows = [json.loads(line) for line in open(path)]
    for line, change in changes.items():
        rows[int(line[1:]) - 1].update(change)
    edited = path.parent / "edited.jsonl"
    edited.write_text("\n".join(json.dumps(r) for r in rows))
    return edited


def test_data_file_checks_media_and_answers_up_front(tmp_path):
    av = pathlib.Path(write_av_data(tmp_path))
    (tmp_path / "bad.gif").write_bytes(b"GIF89a garbage")
    (tmp_path / "empty").mkdir()
    (tmp_path / "clip.mp4").mkdir()  # a folder of frames named like a clip is a folder of frames
    Image.new("RGB", (20, 24)).save(tmp_path / "clip.mp4" / "0.png")
    cases = {
        "bad.gif": (dict(video="bad.gif"), "video 'bad.gif': not readable"),
        "empty": (dict(video="empty"), "video 'empty': no frames"),
        "answer": (dict(answer="Z"), "'answer' 'Z' is neither an option's letter nor its text (A: red"),
        "label": (dict(visual_label="blue"), "'visual_label' 'blue' contradicts the answer 'A'"),
    }
    for name, (change, message) in cases.items():
        path = _rows(av, l1=change)
        with pytest.raises(DataFileError, match=re.escape(f"edited.jsonl:1: {message}")):
            read_samples(path)
        kept = read_samples(path, skip_bad=True)
        assert [n for n, _ in kept.skipped] == [1] and len(kept.samples) == 6, name
    ok = read_samples(_rows(av, l1=dict(video="clip.mp4", answer="red"))).samples[0]
    assert ok.video.endswith("clip.mp4") and ok.answer == "red"  # an option's text is an answer too


def test_media_broken_after_the_check_names_file_and_line(tmp_path):
    path = write_av_data(tmp_path)
    sample = read_samples(path).samples[2]  # line 3: clip1, a folder of PNG frames
    (pathlib.Path(sample.video) / "frame_1.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataFileError, match=re.escape(f"{path}:3: video ")):
        to_sample(sample)
