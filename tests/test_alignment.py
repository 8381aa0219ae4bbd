"""MMA-Bench's alignment-tuning copies (modkern.objective.alignment): the answer rule of each copy kind,
ref_index pairing only where the answer is unchanged, and the robust objective on a tiny Omni thinker
perturbing the stream the question does not ask about."""

import math

import pytest
import torch

from modkern.apps.av_demo import AVDemoConfig, AVTask, ClipCollator, tokenizer
from modkern.apps.diagnose.models import ModelSpec
from modkern.apps.tiny_models import tiny_qwen2_5_omni
from modkern.objective.alignment import (
    ALIGNMENT_POLICY,
    AlignmentAugmenter,
    AlignmentConfig,
    AVSample,
)
from modkern.objective.augment import RobustCollator
from modkern.objective.robust import RobustConfig, robust_loss


def _clips():
    task = AVTask(AVDemoConfig(), seed=0)
    # a video question (red video, red sound), a sound question (green, green), a video question (blue, blue)
    return [task.clip("av_visual", 0, 0), task.clip("av_audio", 1, 1), task.clip("av_visual", 2, 2)]


def test_answer_follows_the_queried_stream():
    clips = _clips()
    aug = AlignmentAugmenter(AlignmentConfig(), seed=0)
    copies, sources = aug(clips)
    for k, c in enumerate(copies):
        src = clips[sources[k]] if sources[k] >= 0 else None
        if c.tag == "misaligned_audio":
            assert c.audio is not None
            if c.kind == "av_visual":  # the sound changed, a video question keeps its answer: paired
                assert src is not None and c.answer == src.answer and c.audio_label != src.audio_label
            else:  # a sound question now has the other clip's sound: its own sample
                assert sources[k] == -1 and c.answer == c.audio_label and c.answer != c.visual_label
        if c.tag == "misaligned_video":
            if c.kind == "av_audio":
                assert src is not None and c.answer == src.answer and c.visual_label != src.visual_label
            else:
                assert sources[k] == -1 and c.answer == c.visual_label and c.answer != c.audio_label
        if c.tag == "removed_audio":  # only video questions (no target for a sound question without sound)
            assert c.kind == "av_visual" and c.audio is None and src is not None and c.answer == src.answer
        if c.tag == "zeroed_frames":
            assert c.kind == "av_audio" and float(c.video.abs().max()) == 0 and c.answer == src.answer
    tags = [c.tag for c in copies]
    assert tags.count("removed_audio") == 2 and tags.count("zeroed_frames") == 1
    assert tags.count("misaligned_audio") == 3 and tags.count("misaligned_video") == 3
    # a sound question without sound, a video question without frames: only with a target for it
    aug = AlignmentAugmenter(AlignmentConfig(no_audio_answer="none", no_video_answer="none"), seed=0)
    copies, sources = aug(clips)
    silent = [(c, s) for c, s in zip(copies, sources) if c.tag == "removed_audio" and c.kind == "av_audio"]
    assert len(silent) == 1 and silent[0][0].answer == "none" and silent[0][1] == -1


def test_misleading_caption_and_bad_config():
    clips = _clips()
    aug = AlignmentAugmenter(AlignmentConfig(copies=("misleading_caption",), classes=("red", "green", "blue")))
    copies, sources = aug(clips)
    assert sources == [0, 1, 2]  # the answer is unchanged: paired
    for c, s in zip(copies, clips):
        assert c.context.startswith("caption : the ") and s.answer not in c.context and c.answer == s.answer
    with pytest.raises(ValueError, match="copies"):
        AlignmentConfig(copies=("swap_everything",))
    # no options and no classes: no wrong label to name, no copy
    assert AlignmentAugmenter(AlignmentConfig(copies=("misleading_caption",)))(clips) == ([], [])
    with pytest.raises(ValueError, match="kind"):
        AVSample("q", "image_heavy", None, None, "red")


def test_collated_batch_and_robust_loss_perturb_the_other_stream():
    tok = tokenizer()
    model, info = tiny_qwen2_5_omni(len(tok) + 7, num_layers=1, seed=0)
    collate = RobustCollator(
        augmenter=AlignmentAugmenter(seed=1), collate=ClipCollator(ModelSpec.from_model(model), tok)
    )
    clips = _clips()
    batch = collate(clips)
    n = batch["input_ids"].shape[0]
    assert (
        batch["ref_index"][:3].tolist() == [0, 1, 2] and n == 3 + 9
    )  # 3 misaligned audio, 3 misaligned video, 2 removed audio, 1 zeroed frames
    assert batch["sample_kind"][:3] == ["av_visual", "av_audio", "av_visual"]
    out = robust_loss(model, batch, RobustConfig(policy=ALIGNMENT_POLICY, lam=0.1))
    ids = batch["input_ids"]
    visual = torch.tensor([k == "av_visual" for k in batch["sample_kind"]])
    audio_tokens, video_tokens = ids == info["audio_token_id"], ids == info["video_token_id"]
    # video questions: the attack moves the audio only; sound questions: the frames only
    assert torch.equal(out.mask[visual], audio_tokens[visual])
    assert torch.equal(out.mask[~visual], video_tokens[~visual])
    assert math.isfinite(float(out.loss.detach())) and float(out.consistency) > 0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_av_demo_cli_prints_its_table(tmp_path, capsys):
    from modkern.apps.cli import main

    out = tmp_path / "av"
    assert main(["train", "--av", "--steps", "2", "--seeds", "0,1", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "mean ± sd over 2 seeds" in text and "alignment tuning + robust objective" in text
    import json

    res = json.load(open(out / "av_results.json"))
    assert res["seeds"] == [0, 1] and set(res["summary"]) == {"sft", "align", "align_robust"}
    for method in res["summary"].values():
        assert set(method) == {"clean", "misaligned", "removed_audio", "zeroed_frames", "caption_held_out"}
        assert all(0 <= cell["mean"] <= 1 and cell["sd"] >= 0 for cell in method.values())
    assert main(["train", "--av", "--quick"]) == 2
