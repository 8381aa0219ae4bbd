"""The thin training loop (modkern.apps.train_loop) on a tiny LLaVA, a few steps at a time."""

import math

import pytest
import torch

from modkern.apps.synthetic_task import InterferenceTask, TaskConfig, TaskEncoder
from modkern.apps.tiny_models import tiny_llava
from modkern.apps.train_loop import (
    TrainConfig,
    answer_correct,
    count_answer_tokens,
    load_checkpoint,
    lr_lambda,
    save_checkpoint,
    train,
)
from modkern.objective.augment import HeuristicAugmenter, RobustCollator
from modkern.objective.robust import RobustConfig, find_language_model

TASK = InterferenceTask(TaskConfig(train_size=64, eval_size=8, image_size=8))


def _setup(augment=False, seed=0):
    tok = TASK.tokenizer()
    model, info = tiny_llava(len(tok), image_size=8, seed=seed)
    enc = TaskEncoder(tok.encode, info["image_token_id"], info["num_image_tokens"], tok.bos_token_id)
    aug = HeuristicAugmenter(TASK.augment_config(), seed=seed) if augment else None
    return model, RobustCollator(enc, aug, tok.pad_token_id)


def _batches(collate, n, size=8):
    data = TASK.train_set()
    return [collate(data[i * size : (i + 1) * size]) for i in range(n)]


def test_robust_training_runs_and_learns(tmp_path):
    model, collate = _setup(augment=True)
    batches = _batches(collate, 2)
    cfg = TrainConfig(steps=6, lr=5e-3, warmup_steps=1, eval_every=3, save_dir=str(tmp_path / "ckpt"), progress=False)
    robust = RobustConfig(epsilon=1e-2, alpha=1e-2, step="sign", steps=1, lam=0.1)
    seen = []

    def eval_fn(m):
        assert not m.training and not torch.is_grad_enabled()
        seen.append(True)
        return {"accuracy": float(answer_correct(m, batches[0]).float().mean())}

    result = train(model, batches, cfg, robust=robust, eval_fn=eval_fn, extra_state={"note": "test"})
    assert model.training
    hist = result.history
    assert [h["step"] for h in hist] == list(range(1, 7))
    for h in hist:
        assert all(math.isfinite(h[k]) for k in ("loss", "ce_clean", "ce_adv", "consistency", "lr"))
        assert h["loss"] == pytest.approx(h["ce_clean"] + h["ce_adv"] + h["consistency"], rel=1e-5)
    assert hist[0]["ce_adv"] > 0 and any(h["consistency"] > 0 for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]  # 3 passes over 2 fixed batches
    assert [e["step"] for e in result.evals] == [3, 6] and len(seen) == 2
    assert not find_language_model(model)._forward_pre_hooks  # the injector's hook is gone

    # the checkpoint holds the trained weights and the configs
    loaded = load_checkpoint(result.checkpoint)
    trained = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, trained[k]), k
    loaded.eval()
    model.eval()
    inputs = {k: batches[0][k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    import json

    state = json.loads((tmp_path / "ckpt" / "modkern_train.json").read_text())
    assert state["step"] == 6 and state["robust_config"]["epsilon"] == 1e-2
    assert state["train_config"]["steps"] == 6 and state["extra"] == {"note": "test"}


def test_plain_module_checkpoint(tmp_path):
    net = torch.nn.Linear(3, 2)
    save_checkpoint(net, tmp_path, step=1)
    other = torch.nn.Linear(3, 2)
    load_checkpoint(tmp_path, other)
    assert torch.equal(other.weight, net.weight) and torch.equal(other.bias, net.bias)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing")


@pytest.mark.parametrize("robust", [None, RobustConfig(init="zero", steps=1, step="sign", epsilon=1e-2, lam=0.5)])
def test_grad_accumulation_is_exact(robust):
    # one step over a batch of 8 == one step over 2 micro-batches of 4 (SGD, so the update is the
    # gradient itself: any normalization error would show up)
    model_a, collate = _setup()
    model_b, _ = _setup()
    data = TASK.train_set()[:8]
    whole = [collate(data)]
    halves = [collate(data[:4]), collate(data[4:])]
    cfg = dict(steps=1, lr=0.5, optimizer="sgd", warmup_steps=0, schedule="constant", max_grad_norm=None)
    cfg.update(progress=False)
    train(model_a, whole, TrainConfig(**cfg), robust=robust)
    train(model_b, halves, TrainConfig(grad_accum=2, **cfg), robust=robust)
    start, _ = _setup()
    moved = 0.0
    for (k, a), b, s in zip(model_a.state_dict().items(), model_b.state_dict().values(), start.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)
        moved = max(moved, float((a - s).abs().max()))
    assert moved > 1e-3


def test_schedule_and_config():
    f = lr_lambda(TrainConfig(steps=10, warmup_steps=2, schedule="cosine"))
    assert f(0) < f(1) < f(2) == pytest.approx(1.0)
    assert f(9) < 0.05 and all(f(s) >= 0 for s in range(12))
    g = lr_lambda(TrainConfig(steps=10, warmup_steps=0, schedule="linear", min_lr_ratio=0.1))
    assert g(0) == 1.0 and g(10) == pytest.approx(0.1)
    assert lr_lambda(TrainConfig(steps=10, warmup_steps=0, schedule="constant"))(7) == 1.0
    for bad in (dict(steps=0), dict(schedule="step"), dict(optimizer="lion"), dict(mixed_precision="fp8")):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_count_answer_tokens_and_nan_guard():
    model, collate = _setup()
    batch = _batches(collate, 1)[0]
    assert count_answer_tokens(batch) == 8  # one answer token per sample
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss"):
        train(model, [batch], TrainConfig(steps=1, progress=False))


def test_failing_eval_leaves_the_model_in_train_mode():
    model, collate = _setup()

    def broken_eval(m):
        raise RuntimeError("eval broke")

    with pytest.raises(RuntimeError, match="eval broke"):
        train(model, _batches(collate, 1), TrainConfig(steps=1, progress=False), eval_fn=broken_eval)
    assert model.training


def test_precision_resolution():
    from modkern.apps.train_loop import resolved_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolved_precision(TrainConfig(), cpu) == "no"
    assert resolved_precision(TrainConfig(), cuda) == "bf16"
    assert resolved_precision(TrainConfig(mixed_precision="fp16"), cpu) == "fp16"
    # bf16 autocast on CPU is honoured when asked for explicitly
    model, collate = _setup()
    result = train(model, _batches(collate, 1), TrainConfig(steps=1, progress=False, mixed_precision="bf16"))
    assert math.isfinite(result.history[-1]["loss"])


def test_progress_in_a_file_is_plain_lines(capsys):
    # stderr is not a terminal here (as in a log file or a pipe): periodic lines, no redrawn bar
    model, collate = _setup()
    batches = _batches(collate, 1)
    train(model, batches, TrainConfig(steps=20, warmup_steps=1, progress=True), desc="(a) SFT")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("(a) SFT: ")]
    assert [line.split()[2] for line in lines] == [f"{s}/20" for s in range(2, 21, 2)]
    assert all(" steps (" in line and ", loss " in line and line.endswith(" s") for line in lines)


def test_progress_on_a_terminal_is_a_bar():
    import io

    from modkern.apps.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    bar = Progress(5, "run", stream=tty)
    for _ in range(1, 6):
        bar.update(1, loss=1.0)
    bar.close()
    assert "\r" in tty.getvalue() and " steps (" not in tty.getvalue()  # a bar, no plain lines
    quiet = io.StringIO()
    off = Progress(5, "run", enabled=False, stream=quiet)
    off.update(5, loss=1.0)
    assert quiet.getvalue() == ""
