"""Three modalities for real: a tiny Qwen2.5-Omni thinker (image, video, audio) through
modality_mask, robust_loss, patch_trainer and diagnose."""

from __future__ import annotations

import math
import os

import pytest
import torch

from modkern import modality_mask
from modkern.apps.diagnose import Collator, ModelSpec, av_task_items, diagnose, image_task_items, task_words
from modkern.apps.synthetic_task import WordTokenizer
from modkern.apps.tiny_models import omni_audio_tokens, tiny_qwen2_5_omni
from modkern.objective.robust import RobustConfig, robust_loss

TOK = WordTokenizer(task_words())
# visual-focused items: perturb the audio (the stream that must not matter); sound-focused: the video
POLICY = {"av_visual": "audio", "av_audio": "video", "image_heavy": "text", "text_heavy": "image"}


@pytest.fixture(scope="module")
def omni():
    model, info = tiny_qwen2_5_omni(len(TOK) + 7, num_layers=2, seed=0)
    return model, info


def _batch(model, items):
    batch = Collator(ModelSpec.from_model(model), TOK)(items)
    batch["sample_kind"] = [it.kind for it in items]
    return batch


def _items():
    return av_task_items(2, mel_bins=8) + image_task_items(1)  # visual x2, sound x2, image-heavy, text-heavy


def test_forward_with_image_video_and_audio(omni):
    model, info = omni
    items = _items()
    batch = _batch(model, items)
    ids = batch["input_ids"]
    assert (ids == info["audio_token_id"]).sum(1).tolist() == [omni_audio_tokens(16)] * 4 + [0, 0]
    assert (ids == info["video_token_id"]).sum(1).tolist() == [2 * info["num_image_tokens"]] * 4 + [0, 0]
    assert (ids == info["image_token_id"]).sum(1).tolist() == [0] * 4 + [info["num_image_tokens"]] * 2
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_kind")}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    assert logits.shape == (*ids.shape, len(TOK) + 7) and torch.isfinite(logits).all()


def test_modality_mask_audio_audio_video_and_text(omni):
    model, info = omni
    batch = _batch(model, _items())
    ids, labels, att = batch["input_ids"], batch["labels"], batch["attention_mask"]
    kw = dict(token_ids=info["token_ids"], labels=labels, attention_mask=att)
    audio, video = ids == info["audio_token_id"], ids == info["video_token_id"]
    assert torch.equal(modality_mask(ids, perturb="audio", **kw), audio)
    assert torch.equal(modality_mask(ids, perturb=("audio", "video"), **kw), audio | video)
    markers = [info[f"{m}_token_id"] for m in ("vision_start", "vision_end", "audio_start", "audio_end")]
    text = modality_mask(ids, perturb="text", exclude_ids=markers, **kw)
    placeholder = audio | video | (ids == info["image_token_id"]) | torch.isin(ids, torch.tensor(markers))
    assert torch.equal(text, (att == 1) & (labels == -100) & ~placeholder)
    per_sample = modality_mask(ids, perturb=[POLICY[k] for k in batch["sample_kind"]], exclude_ids=markers, **kw)
    assert torch.equal(per_sample[:2], audio[:2]) and torch.equal(per_sample[2:4], video[2:4])
    assert torch.equal(per_sample[4], text[4]) and torch.equal(per_sample[5], (ids == info["image_token_id"])[5])


def test_robust_loss_perturbs_audio_for_visual_items(omni):
    model, info = omni
    batch = _batch(model, _items())
    config = RobustConfig(policy=POLICY, lam=0.1, steps=2)
    # no perturbation: the replayed (encoder-free) forward reproduces the clean one exactly
    zero = robust_loss(model, batch, config.replace(init="zero", steps=0))
    assert float(zero.ce_adv) == pytest.approx(float(zero.ce_clean), rel=1e-6)
    out = robust_loss(model, batch, config)
    ids = batch["input_ids"]
    assert torch.equal(out.mask[:2], ids[:2] == info["audio_token_id"])
    assert torch.equal(out.mask[2:4], ids[2:4] == info["video_token_id"])
    assert out.delta[~out.mask].abs().max() == 0 and out.delta[out.mask].abs().max() > 0
    model.zero_grad()
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach()))
    grads = [p.grad for p in model.model.audio_tower.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()
    # a large perturbation of the audio alone changes the visual items' loss
    big = robust_loss(model, batch, config.replace(epsilon=1.0, alpha=1.0, step="sign"))
    assert float(big.ce_adv) != pytest.approx(float(big.ce_clean), rel=1e-4)


def test_patch_trainer_steps(tmp_path):
    from tiny_models import training_args
    from transformers import Trainer

    from modkern.integrations.hf import patch_trainer

    model, _ = tiny_qwen2_5_omni(len(TOK) + 7, seed=1)
    collate = Collator(ModelSpec.from_model(model), TOK)

    def data_collator(items):
        batch = collate(items)
        batch["sample_kind"] = [it.kind for it in items]
        return batch

    args = training_args(tmp_path / "out", max_steps=3)
    data = av_task_items(4, mel_bins=8)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=data_collator)
    patch_trainer(trainer, RobustConfig(policy=POLICY, lam=0.1))
    before = [p.detach().clone() for p in model.model.audio_tower.parameters()]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for log in logs:
        assert all(math.isfinite(log[k]) for k in ("loss", "ce_clean", "ce_adv", "consistency"))
    after = list(model.model.audio_tower.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_diagnose_audio_video_conditions_from_a_checkpoint(omni, tmp_path):
    from modkern.apps.train_loop import save_checkpoint

    model, _ = omni
    ckpt = tmp_path / "omni"
    save_checkpoint(model, ckpt)
    TOK.save(os.path.join(ckpt, "modkern_tokenizer.json"))
    report = diagnose(str(ckpt), out=str(tmp_path / "diag"), max_items=4, progress=False, log=None)
    assert report["family"] == "qwen2_5_omni" and report["skipped"] == {}
    cond = report["conditions"]
    assert cond["removed_audio"]["items"] == 4 and cond["removed_audio"]["applies_to"] == ["av_visual"]
    assert cond["zeroed_frames"]["items"] == 4 and cond["zeroed_frames"]["applies_to"] == ["av_audio"]
    assert cond["misaligned_audio_video"]["items"] == 8
    for c in cond.values():
        assert 0 <= c["flip_rate"] <= 1 and c["js"]["mean"] >= 0 and math.isfinite(c["causal_effect"]["mean"])
    att = report["attention"]
    assert att["modalities"] == ["text", "image", "video", "audio"]
    share = torch.tensor(att["share_by_prompt_type"]["visual-focused"])
    assert share.shape == (2, 4) and torch.allclose(share.sum(-1), torch.ones(2), atol=1e-5)
    assert share[:, 1].abs().max() == 0 and share[:, 2:].min() > 0  # no image in AV items; video and audio attended
    assert set(att["cohens_d"]) == {"image-focused vs text-focused", "visual-focused vs audio-focused"}
    assert (tmp_path / "diag" / "diagnosis.png").exists()
