"""MMA-Bench's alignment-tuning copies (modkern.objective.alignment): the answer rule of each copy kind,
ref_index pairing only where the answer is unchanged, and the robust objective on a tiny Omni thinker
perturbing the stream the question does not ask about."""

import math
import random

import pytest
import torch

from modkern.apps.av_demo import AVDemoConfig, AVTask, ClipCollator, tokenizer
from modkern.apps.diagnose.models import ModelSpec
from modkern.apps.tiny_models import tiny_qwen2_5_omni
from modkern.objective.alignment import (
    ALIGNMENT_POLICY,
    CAPTION_TEMPLATE,
    AlignmentAugmenter,
    AlignmentConfig,
    AVSample,
    caption_label,
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


def _sample(kind, answer, visual, audio, options=None, **kw):
    video = torch.rand(2, 3, 4, 4)
    return AVSample("q", kind, video, torch.rand(8), answer, visual, audio, options or {}, **kw)


OPTIONS = {"A": "red", "B": "green", "C": "blue"}


def test_misleading_caption_names_the_other_streams_content():
    rng = random.Random(0)
    # a video question is told the sound's content, a sound question the frames', where they differ
    assert caption_label("av_visual", "red", "red", "green", ["red", "green", "blue"], rng) == "green"
    assert caption_label("av_audio", "green", "red", "green", ["red", "green", "blue"], rng) == "red"
    # a question about both: the sound claimed to show what the frames show
    assert caption_label("av_both", "no", "blue", "red", [], rng) == "blue"
    # aligned streams (or unknown content): another candidate, never the true content
    picks = {caption_label("av_visual", "red", "red", "red", ["red", "green", "blue"], rng) for _ in range(40)}
    assert picks == {"green", "blue"}
    assert caption_label("av_both", "yes", "red", "red", ["red"], rng) is None
    assert caption_label("av_both", "yes", None, None, ["red", "green"], rng) is None
    aug = AlignmentAugmenter(AlignmentConfig(copies=("misleading_caption",)), seed=0)
    copy = aug.make("misleading_caption", [_sample("av_visual", "A", "red", "blue", OPTIONS)], 0)
    assert copy.context == CAPTION_TEMPLATE.format(stream="video", label="blue") and copy.answer == "A"


def test_answer_for_writes_the_answer_as_the_sample_does():
    by_letter = _sample("av_audio", "B", "red", "green", OPTIONS)
    by_text = _sample("av_audio", "green", "red", "green", OPTIONS)
    assert by_letter.answer_for("Blue ") == "C" and by_text.answer_for("Blue ") == "blue"
    assert by_letter.answer_for("purple") is None and by_letter.answer_for(None) is None
    assert _sample("av_audio", "green", "red", "green").answer_for("blue") == "blue"  # a free answer


def test_misaligned_donor_shows_known_other_content():
    # the sound question of clip 0 (green sound): clip 1's sound is unknown, clip 2's green: no donor
    clips = [
        _sample("av_audio", "B", "red", "green", OPTIONS),
        _sample("av_audio", "B", "red", None, OPTIONS),
        _sample("av_audio", "B", "blue", "green", OPTIONS),
    ]
    aug = AlignmentAugmenter(AlignmentConfig(copies=("misaligned_audio",)), seed=0)
    assert aug.make("misaligned_audio", clips, 0) is None
    clips.append(_sample("av_visual", "A", "red", "blue", OPTIONS))
    copy = aug.make("misaligned_audio", clips, 0)
    assert copy.audio is clips[3].audio and copy.video is clips[0].video
    assert copy.audio_label == "blue" and copy.answer == "C"  # the option naming the donor's sound
    paired = aug.make("misaligned_audio", clips, 3)  # a video question keeps its answer, new sound
    assert paired.answer == "A" and paired.audio_label == "green" and paired.video is clips[3].video
