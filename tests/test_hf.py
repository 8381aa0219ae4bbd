"""modkern.integrations.hf: the robust objective inside a stock transformers.Trainer (CPU, tiny models)."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import KINDS, collate_rows, make_batch, rows_dataset
from tiny_models import training_args as shared_training_args
from transformers import Trainer
from transformers.modeling_outputs import CausalLMOutputWithPast

from modkern.apps.tiny_models import tiny_llama, tiny_llava, tiny_qwen2_vl
from modkern.integrations.hf import RobustTrainerMixin, make_robust_trainer, patch_trainer
from modkern.objective.robust import ATTACK_STATS, RobustConfig, clean_loss, find_language_model, robust_loss

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PART_NAMES = ("ce_clean", "ce_adv", "consistency")


def training_args(tmp_path, **kw):
    return shared_training_args(tmp_path / "out", **kw)


def train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("build", [tiny_llava, tiny_qwen2_vl], ids=["llava", "qwen2_vl"])
def test_patched_stock_trainer_learns_and_logs_the_parts(tmp_path, build):
    model, info = build(seed=0)
    data = rows_dataset(make_batch(info, 8, seed=1, kinds=[KINDS[i % 3] for i in range(8)]))
    args = training_args(tmp_path, max_steps=8, learning_rate=2e-2, per_device_eval_batch_size=4)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4], data_collator=collate_rows)
    assert patch_trainer(trainer, RobustConfig(lam=0.1)) is trainer
    assert isinstance(trainer, RobustTrainerMixin) and isinstance(trainer, Trainer)
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == 8
    for log in logs:
        assert all(name in log and math.isfinite(log[name]) for name in PART_NAMES)
        assert math.isfinite(log["loss"])
        # the logged parts add up to the Trainer's own loss
        assert log["loss"] == pytest.approx(sum(log[name] for name in PART_NAMES), rel=1e-4)
        # the attack's telemetry is logged next to them
        assert all(name in log and math.isfinite(log[name]) for name in ATTACK_STATS)
        assert log["attack_grad_norm"] > 0 and log["attack_step_over_eps"] > 0
        assert 0 <= log["delta_at_bound"] <= 1 and log["delta_survives_cast"] == 1.0  # fp32 model
    losses = [log["loss"] for log in logs]
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.2
    assert len(find_language_model(model)._forward_pre_hooks) == 0
    assert all(p.requires_grad for p in model.parameters())
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])


def _one_step(tmp_path, batch_size, accumulation, config, data, name):
    model, _ = tiny_llava(seed=0)
    args = training_args(
        tmp_path / name,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
    )
    trainer = patch_trainer(Trainer(model=model, args=args, train_dataset=data, data_collator=collate_rows), config)
    backwards = []
    real_backward = trainer.accelerator.backward
    trainer.accelerator.backward = lambda loss, **kw: (backwards.append(1), real_backward(loss, **kw))[1]
    trainer.train()
    return model, len(backwards)


def test_gradient_accumulation_is_exact(tmp_path):
    # zero start + attack on the same normalized CE: the perturbation of a sample does not depend on
    # how the batch is split, so batch 4 x GA 1 and batch 2 x GA 2 must give the same SGD step.
    _, info = tiny_llava(seed=0)
    batch = make_batch(info, 4, seed=3, kinds=list(KINDS) + ["image_heavy"], answer_lens=[1, 3, 2, 4])
    data = rows_dataset(batch)
    config = RobustConfig(init="zero", steps=2, epsilon=0.05, alpha=2.0, lam=0.5, attack_normalization="num_items")
    m1, n1 = _one_step(tmp_path, 4, 1, config, data, "ga1")
    m2, n2 = _one_step(tmp_path, 2, 2, config, data, "ga2")
    assert (n1, n2) == (1, 2)  # exactly one backward per micro-batch

    # the reference: one robust_loss over the whole batch, normalized by its answer tokens
    ref, _ = tiny_llava(seed=0)
    init = {n: p.detach().clone() for n, p in ref.named_parameters()}
    count = int((batch["labels"][:, 1:] != -100).sum())
    out = robust_loss(ref, batch, config, num_items_in_batch=count)
    assert out.consistency > 0 and out.ce_adv > out.ce_clean
    out.loss.backward()
    moved = 0.0
    for (name, p1), p2, p_ref in zip(m1.named_parameters(), m2.parameters(), ref.parameters()):
        expected = init[name] - 0.5 * (p_ref.grad if p_ref.grad is not None else 0)
        torch.testing.assert_close(p1.detach(), expected, rtol=1e-5, atol=1e-6, msg=f"GA 1 vs manual: {name}")
        torch.testing.assert_close(p2.detach(), p1.detach(), rtol=1e-5, atol=1e-6, msg=f"GA 2 vs GA 1: {name}")
        moved += float((p1.detach() - init[name]).abs().sum())
    assert moved > 0


class _TRLLike(Trainer):
    """Stands in for a TRL trainer: its own compute_loss and extra behaviour."""

    def compute_loss(self, *a, **k):
        raise AssertionError("the robust compute_loss must take precedence")

    def extra(self):
        return "kept"


def test_make_robust_trainer_composes(tmp_path):
    cls = make_robust_trainer(_TRLLike)
    assert make_robust_trainer(_TRLLike) is cls
    assert issubclass(cls, _TRLLike) and issubclass(cls, RobustTrainerMixin)
    assert cls.__mro__.index(RobustTrainerMixin) < cls.__mro__.index(_TRLLike)
    model, info = tiny_llama(seed=0)
    data = rows_dataset(make_batch(info, 4, seed=2))
    trainer = cls(
        model=model,
        args=training_args(tmp_path),
        train_dataset=data,
        data_collator=collate_rows,
        robust_config=RobustConfig(lam=0.2, divergence="js"),
    )
    assert trainer.robust_config.lam == 0.2 and trainer.extra() == "kept"
    trainer.train()
    assert all(name in train_logs(trainer)[0] for name in PART_NAMES)
    # the dataset columns robust_loss consumes survive remove_unused_columns
    trainer._signature_columns = None
    trainer._set_signature_columns_if_needed()
    assert {"sample_kind", "ref_index", "labels"} <= set(trainer._signature_columns)
    # a class-level default config
    with_default = make_robust_trainer(Trainer, RobustConfig(steps=1))
    assert with_default.robust_config.steps == 1


def test_patch_trainer_errors_and_repatching(tmp_path):
    model, info = tiny_llama(seed=0)
    data = rows_dataset(make_batch(info, 4, seed=2))
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=data, data_collator=collate_rows)
    with pytest.raises(TypeError, match="RobustConfig"):
        patch_trainer(trainer, {"lam": 0.1})
    patch_trainer(trainer, RobustConfig(lam=0.1))
    cls = type(trainer)
    patch_trainer(trainer, RobustConfig(lam=0.3))
    assert type(trainer) is cls and trainer.robust_config.lam == 0.3
    with pytest.raises(TypeError, match="Trainer instance"):
        patch_trainer(object())
    with pytest.raises(TypeError, match="Trainer subclass"):
        make_robust_trainer(dict)


def test_forward_without_logits_fails_clearly(tmp_path):
    model, info = tiny_llama(seed=0)
    inner_forward = model.forward

    def fused_forward(**kw):  # what Liger's fused linear cross entropy patch returns in training
        out = inner_forward(**kw)
        return CausalLMOutputWithPast(loss=out.logits.float().mean(), logits=None)

    model.forward = fused_forward
    data = rows_dataset(make_batch(info, 4, seed=2))
    trainer = patch_trainer(
        Trainer(model=model, args=training_args(tmp_path), train_dataset=data, data_collator=collate_rows)
    )
    with pytest.raises(RuntimeError, match="returned no logits.*Liger"):
        trainer.train()
    assert len(find_language_model(model)._forward_pre_hooks) == 0


def test_logged_parts_sum_to_the_loss_across_train_calls_and_resume(tmp_path):
    # the parts are averaged over the steps since the last log, counted like the Trainer's loss:
    # a second train() on the same trainer and a run resumed from a checkpoint stay exact
    model, info = tiny_llava(seed=0)
    data = rows_dataset(make_batch(info, 8, seed=1, kinds=[KINDS[i % 3] for i in range(8)]))

    def check(trainer, n_logs):
        logs = train_logs(trainer)
        assert len(logs) == n_logs
        for log in logs:
            assert log["loss"] == pytest.approx(sum(log[k] for k in PART_NAMES), rel=1e-4), log

    args = training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = patch_trainer(Trainer(model=model, args=args, train_dataset=data, data_collator=collate_rows))
    trainer.train()
    check(trainer, 2)
    trainer.train()  # again, on the same trainer (a new TrainerState: a fresh log history)
    check(trainer, 2)
    model, _ = tiny_llava(seed=0)
    args = training_args(tmp_path, max_steps=4)
    resumed = patch_trainer(Trainer(model=model, args=args, train_dataset=data, data_collator=collate_rows))
    resumed.train(resume_from_checkpoint=True)  # from step 2 (the checkpoint's log history comes along)
    logs = [h for h in train_logs(resumed) if h["step"] > 2]
    assert logs and logs[-1]["step"] == 4
    for log in logs:
        assert log["loss"] == pytest.approx(sum(log[k] for k in PART_NAMES), rel=1e-4), log


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from transformers import Trainer, TrainingArguments
    from modkern.integrations.hf import patch_trainer
    from modkern.objective.robust import RobustConfig
    from modkern.apps.tiny_models import tiny_llava
    from tiny_models import KINDS, collate_rows, make_batch, rows_dataset

    out_dir = sys.argv[1]
    rank = int(os.environ["RANK"])
    model, info = tiny_llava(seed=0)
    data = rows_dataset(make_batch(info, 8, seed=1, kinds=[KINDS[i % 3] for i in range(8)]))
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"), per_device_train_batch_size=2, max_steps=2,
        gradient_accumulation_steps=2, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, ddp_backend="gloo", disable_tqdm=True, remove_unused_columns=False, seed=0,
        per_device_eval_batch_size=4,
    )
    config = RobustConfig(init="zero", steps=2, epsilon=0.05, alpha=2.0, lam=0.5, attack_normalization="num_items")
    trainer = patch_trainer(Trainer(model=model, args=args, train_dataset=data, data_collator=collate_rows), config)
    assert args.world_size == 2, args.world_size
    trainer.train()
    trainer.evaluate(eval_dataset=data)  # one eval step: 4 samples per rank
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, os.path.join(out_dir, f"rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(out_dir, "logs.json"), "w") as f:
            json.dump(trainer.state.log_history, f)
    from distributed_workers import shutdown

    shutdown()  # leave the gloo group in step: a rank exiting with live gloo threads can abort
    """
)


def test_ddp_two_processes_gloo_keep_ranks_identical(tmp_path):
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS_DIR, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(
        cmd + [str(tmp_path)], env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path)
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    # reference: 2 processes x 2 micro-batches x 2 samples = the whole 8-sample batch per step, so two
    # SGD steps of robust_loss over all 8 samples (the zero start makes the attack split-invariant)
    ref, info = tiny_llava(seed=0)
    init = {n: p.detach().clone() for n, p in ref.named_parameters()}
    batch = make_batch(info, 8, seed=1, kinds=[KINDS[i % 3] for i in range(8)])
    count = int((batch["labels"][:, 1:] != -100).sum())
    config = RobustConfig(init="zero", steps=2, epsilon=0.05, alpha=2.0, lam=0.5, attack_normalization="num_items")
    for _ in range(2):
        ref.zero_grad(set_to_none=True)
        robust_loss(ref, batch, config, num_items_in_batch=count).loss.backward()
        with torch.no_grad():
            for p in ref.parameters():
                if p.grad is not None:
                    p -= 0.5 * p.grad
    moved = 0.0
    for name, p in ref.named_parameters():
        torch.testing.assert_close(r0[name], r1[name], rtol=0, atol=0, msg=f"ranks differ at {name}")
        torch.testing.assert_close(r0[name], p.detach(), rtol=1e-5, atol=1e-6, msg=f"DDP vs reference: {name}")
        moved += float((r0[name] - init[name]).abs().sum())
    assert moved > 0
    history = json.loads((tmp_path / "logs.json").read_text())
    # eval: the plain CE of the trained model over all 8 samples, as one process computes it (the
    # token count is summed over the ranks, so each rank's loss is scaled back by the world size)
    (eval_loss,) = [h["eval_loss"] for h in history if "eval_loss" in h]
    trained, _ = tiny_llava(seed=0)
    trained.load_state_dict(r0, strict=False)
    with torch.no_grad():
        expected, _ = clean_loss(trained.eval(), batch)
    assert eval_loss == pytest.approx(float(expected), rel=1e-5)
    logs = [h for h in history if "loss" in h]
    assert len(logs) == 2
    for log in logs:
        assert all(math.isfinite(log[k]) for k in PART_NAMES)
        assert log["loss"] == pytest.approx(sum(log[k] for k in PART_NAMES), rel=1e-4)
