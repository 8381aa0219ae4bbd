"""PEFT LoRA under the robust objective: a LoRA-wrapped tiny LLaVA through patch_trainer.

Only the adapters are trainable. ``freeze_params_during_attack`` must switch them off for the attack's
forwards (no weight-gradient graph, no parameter gradient), the adapters must train, and the frozen base
weights must not change.
"""

import math

import pytest
import torch
from distributed_workers import AttackWatch
from tiny_models import KINDS, PLAIN_SGD, collate_rows, make_batch, rows_dataset, training_args
from transformers import Trainer

from modkern.apps.tiny_models import tiny_llava
from modkern.integrations.hf import patch_trainer
from modkern.objective.robust import RobustConfig, find_language_model, find_lm_head

peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")

STEPS = 2


def lora_llava():
    model, info = tiny_llava(seed=0)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        # the decoder's attention only (the CLIP tower has q_proj / v_proj too)
        target_modules=r".*language_model.*\.(q_proj|v_proj)",
    )
    return peft.get_peft_model(model, config), info


@pytest.mark.parametrize("activation_checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_lora_adapters_train_base_frozen_attack_accumulates_nothing(tmp_path, activation_checkpointing):
    model, info = lora_llava()
    base = model.get_base_model()
    assert find_language_model(model) is base.model.language_model
    assert find_lm_head(model) is base.lm_head
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = rows_dataset(make_batch(info, 8, seed=1, kinds=[KINDS[i % 3] for i in range(8)]))
    args = training_args(
        tmp_path / "out",
        max_steps=2,
        **dict(PLAIN_SGD, max_grad_norm=1.0),
        activation_checkpointing=activation_checkpointing,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate_rows)
    patch_trainer(trainer, RobustConfig(steps=STEPS, epsilon=0.05, alpha=2.0, lam=0.5))
    adapter = base.model.language_model.layers[0].self_attn.q_proj.lora_B["default"]
    with AttackWatch(adapter, model) as watch:
        trainer.train()

    # the adapters are trainable in the clean and adversarial forwards, frozen in the K attack forwards;
    # with checkpointing each attack backward recomputes its forward (frozen too) and the final backward
    # recomputes the adversarial and clean forwards (trainable)
    if activation_checkpointing:
        pattern = [True] + [False, False] * STEPS + [True] + [True, True]
    else:
        pattern = [True] + [False] * STEPS + [True]
    assert [set(f) for f in watch.flags] == [{w} for w in pattern * 2]
    assert watch.grads_after_attack == [[], []]  # no parameter gradient after either attack
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # restored
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(log[k]) for log in logs for k in ("loss", "ce_adv", "consistency"))
    for name, p in model.named_parameters():
        if name in trainable:
            continue
        assert torch.equal(p.detach(), init[name]), f"frozen base weight {name} changed"
    moved = [n for n in trainable if "lora_B" in n and not torch.equal(dict(model.named_parameters())[n], init[n])]
    assert moved, "the LoRA adapters did not train"
    assert len(find_language_model(model)._forward_pre_hooks) == 0
