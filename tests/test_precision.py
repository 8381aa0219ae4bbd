"""Low precision and activation checkpointing under the robust objective (CPU, tiny LLaVA).

- fp16: the attack's ``autograd.grad`` flows back through the same fp16 activations as the loss, so
  without a loss scale its gradient underflows (a ``"raw"`` step then leaves delta at its start);
  ``robust_loss(attack_grad_scale=...)`` scales it like a GradScaler, and the Trainer integration
  passes its GradScaler's current scale.
- gradient checkpointing (non-reentrant, the transformers 5 default) gives the same step as without;
  reentrant checkpointing fails with a message that names the fix.
"""

import math

import pytest
import torch
from tiny_models import KINDS, PLAIN_SGD, collate_rows, make_batch, rows_dataset, training_args
from transformers import Trainer

import modkern.integrations.hf as hf
from modkern.apps.tiny_models import tiny_llava
from modkern.integrations.hf import patch_trainer
from modkern.objective.robust import RobustConfig, robust_loss

PART_NAMES = ("ce_clean", "ce_adv", "consistency")
# raw step, no projection in reach: delta = alpha * grad after one step from a zero start
ONE_RAW_STEP = RobustConfig(init="zero", steps=1, epsilon=1.0, alpha=1.0, lam=0.1)


def _cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_attack_gradient_does_not_underflow_in_fp16():
    model, info = tiny_llava(seed=0)
    batch = make_batch(info, 4, seed=1, kinds=["image_heavy"] * 4)
    # a large accumulated batch: the normalized CE's gradients reach the fp16 activations at ~1e-10
    # (the attack divides by num_items_in_batch, not by the micro-batch's tokens)
    n_items = 10**6
    cfg = ONE_RAW_STEP.replace(attack_normalization="num_items")
    reference = robust_loss(model, batch, cfg, num_items_in_batch=n_items).delta
    assert reference.abs().max() > 0
    moved = reference != 0
    with torch.autocast("cpu", dtype=torch.float16):
        plain = robust_loss(model, batch, cfg, num_items_in_batch=n_items).delta
        scaled = robust_loss(model, batch, cfg, num_items_in_batch=n_items, attack_grad_scale=2.0**20).delta
    # unscaled, most of the attack gradient underflows to 0 in the fp16 backward
    assert float((plain[moved] == 0).float().mean()) > 0.5
    assert _cosine(plain, reference) < 0.9
    # scaled (and unscaled in fp32), the step is the fp32 one up to fp16 rounding
    assert float((scaled[moved] == 0).float().mean()) == 0.0
    assert _cosine(scaled, reference) > 0.999
    torch.testing.assert_close(scaled.norm(), reference.norm(), rtol=1e-2, atol=0)


def test_attack_step_with_an_overflowed_gradient_is_skipped():
    model, info = tiny_llava(seed=0)
    batch = make_batch(info, 2, seed=1, kinds=["image_heavy"] * 2)
    with torch.autocast("cpu", dtype=torch.float16):
        out = robust_loss(model, batch, ONE_RAW_STEP, attack_grad_scale=1e30)
    assert out.delta.abs().max() == 0  # overflowed: no step (and no NaN in delta)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for bad in (0.0, -1.0, float("inf"), "2"):
        with pytest.raises((TypeError, ValueError), match="attack_grad_scale"):
            robust_loss(model, batch, ONE_RAW_STEP, attack_grad_scale=bad)


def _args(tmp_path, **kw):
    return training_args(tmp_path / "out", **{"max_steps": 2, **PLAIN_SGD, **kw})


def _data(info):
    return rows_dataset(make_batch(info, 8, seed=1, kinds=[KINDS[i % 3] for i in range(8)]))


def test_fp16_trainer_hands_its_grad_scale_to_the_attack(tmp_path, monkeypatch):
    model, info = tiny_llava(seed=0)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(
        model=model, args=_args(tmp_path, fp16=True), train_dataset=_data(info), data_collator=collate_rows
    )
    trainer = patch_trainer(trainer, RobustConfig(init="zero", lam=0.5))
    if trainer.accelerator.device.type == "cpu":
        # accelerate makes fp16 a no-op on CPU (Accelerator.__init__ creates the GradScaler and the
        # autocast only for device types other than "cpu": the run would be plain fp32); install both
        # the way it does on a GPU
        assert trainer.accelerator.scaler is None
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
        trainer.accelerator.native_amp = True
    seen, dtypes = [], []
    real = hf.robust_loss
    scaler = trainer.accelerator.scaler
    real_get_scale = scaler.get_scale

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        current = real_get_scale()
        seen.append((float(kwargs.get("attack_grad_scale")), current, float(out.delta.abs().max())))
        return out

    def no_sync():
        raise AssertionError("get_scale() is a host sync per micro-batch")

    monkeypatch.setattr(scaler, "get_scale", no_sync)

    monkeypatch.setattr(hf, "robust_loss", recording)
    layer = model.model.language_model.layers[0].mlp.down_proj
    layer.register_forward_hook(lambda m, a, o: dtypes.append(o.dtype))
    trainer.train()
    assert set(dtypes) == {torch.float16}  # the decoder ran under fp16 autocast
    # the attack follows the scaler's current scale (the first step overflows at 65536 and halves it)
    assert len(seen) == 2 and all(given == current for given, current, _ in seen)
    assert seen[0][0] == 65536.0
    assert all(moved > 0 for _, _, moved in seen)  # the attack moved delta from its zero start
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(log[k]) for log in logs for k in ("loss", *PART_NAMES))
    assert any(not torch.equal(p.detach(), init[n]) for n, p in model.named_parameters())


def _train(tmp_path, name, **kw):
    model, info = tiny_llava(seed=0)
    calls = []
    mlp = model.model.language_model.layers[0].mlp
    forward = mlp.forward  # counted in forward: the recompute stops after the last saved tensor, before the hooks
    mlp.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
    trainer = Trainer(
        model=model, args=_args(tmp_path / name, **kw), train_dataset=_data(info), data_collator=collate_rows
    )
    patch_trainer(trainer, RobustConfig(init="zero", steps=2, epsilon=0.05, alpha=2.0, lam=0.5))
    trainer.train()
    return model, trainer, len(calls)


def test_gradient_checkpointing_through_the_trainer(tmp_path):
    plain, _, plain_calls = _train(tmp_path, "plain")
    ckpt, trainer, ckpt_calls = _train(tmp_path, "ckpt", activation_checkpointing=True)
    assert ckpt.model.language_model.layers[0].gradient_checkpointing
    # per step: clean + 2 attack + adversarial forwards; checkpointing recomputes the layer in each
    # attack backward and, for the clean and adversarial branches, in the final backward
    assert plain_calls == 2 * 4
    assert ckpt_calls == 2 * (4 + 2 + 2)
    for (name, p), q in zip(ckpt.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(log["ce_adv"]) for log in logs)


def test_reentrant_checkpointing_fails_with_the_fix_named(tmp_path):
    with pytest.raises(RuntimeError, match="reentrant activation checkpointing does not support.*use_reentrant=False"):
        _train(
            tmp_path,
            "reentrant",
            activation_checkpointing=True,
            activation_checkpointing_kwargs={"use_reentrant": True},
        )


def test_attack_grad_scale_is_the_scalers_device_tensor_without_a_host_sync(monkeypatch):
    """fp16: the scale goes to the attack as the GradScaler's 0-dim device tensor (a copy: the
    scaler updates its own in place), never through ``get_scale()`` / ``.item()`` (a host sync per
    micro-batch); before the scaler's first step it is the initial scale, a Python number."""
    from types import SimpleNamespace

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def no_sync(*a, **k):
        raise AssertionError("host sync")

    monkeypatch.setattr(scaler, "get_scale", no_sync)
    fake = SimpleNamespace(accelerator=SimpleNamespace(scaler=scaler))
    model = torch.nn.Linear(2, 2)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", no_sync)
        before = hf.RobustTrainerMixin._robust_attack_grad_scale(fake, model)
    assert before == 2.0**10 and not isinstance(before, torch.Tensor)
    scaler.scale(torch.ones((), requires_grad=True))  # the scaler makes its scale tensor lazily
    scaler._scale.fill_(2.0**7)  # as after an update
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", no_sync)
        m.setattr(torch.Tensor, "__float__", no_sync)
        given = hf.RobustTrainerMixin._robust_attack_grad_scale(fake, model)
    assert isinstance(given, torch.Tensor) and given.dim() == 0 and given.device == scaler._scale.device
    assert float(given) == 2.0**7 and given.data_ptr() != scaler._scale.data_ptr()
    scaler._scale.fill_(1.0)
    assert float(given) == 2.0**7  # unaffected by the scaler's own in-place update
    assert (
        hf.RobustTrainerMixin._robust_attack_grad_scale(
            SimpleNamespace(accelerator=SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False))), model
        )
        is None
    )
