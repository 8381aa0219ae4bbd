"""modkern.objective.robust: the SPEC §2 objective on tiny LLaVA / Qwen2-VL / Llama models (CPU, fp32)."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import KINDS, make_batch

import modkern
import modkern.objective.robust
from modkern.apps.tiny_models import tiny_llama, tiny_llava, tiny_qwen2_vl
from modkern.objective.robust import (
    AnswerRowHead,
    EmbeddingInjector,
    RobustConfig,
    find_language_model,
    get_logits,
    prepare_inputs,
    robust_loss,
    row_ref_index,
    shift_labels,
)

BUILDERS = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl, "llama": tiny_llama}


@pytest.fixture(scope="module")
def models():
    return {name: build(seed=0) for name, build in BUILDERS.items()}


def lm_of(model):
    return find_language_model(model)


def no_hooks(model):
    return len(lm_of(model)._forward_pre_hooks) == 0


def record_lm_inputs(model):
    """Record the hidden states the first decoder layer receives (= what the LM embeds to)."""
    seen = []
    layer = lm_of(model).layers[0]

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append(x.detach().clone())

    return seen, layer.register_forward_pre_hook(hook, with_kwargs=True)


def manual_ce_sum(logits, labels):
    shifted = shift_labels(labels)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), reduction="sum")


def full_logits(model, batch):
    """The model's own forward: logits at every position [B, L, V] (what the objective never builds)."""
    with torch.no_grad():
        return model(**prepare_inputs(model, batch)).logits


# ------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(epsilon=0), ValueError, "epsilon"),
        (dict(epsilon=-1e-3), ValueError, "epsilon"),
        (dict(epsilon="big"), TypeError, "epsilon"),
        (dict(alpha=0.0), ValueError, "alpha"),
        (dict(steps=-1), ValueError, "steps"),
        (dict(steps=1.5), TypeError, "steps"),
        (dict(steps=True), TypeError, "steps"),
        (dict(lam=-0.1), ValueError, "lam"),
        (dict(divergence="mse"), ValueError, "divergence"),
        (dict(kl_direction="sideways"), ValueError, "kl_direction"),
        (dict(beta=1.0), ValueError, "beta"),
        (dict(temperature=0), ValueError, "temperature"),
        (dict(divergence_grad_mode="later"), ValueError, "divergence_grad_mode"),
        (dict(step="adam"), ValueError, "step"),
        (dict(norm="l3"), ValueError, "norm"),
        (dict(init="gauss"), ValueError, "init"),
        (dict(attack_normalization="batch"), ValueError, "attack_normalization"),
        (dict(policy=["text"]), TypeError, "policy"),
        (dict(policy={"vqa": 3}), TypeError, "policy"),
        (dict(default_perturb=[]), TypeError, "default_perturb"),
        (dict(token_ids=[1, 2]), TypeError, "token_ids"),
        (dict(backend="opencl"), ValueError, "backend"),
        (dict(reuse_encoder_outputs="yes"), TypeError, "reuse_encoder_outputs"),
    ],
)
def test_config_rejects_bad_values(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RobustConfig(**kwargs)


def test_config_defaults_are_the_papers():
    c = RobustConfig()
    assert (c.epsilon, c.alpha, c.steps, c.divergence, c.step, c.norm) == (1e-3, 0.1, 2, "kl", "raw", "linf")
    assert c.policy == {"image_heavy": "text", "text_heavy": "image", "vqa": "none"}
    assert c.replace(lam=0.5).lam == 0.5
    with pytest.raises(ValueError, match="epsilon"):
        c.replace(epsilon=0)


# ------------------------------------------------------------------------------------------------
# the objective


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "llama"])
def test_parts_sum_and_no_parameter_grad_before_backward(models, name):
    model, info = models[name]
    model.zero_grad(set_to_none=True)
    kinds = None if name == "llama" else [KINDS[i % 3] for i in range(4)]
    batch = make_batch(info, 4, seed=1, kinds=kinds)
    out = robust_loss(model, batch, RobustConfig(lam=0.5), return_logits=True)
    # the attack used autograd.grad w.r.t. delta only: nothing accumulated, requires_grad restored
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert no_hooks(model)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss.detach(), out.ce_clean + out.ce_adv + out.consistency)
    # the clean CE is the token sum over the answer tokens divided by their count
    shifted = shift_labels(batch["labels"])
    n = (shifted != -100).sum()
    full = full_logits(model, batch)
    torch.testing.assert_close(out.ce_clean, manual_ce_sum(full, batch["labels"]) / n)
    # the returned logits are the answer rows' only, equal to the full logits there
    assert out.logits.shape == (int(n), full.shape[-1])
    torch.testing.assert_close(out.logits.detach(), full[shifted != -100])
    assert robust_loss(model, batch, RobustConfig(lam=0.5)).logits is None
    model.zero_grad(set_to_none=True)
    assert out.ce_adv > 0 and out.consistency >= 0
    out.loss.backward()
    assert sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None) > 0
    model.zero_grad(set_to_none=True)


def test_frozen_parameters_stay_frozen(models):
    model, info = models["llava"]
    frozen = list(model.model.vision_tower.parameters())
    for p in frozen:
        p.requires_grad_(False)
    try:
        out = robust_loss(model, make_batch(info, 2, kinds=["image_heavy", "text_heavy"]), RobustConfig())
        out.loss.backward()
        assert all(not p.requires_grad and p.grad is None for p in frozen)
        assert model.lm_head.weight.requires_grad and model.lm_head.weight.grad is not None
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "llama"])
@pytest.mark.parametrize("reuse", [True, False])
def test_zero_perturbation_replays_the_clean_forward(models, name, reuse):
    # delta = 0: the adversarial branch must see exactly the clean call (positions, masks, M-RoPE)
    model, info = models[name]
    model.eval()  # no dropout anyway; eval makes the point explicit
    try:
        cfg = RobustConfig(init="zero", steps=0, lam=1.0, reuse_encoder_outputs=reuse)
        batch = make_batch(info, 3, seed=2, kinds=None if name == "llama" else ["text_heavy"] * 3)
        with torch.enable_grad():
            out = robust_loss(model, batch, cfg)
        torch.testing.assert_close(out.ce_adv, out.ce_clean, rtol=1e-6, atol=1e-6)
        assert abs(float(out.consistency)) < 1e-6
    finally:
        model.train()


def test_qwen2_vl_builds_mm_token_type_ids_when_missing(models):
    model, info = models["qwen2_vl"]
    batch = make_batch(info, 2, seed=3, kinds=["text_heavy", "image_heavy"])
    ref = robust_loss(model, batch, RobustConfig(init="zero", steps=0))
    del batch["mm_token_type_ids"]
    out = robust_loss(model, batch, RobustConfig(init="zero", steps=0))
    torch.testing.assert_close(out.ce_clean, ref.ce_clean)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "llama"])
def test_perturbation_reaches_exactly_the_masked_positions(models, name, monkeypatch):
    model, info = models[name]
    kinds = ["image_heavy", "text_heavy", "vqa", "image_heavy"]
    if name == "llama":
        kinds = ["image_heavy", "vqa", "image_heavy", "vqa"]  # text-only: perturb the prompt or nothing
    batch = make_batch(info, 4, seed=4, kinds=kinds)
    grads = []
    real_step = modkern.masked_adv_step

    def spy(delta, grad, mask, **kw):
        grads.append(grad.detach().clone())
        return real_step(delta, grad, mask, **kw)

    monkeypatch.setattr(modkern.objective.robust, "masked_adv_step", spy)
    seen, handle = record_lm_inputs(model)
    try:
        cfg = RobustConfig(steps=2, epsilon=0.05, alpha=10.0)
        out = robust_loss(model, batch, cfg)
    finally:
        handle.remove()
    mask = out.mask
    # the expected modality mask, built by hand
    ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
    placeholders = torch.zeros_like(ids, dtype=torch.bool)
    for tid in info["token_ids"].values():
        placeholders |= ids == tid
    markers = torch.zeros_like(placeholders)
    for key in ("vision_start_token_id", "vision_end_token_id"):
        if key in info:
            markers |= ids == info[key]
    text = attn & (labels == -100) & ~placeholders & ~markers
    expected = torch.zeros_like(placeholders)
    for b, kind in enumerate(kinds):
        expected[b] = {"image_heavy": text[b], "text_heavy": placeholders[b], "vqa": torch.zeros_like(text[b])}[kind]
    assert torch.equal(mask.cpu(), expected)
    assert expected.any()
    # calls: clean, 2 attack forwards, adversarial forward; the last three on the samples with a
    # non-empty mask only (skip_unperturbed), the VQA samples are left out
    kept = mask.any(1).cpu()
    assert not kept.all() and kept.any()
    mask = mask[kept.to(mask.device)]
    assert len(seen) == 4 and len(grads) == 2
    for g in grads:  # the attack gradient w.r.t. delta vanishes off the mask
        assert g.shape[0] == int(kept.sum())
        assert torch.all(g[~mask] == 0)
        assert torch.all(g[mask].abs().sum(-1) > 0)
    for x in seen[1:]:  # embeddings differ from the clean ones exactly on the mask, within epsilon
        diff = (x - seen[0][kept.to(x.device)]).abs()
        assert torch.equal(diff.amax(-1) > 0, mask)
        assert float(diff.max()) <= cfg.epsilon * (1 + 1e-5)
    assert torch.equal(out.delta[~kept.to(out.delta.device)], torch.zeros_like(out.delta[~kept.to(out.delta.device)]))
    assert no_hooks(model)


def test_attack_increases_the_loss(models):
    model, info = models["llama"]
    batch = make_batch(info, 4, seed=5)
    base = robust_loss(model, batch, RobustConfig(init="zero", steps=0))
    attacked = robust_loss(model, batch, RobustConfig(init="zero", steps=3, epsilon=0.5, alpha=50.0, step="sign"))
    assert attacked.ce_adv > base.ce_adv + 1e-4
    torch.testing.assert_close(attacked.ce_clean, base.ce_clean)


def test_attack_normalization_scales_the_raw_step(models):
    # One raw step from zero with no projection: delta = alpha * dCE_sum/d delta / divisor. With
    # num_items_in_batch = 3 x this micro-batch's tokens (gradient accumulation over 3 micro-batches),
    # "num_items" divides by 3n and "micro_batch" by n (the official micro-batch mean), so the
    # micro-batch step is exactly 3 times larger, and equals the step without accumulation.
    model, info = models["llama"]
    batch = make_batch(info, 4, seed=6)
    n = int((shift_labels(batch["labels"]) != -100).sum())
    cfg = RobustConfig(init="zero", steps=1, step="raw", norm=None, alpha=10.0, lam=0.0)
    assert cfg.attack_normalization == "micro_batch"  # the official default
    alone = robust_loss(model, batch, cfg).delta
    by_items_cfg = cfg.replace(attack_normalization="num_items")
    by_items = robust_loss(model, batch, by_items_cfg, num_items_in_batch=3 * n).delta
    by_micro = robust_loss(model, batch, cfg, num_items_in_batch=3 * n)
    scale = float(alone.abs().max())
    assert scale > 0
    # fp32 model: the two backward passes round differently (the loss scale enters before the
    # matmuls), a few fp32 ulps of the largest entry.
    torch.testing.assert_close(by_items * 3, alone, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(by_micro.delta, alone, rtol=1e-4, atol=1e-5 * scale)
    # the back-propagated loss keeps the num_items normalization either way
    torch.testing.assert_close(by_micro.ce_clean * 3, robust_loss(model, batch, cfg).ce_clean)


@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_consistency_with_heuristic_copies_uses_aligned_answer_rows(models, divergence):
    model, info = models["llava"]
    # two copies whose prompts have other lengths than their clean samples
    batch = make_batch(info, 3, seed=6, kinds=["image_heavy"] * 3, answer_lens=[2, 3, 1], copies=((0, 7), (1, 1)))
    lam = 0.7
    # the adversarial pairs only, KL(P||Q), divided by the answer tokens (the official pairs,
    # direction and divisor: test_official_objective.py)
    cfg = RobustConfig.preset("modkern-0.1", init="zero", steps=0, lam=lam, divergence=divergence)
    out = robust_loss(model, batch, cfg, num_items_in_batch=11)
    # delta = 0: adversarial logits == clean logits; a clean sample compares with itself (0) and a copy
    # with its clean sample's answer rows
    full = full_logits(model, batch)
    logits = full.double()
    shifted = shift_labels(batch["labels"])
    total = 0.0
    for b, r in enumerate(batch["ref_index"].tolist()):
        qb = logits[b][shifted[b] != -100]
        pr = logits[r][shifted[r] != -100]
        lp, lq = pr.log_softmax(-1), qb.log_softmax(-1)
        if divergence == "kl":
            total += (lp.exp() * (lp - lq)).sum()
        else:
            lm = torch.logaddexp(lp, lq) - torch.log(torch.tensor(2.0, dtype=torch.float64))
            total += 0.5 * (lp.exp() * (lp - lm)).sum() + 0.5 * (lq.exp() * (lq - lm)).sum()
    assert total > 0
    torch.testing.assert_close(out.consistency.double(), lam * total / 11, rtol=1e-4, atol=1e-7)
    # num_items_in_batch is the divisor of every term
    torch.testing.assert_close(out.ce_clean * 11, manual_ce_sum(full, batch["labels"]))


def test_attack_telemetry_values():
    from modkern.objective.robust import ATTACK_STATS, attack_telemetry

    eps, alpha = 0.5, 0.25
    cfg = RobustConfig(epsilon=eps, alpha=alpha)
    x0 = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])  # [1, 3, 2]
    mask = torch.tensor([[True, False, True]])
    delta = torch.tensor([[[0.5, -0.1], [9.0, 9.0], [-0.5, 0.0]]])  # position 1 is off the mask
    grad = torch.tensor([[[2.0, -2.0], [7.0, 7.0], [0.0, 4.0]]])
    stats = attack_telemetry(x0, delta, grad, mask, cfg)
    assert set(stats) == set(ATTACK_STATS)
    assert float(stats["attack_grad_norm"]) == pytest.approx((4 + 4 + 0 + 16) ** 0.5)
    assert float(stats["attack_step_over_eps"]) == pytest.approx((2 + 2 + 0 + 4) / 4 * alpha / eps)
    assert float(stats["delta_at_bound"]) == pytest.approx(2 / 4)
    assert float(stats["delta_over_embeds"]) == pytest.approx((0.25 + 0.01 + 0.25) ** 0.5 / (1 + 4 + 25 + 36) ** 0.5)
    assert float(stats["delta_survives_cast"]) == pytest.approx(3 / 4)  # the 0 entry changes nothing
    # bf16 embeddings: a delta far below half an ulp of the entry is lost in the cast
    x16 = torch.full((1, 2, 2), 256.0, dtype=torch.bfloat16)
    tiny = torch.full((1, 2, 2), 0.1)
    lost = attack_telemetry(x16, tiny, None, torch.ones(1, 2, dtype=torch.bool), cfg)
    assert float(lost["delta_survives_cast"]) == 0.0 and float(lost["attack_grad_norm"]) == 0.0
    # an empty mask: zeros, not NaN
    empty = attack_telemetry(x0, delta, grad, torch.zeros(1, 3, dtype=torch.bool), cfg)
    assert all(float(v) == 0.0 for v in empty.values())


def test_row_ref_index():
    rows = torch.tensor(
        [
            [0, 0, 1, 1, 0, 0],  # sample 0: answer rows 2, 3
            [0, 1, 0, 0, 0, 0],  # sample 1: answer row 1
            [0, 0, 0, 0, 1, 1],  # copy of 0: rows 4, 5 -> rows 2, 3 of sample 0
            [1, 0, 0, 0, 0, 0],  # copy of 1: row 0 -> row 1 of sample 1
        ],
        dtype=torch.bool,
    )
    ref = row_ref_index(rows, torch.tensor([0, 1, 0, 1])).reshape(4, 6)
    assert ref[2, 4] == 0 * 6 + 2 and ref[2, 5] == 3
    assert ref[3, 0] == 1 * 6 + 1
    assert ref[0, 2] == 2 and ref[0, 3] == 3 and ref[1, 1] == 7
    assert int(ref.min()) >= 0 and int(ref.max()) < 24
    with pytest.raises(ValueError, match="answer tokens"):
        row_ref_index(rows, torch.tensor([0, 0, 0, 1]))
    if torch.cuda.is_available():  # no host sync there: the offending sample's rows map to -1 (NaN loss)
        ref = row_ref_index(rows.cuda(), torch.tensor([0, 0, 0, 1], device="cuda")).reshape(4, 6).cpu()
        assert (ref[1] == -1).all() and (ref[[0, 2, 3]] >= 0).all()
        torch.cuda.synchronize()  # no device-side assert fired


# ------------------------------------------------------------------------------------------------
# hook hygiene and errors


def test_hook_removed_after_an_exception(models, monkeypatch):
    model, info = models["llava"]
    batch = make_batch(info, 2, kinds=["image_heavy", "text_heavy"])

    def boom(*a, **k):
        raise RuntimeError("attack failed")

    monkeypatch.setattr(modkern.objective.robust, "masked_adv_step", boom)
    with pytest.raises(RuntimeError, match="attack failed"):
        robust_loss(model, batch, RobustConfig())
    assert no_hooks(model) and not model.get_output_embeddings()._forward_pre_hooks
    assert all(p.requires_grad for p in model.parameters())
    # an exception in the clean forward (wrong number of image features)
    bad = dict(batch, pixel_values=batch["pixel_values"][:1])
    monkeypatch.undo()
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        robust_loss(model, bad, RobustConfig())
    assert no_hooks(model)


def test_injector_context_manager_removes_hook(models):
    model, _ = models["llama"]
    lm = lm_of(model)
    with pytest.raises(KeyError):
        with EmbeddingInjector(lm) as inj:
            assert inj.handle is not None and len(lm._forward_pre_hooks) == 1
            raise KeyError("x")
    assert len(lm._forward_pre_hooks) == 0


class _NoLogits(torch.nn.Module):
    """Stands in for a forward patched with a fused linear cross entropy (no logits returned)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kw):
        out = self.inner(**kw)
        return {"loss": out.logits.sum() * 0}


class _FusedHead(_NoLogits):
    """Stands in for a forward that applies the LM head's weight itself (TRL-style fused head)."""

    def forward(self, **kw):
        hidden = self.inner.model(**kw).last_hidden_state
        return {"logits": F.linear(hidden, self.inner.get_output_embeddings().weight)}


def test_bad_inputs_give_clear_errors(models):
    model, info = models["llava"]
    batch = make_batch(info, 2, kinds=["image_heavy", "text_heavy"])
    with pytest.raises(RuntimeError, match="no logits.*Liger"):
        robust_loss(_NoLogits(model), batch, RobustConfig())
    assert no_hooks(model)
    with pytest.raises(RuntimeError, match="did not call its LM head.*Liger"):
        robust_loss(_FusedHead(model), batch, RobustConfig())
    assert no_hooks(model) and not model.get_output_embeddings()._forward_pre_hooks
    with pytest.raises(ValueError, match="labels"):
        robust_loss(model, {k: v for k, v in batch.items() if k != "labels"}, RobustConfig())
    with pytest.raises(ValueError, match="input_ids"):
        robust_loss(model, {k: v for k, v in batch.items() if k != "input_ids"}, RobustConfig())
    with pytest.raises(ValueError, match="unknown sample_kind"):
        robust_loss(model, dict(batch, sample_kind=["image_heavy", "audio_heavy"]), RobustConfig())
    with pytest.raises(ValueError, match="sample_kind has 1"):
        robust_loss(model, dict(batch, sample_kind=["vqa"]), RobustConfig())
    with pytest.raises(ValueError, match="'audio' is not a modality"):
        robust_loss(model, batch, RobustConfig(policy={"image_heavy": "audio", "text_heavy": "image"}))
    with pytest.raises(ValueError, match="ref_index must have shape"):
        robust_loss(model, dict(batch, ref_index=torch.tensor([0, 0, 1])), RobustConfig())
    with pytest.raises(TypeError, match="config must be a RobustConfig"):
        robust_loss(model, batch, {"epsilon": 1e-3})
    with pytest.raises(NotImplementedError, match="DataParallel"):
        robust_loss(torch.nn.DataParallel(model), batch, RobustConfig())
    assert no_hooks(model)
    for codes in ([0, 5], [-1, 0]):
        with pytest.raises(ValueError, match="sample_kind codes"):
            robust_loss(model, dict(batch, sample_kind=torch.tensor(codes)), RobustConfig())
    with torch.no_grad(), pytest.raises(RuntimeError, match="clean_loss"):
        robust_loss(model, batch, RobustConfig())
    assert no_hooks(model)


def test_integer_sample_kinds_and_an_accumulated_batch_without_answers(models):
    model, info = models["llava"]
    batch = make_batch(info, 3, seed=2, kinds=["image_heavy", "text_heavy", "vqa"])
    by_name = robust_loss(model, batch, RobustConfig(init="zero", steps=1, alpha=5.0, step="sign", epsilon=0.05))
    codes = dict(batch, sample_kind=torch.tensor([0, 1, 2]))
    by_code = robust_loss(model, codes, RobustConfig(init="zero", steps=1, alpha=5.0, step="sign", epsilon=0.05))
    assert torch.equal(by_name.mask, by_code.mask) and torch.equal(by_name.delta, by_code.delta)
    # no answer token anywhere, with Hugging Face's tensor count of 0: zeros, not 0/0
    empty = dict(batch, labels=torch.full_like(batch["labels"], -100))
    out = robust_loss(model, empty, RobustConfig(lam=0.5), num_items_in_batch=torch.tensor(0))
    assert float(out.loss.detach()) == 0.0 and float(out.ce_clean) == 0.0 and float(out.consistency) == 0.0


def test_reentrant_checkpointing_gets_a_clear_error():
    model, info = tiny_llava(seed=0)
    model.activation_checkpointing_enable({"use_reentrant": True})
    batch = make_batch(info, 2, kinds=["image_heavy", "text_heavy"])
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        robust_loss(model, batch, RobustConfig())
    assert no_hooks(model)
    assert all(p.requires_grad for p in model.parameters())
    # the non-reentrant variant (transformers 5's default) works
    model.activation_checkpointing_enable({"use_reentrant": False})
    assert torch.isfinite(robust_loss(model, batch, RobustConfig()).loss)


# ------------------------------------------------------------------------------------------------
# logits only at the answer rows: equivalence with the full-logit objective, the chunked head path


class FullLogitsHead(AnswerRowHead):
    """The previous computation, as a test double: the LM head runs on every position ([B, L, V]
    logits) and the answer rows are gathered from them afterwards."""

    def _hook(self, module, args, kwargs):
        self.calls += 1

    def logits(self, output):
        full = get_logits(output)
        assert full.shape[:-1].numel() == self.tokens
        return full.reshape(-1, full.shape[-1]).index_select(0, self.index)


def loss_and_grads(model, batch, cfg, num_items=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same random start for every variant
    out = robust_loss(model, batch, cfg, num_items_in_batch=num_items)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def assert_same_objective(a, b):
    out_a, grads_a = a
    out_b, grads_b = b
    for part in ("loss", "ce_clean", "ce_adv", "consistency"):
        torch.testing.assert_close(getattr(out_a, part).detach(), getattr(out_b, part).detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out_a.delta, out_b.delta, rtol=1e-4, atol=1e-7)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        # elementwise, with an absolute floor far below the entries that matter (fp32 sums)
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=2e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("divergence", ["kl", "js"])
@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "llama"])
def test_answer_rows_and_chunked_head_equal_the_full_logit_objective(models, name, divergence, monkeypatch):
    model, info = models[name]
    kinds = None if name == "llama" else ["image_heavy", "text_heavy", "image_heavy"]
    batch = make_batch(info, 3, seed=8, kinds=kinds, answer_lens=[2, 3, 1], copies=((0, 7), (1, 2)))
    cfg = RobustConfig(lam=0.5, divergence=divergence, steps=2, epsilon=0.05, alpha=1.0, lm_head="rows")
    rows = loss_and_grads(model, batch, cfg, num_items=13)
    assert float(rows[0].consistency) > 0
    with monkeypatch.context() as patch:
        patch.setattr(modkern.objective.robust, "AnswerRowHead", FullLogitsHead)
        full = loss_and_grads(model, batch, cfg, num_items=13)
    assert_same_objective(rows, full)
    for chunk_size in (1, 2, None):
        chunked = loss_and_grads(model, batch, cfg.replace(lm_head="chunked", chunk_size=chunk_size), num_items=13)
        assert_same_objective(chunked, full)


@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_divergence_grad_mode_forward_is_the_same_objective(models, divergence):
    # The one-read divergence (its gradients written in the forward, lam / num_items folded in as
    # its scale) against the recomputing backward: the same loss, parts and parameter gradients.
    model, info = models["llava"]
    batch = make_batch(info, 3, seed=8, kinds=["image_heavy", "text_heavy", "image_heavy"], copies=((0, 7),))
    cfg = RobustConfig(lam=0.5, divergence=divergence, steps=1, epsilon=0.05, alpha=1.0, lm_head="rows")
    one_read = loss_and_grads(model, batch, cfg.replace(divergence_grad_mode="forward"), num_items=13)
    assert float(one_read[0].consistency) > 0
    assert_same_objective(
        one_read, loss_and_grads(model, batch, cfg.replace(divergence_grad_mode="backward"), num_items=13)
    )


def head_batch_sizes(model):
    """Record the leading shape of each LM head output (one entry per call)."""
    sizes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: sizes.append(out.shape[:-1]))
    return sizes, handle


def test_the_lm_head_sees_only_the_answer_rows(models):
    model, info = models["llava"]
    batch = make_batch(info, 3, seed=9, kinds=["image_heavy", "text_heavy", "vqa"])
    answers = shift_labels(batch["labels"]) != -100
    n, n_perturbed = int(answers.sum()), int(answers[:2].sum())  # the VQA sample has nothing to perturb
    sizes, handle = head_batch_sizes(model)
    try:
        robust_loss(model, batch, RobustConfig(steps=2, lm_head="rows"))
        # clean, 2 attack steps, adversarial: [n, V] logits, never [B, L, V]; the attack and the
        # adversarial forward on the perturbed samples' rows only
        assert sizes == [(n,)] + [(n_perturbed,)] * 3 and n_perturbed < n
        sizes.clear()
        robust_loss(model, batch, RobustConfig(steps=2, lm_head="rows", skip_unperturbed=False))
        assert sizes == [(n,)] * 4
        sizes.clear()
        # auto: the rows' fp32 logits over the budget -> the chunked path, the head gets an empty batch
        robust_loss(model, batch, RobustConfig(steps=2, logits_budget_mb=1e-6))
        assert sizes == [(0,)] * 4
    finally:
        handle.remove()


def test_every_forward_runs_whatever_the_data(models):
    """Collective safety: an empty modality mask and no answer rows still run clean + K + adversarial."""
    model, info = models["llava"]
    batch = make_batch(info, 2, seed=10, kinds=["vqa", "vqa"])
    batch["labels"] = torch.full_like(batch["labels"], -100)
    sizes, handle = head_batch_sizes(model)
    seen, lm_handle = record_lm_inputs(model)
    try:
        out = robust_loss(model, batch, RobustConfig(steps=3, lam=0.5), num_items_in_batch=torch.tensor(5))
    finally:
        handle.remove()
        lm_handle.remove()
    assert sizes == [(0,)] * 5 and len(seen) == 5
    assert not out.mask.any() and float(out.loss.detach()) == 0.0
    out.loss.backward()  # a graph to back-propagate through on every rank
    model.zero_grad(set_to_none=True)


def test_chunked_head_refuses_what_it_cannot_compute(models):
    model, info = models["llava"]
    batch = make_batch(info, 2, seed=11, kinds=["image_heavy", "text_heavy"])
    model.config.text_config.final_logit_softcapping = 30.0
    try:
        with pytest.raises(ValueError, match="final_logit_softcapping.*lm_head='rows'"):
            robust_loss(model, batch, RobustConfig(lm_head="chunked"))
        with pytest.warns(UserWarning, match="chunked LM-head path cannot run"):
            out = robust_loss(model, batch, RobustConfig(logits_budget_mb=1e-6))  # auto falls back to rows
        assert torch.isfinite(out.loss)
    finally:
        model.config.text_config.final_logit_softcapping = None
    assert no_hooks(model) and not model.get_output_embeddings()._forward_pre_hooks
    with pytest.raises(ValueError, match="lm_head"):
        RobustConfig(lm_head="full")
    with pytest.raises(ValueError, match="chunk_size"):
        RobustConfig(chunk_size=0)


def test_fractional_num_items_in_batch_from_a_parallel_trainer(models):
    """Hugging Face divides num_items_in_batch by the tensor / context / sequence-parallel sizes:
    a float tensor that need not be whole must divide every term, not fail."""
    model, info = models["llama"]
    batch = make_batch(info, 2, seed=12)
    # same delta; every term divided by num_items_in_batch
    cfg = RobustConfig(init="zero", steps=1, lam=0.5, attack_normalization="micro_batch", consistency_divisor="tokens")
    whole = robust_loss(model, batch, cfg, num_items_in_batch=torch.tensor(10))
    half = robust_loss(model, batch, cfg, num_items_in_batch=torch.tensor(10.0) / 4)
    torch.testing.assert_close(half.loss.detach(), whole.loss.detach() * 4)
