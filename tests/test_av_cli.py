"""`modkern train --data` and `modkern diagnose --data` on an audio-video data file (issue 24): tiny
Qwen2.5-Omni and Qwen3-Omni thinker checkpoints saved with their locally built processors, WAV and frame files written
here; the MMA-Bench conditions built on data-file items; the mistakes a user can make."""

import json
import math
import pathlib

import pytest
import torch
from tiny_models import AV_WORDS, write_av_data, write_data

from modkern.apps.cli import main
from modkern.apps.diagnose.conditions import CONDITIONS, condition_context
from modkern.apps.diagnose.items import data_file_items
from modkern.apps.diagnose.models import ChatItemCollator, ModelSpec
from modkern.apps.frames_video import load_processor
from modkern.apps.tiny_processors import save_tiny_checkpoint, tiny_model_and_processor
from modkern.data import read_samples
from modkern.objective.alignment import ALIGNMENT_POLICY, CAPTION_STREAM, CAPTION_TEMPLATE
from modkern.processing import ChatProcessor, to_sample

AV_CONDITIONS = ["unrelated_paragraph", "misaligned_audio_video", "removed_audio", "zeroed_frames"]
AV_CONDITIONS += ["misleading_caption"]
OMNI_FAMILIES = {"qwen2_5_omni": "Qwen2_5OmniProcessor", "qwen3_omni": "Qwen3OmniMoeProcessor"}


@pytest.fixture(scope="module")
def av_file(tmp_path_factory):
    return write_av_data(tmp_path_factory.mktemp("av"))  # 3 clips x (visual, sound) + 1 question about both


@pytest.fixture(scope="module", params=OMNI_FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def omni_dir(family, tmp_path_factory):
    return str(save_tiny_checkpoint(family, tmp_path_factory.mktemp("omni") / "ckpt", words=AV_WORDS))


@pytest.fixture(scope="module")
def trained(omni_dir, av_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    args = ["train", "--model", omni_dir, "--data", av_file, "--out", str(out), "--max-steps", "2"]
    assert main([*args, "--batch-size", "4", "--no-progress"]) == 0
    return str(out)


def test_train_on_an_audio_video_file(trained, family):
    summary = json.load(open(f"{trained}/finetune.json"))
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"]) and summary["mix"] is None
    policy = summary["settings"]["robust"]["policy"]
    assert {k: policy[k] for k in ALIGNMENT_POLICY} == ALIGNMENT_POLICY  # the stream not asked about is attacked
    parts = [h for h in summary["log_history"] if "ce_adv" in h]
    assert len(parts) == 2 and all(h["consistency"] > 0 for h in parts)  # alignment copies paired with clean ones
    assert summary["settings"]["alignment"]["copies"] == ["misaligned_audio", "misaligned_video"] + [
        "removed_audio",
        "zeroed_frames",
    ]
    assert type(load_processor(trained)).__name__ == OMNI_FAMILIES[family]


def test_diagnose_and_compare_audio_video_checkpoints(family, omni_dir, trained, av_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["diagnose", "--model", omni_dir, "--compare", trained, "--data", av_file, "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    report = json.load(open(out / "diagnosis.json"))
    assert report["family"] == family
    assert report["items"] == {"av_visual": 3, "av_audio": 3, "av_both": 1}
    assert list(report["conditions"]) == AV_CONDITIONS and report["skipped"] == {}
    counts = {name: c["items"] for name, c in report["conditions"].items()}
    assert counts == dict(zip(AV_CONDITIONS, (7, 6, 3, 3, 6)))
    for c in report["conditions"].values():
        assert 0 <= c["flip_rate"] <= 1 and c["js"]["mean"] > 0 and math.isfinite(c["causal_effect"]["mean"])
    attention = report["attention"]
    assert attention["modalities"] == ["text", "image", "video", "audio"]
    assert set(attention["share_by_prompt_type"]) == {"visual-focused", "audio-focused", "audio-and-visual"}
    for layer in attention["share"]:
        assert layer[1] == 0 and min(layer[2], layer[3]) > 0 and abs(sum(layer) - 1) < 1e-4  # no image tokens
    assert len(attention["cohens_d"]["visual-focused vs audio-focused"]) == len(attention["share"])
    comparison = json.load(open(out / "comparison.json"))
    assert set(comparison["conditions"]) == set(AV_CONDITIONS)
    assert (out / "after" / "diagnosis.json").exists() and (out / "comparison.png").stat().st_size > 0
    assert "misleading_caption" in capsys.readouterr().out


def test_data_file_conditions_change_only_what_they_say(av_file):
    items = data_file_items(av_file)
    assert items[0].stream_label("video") == "red" and items[0].stream_label("audio") == "green"
    assert items[0].audio.dim() == 1 and items[0].video.shape[:2] == (2, 3)

    def variants(name):
        ctx = condition_context(0, name, sorted({it.target_class for it in items}))
        kinds = CONDITIONS[name].kinds
        return [(it, CONDITIONS[name].make(items, i, ctx)) for i, it in enumerate(items) if it.kind in kinds]

    for it, v in variants("misaligned_audio_video"):
        stream = "audio" if it.kind == "av_visual" else "video"
        donor = next(o for o in items if getattr(o, stream) is getattr(v, stream))
        assert donor.stream_label(stream) != it.stream_label(stream)  # a clip that shows something else
        kept = "video" if stream == "audio" else "audio"
        assert getattr(v, kept) is getattr(it, kept) and v.answer == it.answer and v.context == ""
    for it, v in variants("zeroed_frames"):
        assert it.kind == "av_audio" and not v.video.any() and v.audio is it.audio
    for it, v in variants("removed_audio"):
        assert it.kind == "av_visual" and v.audio is None and v.video is it.video
    for it, v in variants("misleading_caption"):  # the other stream's content (both: the frames') as the queried's
        other = it.stream_label("audio" if it.kind == "av_visual" else "video")
        assert v.context == CAPTION_TEMPLATE.format(stream=CAPTION_STREAM[it.kind], label=other)
        assert other != it.stream_label("video" if it.kind == "av_visual" else "audio")
        assert v.question == it.question and v.video is it.video and v.answer == it.answer


def test_a_diagnosis_variant_is_the_changed_sample_processed_directly(av_file, family):
    model, processor = tiny_model_and_processor(family, words=AV_WORDS)
    items = data_file_items(av_file)
    collate = ChatItemCollator(ModelSpec.from_model(model), processor)
    ctx = condition_context(0, "zeroed_frames", ["a", "b"])
    variant = CONDITIONS["zeroed_frames"].make(items, 1, ctx)
    sample = to_sample(read_samples(av_file).samples[1])
    sample.video.zero_()
    direct = ChatProcessor(processor)([sample])
    for k, v in collate([variant]).items():
        assert torch.equal(v, direct[k]), k


def test_audio_video_mistakes_are_one_line_errors(omni_dir, av_file, tmp_path, capsys):
    folder = pathlib.Path(av_file).parent  # the media paths are relative to the data file
    images = write_data(folder, n_per_kind=1)
    mixed = folder / "mixed.jsonl"
    mixed.write_text(open(av_file).read() + open(images).read())
    args = ["train", "--model", omni_dir, "--out", str(tmp_path / "o"), "--max-steps", "1"]
    assert main([*args, "--data", str(mixed), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "mixes audio-video samples (line 1) with image or text samples (line 8)" in err and "\n" not in err
    assert main([*args, "--data", av_file, "--mix", "1:1:2", "--batch-size", "4"]) == 2
    assert "--mix applies to image data" in capsys.readouterr().err


def test_qwen3_omni_is_diagnosed_on_data_files(tmp_path, capsys):
    ckpt = save_tiny_checkpoint("qwen3_omni", tmp_path / "ckpt", words=AV_WORDS)
    capsys.readouterr()
    assert main(["diagnose", "--model", ckpt, "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Qwen3-Omni thinker is diagnosed on a data file (--data)" in err and "\n" not in err


def test_alignment_copies_from_the_command_line(omni_dir, av_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["train", "--model", omni_dir, "--out", str(out), "--max-steps", "1", "--batch-size", "7"]
    copies = "misleading_caption,zeroed_frames"
    assert main([*args, "--data", av_file, "--av-copies", copies, "--no-video-answer", "blue", "--no-progress"]) == 0
    settings = json.loads((out / "finetune.json").read_text())["settings"]["alignment"]
    assert settings["copies"] == ["misleading_caption", "zeroed_frames"] and settings["no_video_answer"] == "blue"
    capsys.readouterr()
    assert main([*args, "--data", av_file, "--av-copies", "swap_all"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--av-copies: copies: unknown alignment copies ['swap_all']" in err and "\n" not in err
    images = write_data(tmp_path, n_per_kind=1)
    assert main([*args, "--data", images, "--no-audio-answer", "none"]) == 2
    assert "apply to audio-video data files" in capsys.readouterr().err
    assert main(["train", "--av-copies", copies]) == 2
    assert "--av-copies need --data FILE" in capsys.readouterr().err
