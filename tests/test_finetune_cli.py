"""`modkern train --model DIR --data FILE` and `modkern diagnose --model DIR --data FILE` on tiny checkpoints
saved with their locally built processors: train -> checkpoint -> diagnose round trip, the before /
after comparison, resuming, bad data lines, option mistakes, and the same run in 2 processes (torchrun, gloo)."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
from tiny_models import free_port, write_data

from modkern.apps.cli import main
from modkern.apps.tiny_processors import save_tiny_checkpoint


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), n_per_kind=2)  # 6 samples, PNG and JPEG images


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_checkpoint("llava", tmp_path_factory.mktemp("llava") / "ckpt")


@pytest.fixture(scope="module")
def trained(llava_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    args = ["train", "--model", llava_dir, "--data", data_file, "--out", str(out), "--max-steps", "3"]
    code = main([*args, "--eval", data_file, "--no-progress"])
    assert code == 0
    return str(out)


def test_train_writes_a_loadable_checkpoint(trained):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    summary = json.load(open(os.path.join(trained, "finetune.json")))
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    assert summary["mix"] == {"image_heavy": 2, "text_heavy": 2, "vqa": 2}  # 6 samples: the data's own mix
    parts = [h for h in summary["log_history"] if "ce_adv" in h]
    assert len(parts) == 3 and all(h["consistency"] > 0 for h in parts)  # copies compared with their clean samples
    assert all("attack_grad_norm" in h for h in parts)
    evals = [h["eval_loss"] for h in summary["log_history"] if "eval_loss" in h]
    assert len(evals) == 3 and all(math.isfinite(e) for e in evals)  # --eval: clean CE after each epoch
    model = LlavaForConditionalGeneration.from_pretrained(trained)
    processor = AutoProcessor.from_pretrained(trained)
    assert type(processor).__name__ == "LlavaProcessor" and processor.chat_template
    assert model.config.image_token_id == processor.tokenizer.image_token_id


def test_diagnose_the_trained_checkpoint(trained, data_file, tmp_path, capsys):
    out = tmp_path / "diag"
    assert main(["diagnose", "--model", trained, "--data", data_file, "--out", str(out), "--no-progress"]) == 0
    report = json.load(open(out / "diagnosis.json"))
    assert (out / "diagnosis.png").stat().st_size > 0
    assert report["items"] == {"image_heavy": 2, "text_heavy": 2, "vqa": 2}
    assert list(report["conditions"]) == [
        "misleading_sentence",
        "unrelated_paragraph",
        "swap_image",
        "black_image",
        "white_image",
        "noise_image",
    ]
    for c in report["conditions"].values():
        assert c["items"] == 2 and 0 <= c["flip_rate"] <= 1 and math.isfinite(c["js"]["mean"])
    assert report["attention"]["modalities"] == ["text", "image"]
    assert "misleading_sentence" in capsys.readouterr().out


def test_compare_two_checkpoints(llava_dir, trained, data_file, tmp_path):
    out = tmp_path / "cmp"
    args = ["diagnose", "--model", llava_dir, "--compare", trained, "--data", data_file, "--out", str(out)]
    assert main([*args, "--no-progress", "--no-attention"]) == 0
    comp = json.load(open(out / "comparison.json"))
    assert (out / "comparison.png").stat().st_size > 0 and (out / "after" / "diagnosis.json").exists()
    assert comp["before"] == llava_dir and comp["after"] == trained
    before = json.load(open(out / "diagnosis.json"))
    after = json.load(open(out / "after" / "diagnosis.json"))
    for name, row in comp["conditions"].items():
        assert row["flip_rate"]["before"] == before["conditions"][name]["flip_rate"]
        assert row["flip_rate"]["change"] == pytest.approx(
            after["conditions"][name]["flip_rate"] - before["conditions"][name]["flip_rate"]
        )


def test_resume_from_the_last_checkpoint(llava_dir, data_file, tmp_path):
    out = str(tmp_path / "out")
    base = ["train", "--model", llava_dir, "--data", data_file, "--out", out, "--save-steps", "1", "--no-progress"]
    assert main([*base, "--max-steps", "1"]) == 0
    assert main([*base, "--max-steps", "2", "--resume", "last"]) == 0
    summary = json.load(open(os.path.join(out, "finetune.json")))
    assert summary["steps"] == 2
    assert [h["step"] for h in summary["log_history"] if "loss" in h] == [1, 2]  # step 1 from the first run


def test_llava_next_round_trip(data_file, tmp_path):
    ckpt = save_tiny_checkpoint("llava_next", tmp_path / "next")
    out = tmp_path / "out"
    assert (
        main(["train", "--model", ckpt, "--data", data_file, "--out", str(out), "--max-steps", "1", "--no-progress"])
        == 0
    )
    assert (
        main(["diagnose", "--model", str(out), "--data", data_file, "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    )
    assert json.load(open(tmp_path / "d" / "diagnosis.json"))["family"] == "llava"


def test_bad_line_is_named_and_skip_bad_goes_on(llava_dir, data_file, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = open(data_file).read().splitlines()
    bad.write_text("\n".join([*lines[:2], "{not json", *lines[2:]]) + "\n")
    # images are relative to the data file: link them next to the copy
    os.symlink(os.path.join(os.path.dirname(data_file), "img"), tmp_path / "img")
    args = ["train", "--model", llava_dir, "--data", str(bad), "--out", str(tmp_path / "o"), "--max-steps", "1"]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}:3: not a JSON object" in err
    assert main([*args, "--no-progress", "--skip-bad"]) == 0
    assert "skipped 1 bad sample(s): line 3" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--quick"], "--quick is a demo option"),
        (["--mix", "1:1:1", "--batch-size", "8"], "batches of 3 samples but --batch-size is 8"),
        (["--mix", "2:2"], "--mix"),
        (["--lam", "-1"], "robust objective: lam"),
    ],
)
def test_option_mistakes_are_one_line(llava_dir, data_file, tmp_path, capsys, extra, message):
    code = main(["train", "--model", llava_dir, "--data", data_file, "--out", str(tmp_path), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and err.count("\n") == 0


def test_finetune_options_need_data(capsys):
    assert main(["train", "--max-steps", "3"]) == 2
    assert "--max-steps need --data FILE" in capsys.readouterr().err
    assert main(["train", "--data", "x.jsonl"]) == 2
    assert "--data needs --model DIR" in capsys.readouterr().err


def test_two_processes(llava_dir, data_file, tmp_path):
    """The same command under torchrun: 2 CPU processes (DDP on gloo), one checkpoint written."""
    out = tmp_path / "ddp"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["-m", "modkern.apps.cli", "train", "--model", llava_dir, "--data", data_file, "--out", str(out)]
    cmd += ["--max-steps", "2", "--device", "cpu", "--no-progress"]
    # its own process group: a hang is killed with the workers, not left behind
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    run = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.load(open(out / "finetune.json"))
    assert summary["world_size"] == 2 and summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    assert run.stdout.count("robust fine-tuning of") == 1  # rank 0 speaks
