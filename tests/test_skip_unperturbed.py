"""RobustConfig(skip_unperturbed=True) (the default) is exact: the loss and every parameter gradient
equal those of the whole-batch computation (skip_unperturbed=False), on LLaVA, Qwen2-VL, the
Qwen2.5-Omni thinker and a causal LM, with heuristic copies, padding, the chunked head and gradient
accumulation; the attack and the adversarial forward run on the perturbed samples (and the copies)
only.

A skipped sample's adversarial CE comes from its clean pass, whose input embeddings then get half
the gradient (modkern.objective.robust._on_clean_embeddings): a check that the comparison sees the
encoder / embedding gradients is that dropping the halving breaks it.
"""

import pytest
import torch
from tiny_models import make_batch

import modkern.objective.robust as robust
from modkern.apps.diagnose import Collator, ModelSpec, av_task_items, image_task_items, task_words
from modkern.apps.synthetic_task import WordTokenizer
from modkern.apps.tiny_models import tiny_llama, tiny_llava, tiny_qwen2_5_omni, tiny_qwen2_vl
from modkern.objective.robust import RobustConfig, robust_loss

HP = dict(alpha=2.0, epsilon=0.05, steps=2, lam=0.5)
KINDS = ["image_heavy", "vqa", "text_heavy", "vqa"]
COPIES = ((0, 6), (2, 4))  # copies of the image-heavy and the text-heavy sample; none of the VQA ones


@pytest.fixture(scope="module")
def models():
    return {
        "llava": tiny_llava(seed=3),
        "qwen2_vl": tiny_qwen2_vl(seed=3),
        "llama": tiny_llama(seed=3),
    }


def _batch(info, kinds=KINDS, copies=COPIES, seed=11):
    if info["kind"] == "llama":  # text-only: perturb the prompt or nothing
        kinds = ["image_heavy" if k != "vqa" else "vqa" for k in kinds]
    return make_batch(info, len(kinds), seed=seed, kinds=kinds, answer_lens=[2, 1, 3, 2][: len(kinds)], copies=copies)


def _loss_and_grads(model, batch, **cfg):
    model.zero_grad(set_to_none=True)
    out = robust_loss(model, batch, RobustConfig(init="random", **HP, **cfg))
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    for part in ("loss", "ce_clean", "ce_adv", "consistency"):
        torch.testing.assert_close(getattr(out_a, part).detach(), getattr(out_b, part).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_a.delta, out_b.delta, rtol=1e-5, atol=1e-7)
    assert set(grads_a) == set(grads_b)
    overall = max(float(g.abs().max()) for g in grads_b.values())
    for name in grads_a:
        atol = max(2e-5 * float(grads_b[name].abs().max()), 1e-6 * overall)
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=atol, msg=name)


def _compare(model, batch, **cfg):
    torch.manual_seed(0)  # the same random start of delta
    skipped = _loss_and_grads(model, batch, **cfg)
    torch.manual_seed(0)
    whole = _loss_and_grads(model, batch, skip_unperturbed=False, **cfg)
    _assert_same(skipped, whole)
    return skipped


@pytest.mark.parametrize("lm_head", ["rows", "chunked"])
@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "llama"])
def test_skipping_is_exact(models, name, lm_head):
    model, info = models[name]
    out, _ = _compare(model, _batch(info), lm_head=lm_head, chunk_size=5 if lm_head == "chunked" else None)
    assert float(out.consistency) > 0 and float(out.attack["attack_grad_norm"]) > 0


@pytest.mark.parametrize("pairs", ["official", "adversarial"])
def test_skipping_is_exact_for_every_pairing_and_divergence(models, pairs):
    model, info = models["llava"]
    batch = _batch(info)
    _compare(model, batch, pairs=pairs)
    _compare(model, batch, pairs=pairs, divergence="js", divergence_grad_mode="forward")


def test_skipping_under_gradient_accumulation(models):
    model, info = models["qwen2_vl"]
    batch = _batch(info, copies=())
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    results = []
    for skip in (True, False):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        cfg = RobustConfig(init="random", skip_unperturbed=skip, attack_normalization="num_items", **HP)
        for idx in ([0, 1], [2, 3]):
            micro = _qwen_rows(batch, idx)
            robust_loss(model, micro, cfg, num_items_in_batch=tokens, num_clean_in_batch=4).loss.backward()
        results.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-4, atol=1e-7, msg=name)


def _qwen_rows(batch, idx):
    """Rows ``idx`` of a Qwen2-VL batch (one image per sample: its patches follow the sample)."""
    per_image = int(batch["image_grid_thw"][0].prod())
    patches = torch.cat([torch.arange(i * per_image, (i + 1) * per_image) for i in idx])
    out = {k: v[idx] for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "mm_token_type_ids")}
    out["pixel_values"], out["image_grid_thw"] = batch["pixel_values"][patches], batch["image_grid_thw"][idx]
    out["sample_kind"] = [batch["sample_kind"][i] for i in idx]
    return out


def test_no_perturbed_sample_still_runs_the_forwards_on_one(models):
    # every rank makes the same module calls: a micro-batch with nothing to perturb runs the attack
    # and the adversarial forward on one sample, weighted 0
    model, info = models["llava"]
    batch = _batch(info, kinds=["vqa", "vqa", "vqa"], copies=())
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, o: calls.append(o.shape[0]))
    try:
        out, _ = _compare(model, batch)
    finally:
        handle.remove()
    assert len(calls) == 2 * (1 + HP["steps"] + 1)  # both runs: clean, the attack steps, adversarial
    assert float(out.consistency) == 0.0 and torch.equal(out.delta, torch.zeros_like(out.delta))


def test_every_sample_perturbed_runs_the_whole_batch(models):
    model, info = models["qwen2_vl"]
    _compare(model, _batch(info, kinds=["image_heavy", "text_heavy"], copies=((0, 5),)))


def test_omni_thinker_skipping_is_exact():
    model, _ = tiny_qwen2_5_omni(len(task_words()) + 7, num_layers=2, seed=0)
    items = av_task_items(1, mel_bins=8) + image_task_items(1)  # visual, sound, image-heavy, text-heavy
    batch = Collator(ModelSpec.from_model(model), WordTokenizer(task_words()))(items)
    batch["sample_kind"] = [it.kind for it in items[:3]] + ["vqa"]  # the last one: nothing perturbed
    policy = {"av_visual": "audio", "av_audio": "video", "image_heavy": "text", "vqa": "none"}
    _compare(model, batch, policy=policy)


def test_the_halving_matters(models, monkeypatch):
    # Without halving the skipped samples' embedding gradient, the encoder / embedding gradients
    # differ from the whole-batch computation's: the comparison above sees them.
    model, info = models["llava"]
    batch = _batch(info)
    real = robust._on_clean_embeddings

    def no_halving(*args):
        scale = real(*args)
        return None if scale is None else torch.ones_like(scale)

    monkeypatch.setattr(robust, "_on_clean_embeddings", no_halving)
    with pytest.raises(AssertionError, match="vision_tower|multi_modal_projector|embed_tokens"):
        _compare(model, batch)  # the parameters before the language model's input
