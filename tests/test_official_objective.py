"""robust_loss's defaults compute the official objective (SPEC §2): an eager port of its structure
(tests/official_objective.py) gives the same loss and every parameter gradient, on tiny LLaVA and
Qwen2-VL batches with heuristic copies, padding and all three sample kinds; on the chunked
fused-linear head; and under gradient accumulation."""

import pytest
import torch
from official_objective import official_loss
from tiny_models import make_batch, split_batch

from modkern.apps.tiny_models import tiny_llava, tiny_qwen2_vl
from modkern.objective.robust import PRESETS, RobustConfig, infer_exclude_ids, infer_token_ids, robust_loss

BUILDERS = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl}
# Strong enough that every part moves the result: the attack is not at its bound everywhere, the
# consistency term is a sizeable share of the loss.
HP = dict(alpha=2.0, epsilon=0.05, steps=2, lam=0.5)
KINDS = ["image_heavy", "text_heavy", "vqa", "image_heavy"]
# copies (source, prompt length): two of image-heavy sample 0 (misleading / unrelated text of other
# lengths), three of text-heavy sample 1 (image copies), one of image-heavy sample 3; none of the VQA one
COPIES = ((0, 6), (0, 2), (1, 4), (1, 4), (1, 4), (3, 5))


@pytest.fixture(scope="module")
def models():
    return {name: build(seed=3) for name, build in BUILDERS.items()}


def _batch(info, seed=11):
    return make_batch(info, 4, seed=seed, kinds=KINDS, answer_lens=[2, 1, 3, 2], copies=COPIES)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _official(model, batch, **kw):
    return official_loss(
        model, batch, token_ids=infer_token_ids(model), exclude_ids=infer_exclude_ids(model), **HP, **kw
    )


def _assert_same(loss_a, grads_a, loss_b, grads_b):
    torch.testing.assert_close(loss_a.detach(), loss_b.detach(), rtol=1e-5, atol=1e-6)
    assert set(grads_a) == set(grads_b)
    # fp32: a few ulps of each parameter's largest gradient; parameters whose exact gradient is 0
    # (an attention key bias) carry rounding noise only, judged against the largest gradient of all.
    overall = max(float(g.abs().max()) for g in grads_b.values())
    for name in grads_a:
        atol = max(2e-5 * float(grads_b[name].abs().max()), 1e-6 * overall)
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=atol, msg=name)


def test_defaults_are_the_official_llava_recipe():
    c = RobustConfig()
    assert (c.epsilon, c.alpha, c.steps, c.lam, c.temperature) == (1e-3, 0.1, 2, 0.01, 1.0)
    assert (c.divergence, c.kl_direction, c.pairs, c.consistency_divisor) == (
        "kl",
        "reverse",
        "official",
        "clean_samples",
    )
    assert (c.step, c.norm, c.init, c.attack_normalization) == ("raw", "linf", "random", "micro_batch")
    assert c.policy == {"image_heavy": "text", "text_heavy": "image", "vqa": "none"}
    assert RobustConfig.preset("llava-1.5-kl-pgd") == c
    js = RobustConfig.preset("qwen2.5-vl-7b-js-pgd")
    assert (js.divergence, js.steps, js.lam) == ("js", 1, 0.001)
    assert RobustConfig.preset("instructblip-kl-pgd").epsilon == 0.05
    assert RobustConfig.preset("instructblip-kl-pgd").steps == 4
    assert RobustConfig.preset("qwen2.5-vl-3b-kl-pgd").epsilon == 0.01
    assert RobustConfig.preset("qwen2.5-vl-7b-kl-pgd", lam=0.1).lam == 0.1
    assert set(PRESETS) >= {"llava-1.5-kl-pgd", "qwen2.5-vl-7b-kl-pgd", "qwen2.5-vl-7b-js-pgd", "instructblip-kl-pgd"}
    with pytest.raises(ValueError, match="preset"):
        RobustConfig.preset("llava-2")


@pytest.mark.parametrize("lm_head", ["rows", "chunked"])
@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_robust_loss_equals_the_official_objective(models, name, lm_head):
    model, info = models[name]
    batch = _batch(info)
    expected = _official(model, batch)
    expected_grads = _grads(model, expected)
    cfg = RobustConfig(init="zero", lm_head=lm_head, chunk_size=5 if lm_head == "chunked" else None, **HP)
    out = robust_loss(model, batch, cfg)
    assert float(out.consistency) > 1e-3 * float(out.loss.detach())  # the term is really there
    assert float(out.attack["delta_at_bound"]) < 1.0  # ... and the attack is not saturated
    _assert_same(out.loss, _grads(model, out.loss), expected, expected_grads)


def test_gradient_accumulation_equals_the_official_objective_on_the_accumulated_normalizers(models):
    # Two micro-batches (each with its clean samples and their copies): num_items_in_batch and
    # num_clean_in_batch of the whole batch divide every micro-batch's terms, so the summed gradients
    # are those of the official terms over the accumulated batch (its attack: the micro-batch mean).
    model, info = models["llava"]
    batch = _batch(info, seed=5)
    halves = [[0, 1, 4, 5, 6, 7, 8], [2, 3, 9]]
    parts = []
    for idx in halves:
        micro = split_batch(batch, idx)
        micro["ref_index"] = torch.tensor([idx.index(int(batch["ref_index"][i])) for i in idx])
        parts.append(micro)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    expected = sum(_official(model, micro, ce_denom=tokens, clean_denom=4) for micro in parts)
    expected_grads = _grads(model, expected)
    cfg = RobustConfig(init="zero", **HP)
    total = sum(robust_loss(model, micro, cfg, num_items_in_batch=tokens, num_clean_in_batch=4).loss for micro in parts)
    _assert_same(total, _grads(model, total), expected, expected_grads)


def test_the_official_pairs_direction_and_divisor_differ_from_the_alternatives(models):
    # Each option changes the result: none of them is a silent no-op.
    model, info = models["llava"]
    batch = _batch(info)
    base = RobustConfig(init="zero", **HP)
    ref = robust_loss(model, batch, base).consistency
    for change in (dict(pairs="adversarial"), dict(kl_direction="forward"), dict(consistency_divisor="tokens")):
        other = robust_loss(model, batch, base.replace(**change)).consistency
        assert not torch.allclose(other, ref, rtol=1e-3), change
    heuristic = robust_loss(model, batch, base.replace(pairs="heuristic"))
    assert heuristic.delta is None and float(heuristic.ce_adv) == 0.0 and float(heuristic.consistency) > 0
