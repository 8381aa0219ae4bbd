"""TRL's SFTTrainer with the robust objective: it trains, and TRL's own metrics (``entropy``,
``mean_token_accuracy``, ``num_tokens``), which its replaced compute_loss used to log, are logged
next to modkern's parts, with TRL's definitions (checked against the clean logits by hand)."""

import math

import pytest
import torch
from tiny_models import collate_rows, make_batch, rows_dataset

from modkern.apps.tiny_models import tiny_llama
from modkern.integrations.hf import make_robust_trainer, patch_trainer
from modkern.objective.robust import RobustConfig, robust_loss, shift_labels

trl = pytest.importorskip("trl")  # a test dependency (setup.py extras "test")
datasets = pytest.importorskip("datasets")

TRL_METRICS = ("entropy", "mean_token_accuracy", "num_tokens")
PARTS = ("ce_clean", "ce_adv", "consistency")


def _tokenizer(vocab_size):
    """A word-level tokenizer built in memory (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", bos_token="w1", eos_token="w2")


def _setup(tmp_path, steps=2, batch_size=8):
    """An SFTTrainer setup; one batch holds the whole dataset (its order does not change the metrics)."""
    model, info = tiny_llama(seed=0)
    rows = rows_dataset(make_batch(info, 8, seed=1))
    dataset = datasets.Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])

    def collate(items):
        return collate_rows([{k: torch.tensor(v) for k, v in it.items()} for it in items])

    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        logging_steps=1,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        seed=0,
    )
    kwargs = dict(model=model, args=args, train_dataset=dataset, processing_class=_tokenizer(128))
    return model, rows, dict(kwargs, data_collator=collate)


def _expected_metrics(model, rows, config):
    """TRL's definitions on the whole dataset's batch, from the clean logits of the answer rows."""
    batch = collate_rows(rows)
    out = robust_loss(model, batch, config, return_logits=True)
    targets = shift_labels(batch["labels"])
    targets = targets[targets != -100]
    probs = torch.softmax(out.logits.detach().float(), -1)
    entropy = float(torch.special.entr(probs).sum(-1).mean())
    accuracy = float((out.logits.argmax(-1) == targets).float().mean())
    return entropy, accuracy, int(batch["attention_mask"].sum())


def test_sft_trainer_logs_trl_metrics_next_to_the_parts(tmp_path):
    config = RobustConfig(lam=0.1)
    model, rows, kwargs = _setup(tmp_path)
    expected = _expected_metrics(model, rows, config)
    trainer = make_robust_trainer(trl.SFTTrainer, config)(**kwargs)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for log in logs:
        assert all(name in log and math.isfinite(log[name]) for name in (*PARTS, *TRL_METRICS))
        assert log["loss"] == pytest.approx(sum(log[name] for name in PARTS), rel=1e-4)
        assert 0.0 <= log["mean_token_accuracy"] <= 1.0 and log["entropy"] > 0
    # the first step's metrics are TRL's definitions on the clean logits; tokens accumulate
    entropy, accuracy, tokens = expected
    assert logs[0]["entropy"] == pytest.approx(entropy, rel=1e-5)
    assert logs[0]["mean_token_accuracy"] == pytest.approx(accuracy)
    assert logs[0]["num_tokens"] == tokens
    assert logs[1]["num_tokens"] > logs[0]["num_tokens"]


def test_patched_sft_trainer_and_the_chunked_head(tmp_path):
    # patch_trainer on an SFTTrainer instance; the chunked head computes the same metrics
    config = RobustConfig(lam=0.1, lm_head="chunked", chunk_size=3)
    model, rows, kwargs = _setup(tmp_path, steps=1)
    entropy, accuracy, _ = _expected_metrics(model, rows, config.replace(lm_head="rows"))
    trainer = patch_trainer(trl.SFTTrainer(**kwargs), config)
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert log["entropy"] == pytest.approx(entropy, rel=1e-5)
    assert log["mean_token_accuracy"] == pytest.approx(accuracy)
