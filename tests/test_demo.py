"""The main job (`modkern train`) end to end in --quick mode, and the CLI around it."""

import json
import math
import re
from pathlib import Path

import pytest

from modkern import cli, demo
from modkern.data import MISLEADING_NOTE


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["train", "--quick", "--out", str(out), "--no-progress", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    # the table: a header with every evaluation column, one row per method, the chance level
    assert "| method | image-heavy: no interference | image-heavy: misleading text |" in printed
    for _, label in demo.METHODS:
        assert f"| {label} |" in printed
    assert "| chance (a random colour) | 25.0 | 25.0 |" in printed
    # the per-method lines use the table's method and column names
    for _, label in demo.METHODS:
        line = next(line for line in printed.splitlines() if line.startswith(f"{label}: "))
        for _, title in demo.EVAL_COLUMNS:
            assert f" {title} " in line, (title, line)
    results = json.loads((out / "results.json").read_text())
    assert results["chance"] == 0.25
    assert set(results["results"]) == {"sft", "sft_aug", "modkern"}
    for res in results["results"].values():
        assert set(res["accuracy"]) == {key for key, _ in demo.EVAL_COLUMNS}
        assert all(0.0 <= a <= 1.0 for a in res["accuracy"].values())
        assert res["history"] and res["train_seconds"] > 0
    # (c) really ran the adversarial branch and the consistency term; (a) did not
    assert results["results"]["modkern"]["final_loss"]["ce_adv"] > 0
    assert results["results"]["sft"]["final_loss"]["ce_adv"] == 0
    assert results["config"]["quick"] and results["config"]["seed"] == 1
    # the diagnosis (modkern.diagnose): flip rate and JS per method and interference, held-out included
    conditions = [cond for cond, _, _ in demo.DIAGNOSIS_COLUMNS]
    assert demo.HELD_OUT in conditions and "mislead_text" in conditions and "swap_image" in conditions
    assert results["held_out"]["condition"] == demo.HELD_OUT
    assert results["held_out"]["template"] == MISLEADING_NOTE
    for res in results["results"].values():
        diag = res["diagnosis"]
        assert list(diag) == conditions
        for cond, d in diag.items():
            assert 0.0 <= d["flip_rate"] <= 1.0 and 0.0 <= d["js"] <= math.log(2) + 1e-6, (cond, d)
            assert d["items"] == 16  # the demo's clean evaluation items of the condition's kind (--quick)
            assert d["held_out"] == (cond == demo.HELD_OUT)
        assert not diag[demo.HELD_OUT]["in_augmentation"]
        # the same clean items as the accuracy table's interference-free columns
        assert abs(diag["mislead_text"]["clean_accuracy"] - res["accuracy"]["clean"]) <= 1 / 16
        assert abs(diag["swap_image"]["clean_accuracy"] - res["accuracy"]["text_clean"]) <= 1 / 16
    assert results["diagnosis_tables"] in printed
    for title in ("Flip rate (%)", "JS (10^-3 nats)"):
        assert title in printed
    for _, label in demo.METHODS:
        assert sum(line.startswith(f"| {label} |") for line in printed.splitlines()) == 3  # 3 tables
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert (out / "checkpoints" / "modkern" / demo.TOKENIZER_FILE).exists()

    # --model: a local checkpoint (the one just written) instead of the random tiny LLaVA
    out2 = tmp_path / "again"
    ckpt = out / "checkpoints" / "modkern"
    argv = ["train", "--quick", "--model", str(ckpt), "--out", str(out2), "--no-progress", "--steps", "2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert str(ckpt) in printed
    again = json.loads((out2 / "results.json").read_text())
    assert again["config"]["model"] == str(ckpt) and again["config"]["steps"] == 2


def test_train_without_options_runs_the_default_demo(monkeypatch):
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda cfg: seen.setdefault("cfg", cfg))
    assert cli.main(["train"]) == 0
    cfg = seen["cfg"]
    assert cfg == demo.DemoConfig()  # the documented defaults, no reduced mode
    assert cfg.out == "runs/demo" and cfg.model is None and not cfg.quick and cfg.steps >= 100


def test_bad_options(capsys):
    assert cli.main(["train", "--steps", "0"]) == 2
    assert "--steps: must be an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="methods"):
        demo.DemoConfig(methods=("sft", "magic"))


def test_selfcheck_torch_backend(capsys):
    assert cli.main(["selfcheck", "--backend", "torch", "--repeat", "1"]) == 0
    printed = capsys.readouterr().out
    for op in ("fused_js", "fused_kl", "masked_adv_step", "perturb", "modality_mask", "init_delta"):
        assert op in printed
    assert "MISMATCH" not in printed and "ERROR" not in printed


def test_columns_say_which_are_interference_free():
    titles = dict(demo.EVAL_COLUMNS)
    assert [titles[k] for k in demo.INTERFERENCE_FREE] == [
        "image-heavy: no interference",
        "text-heavy: no interference",
    ]
    assert all(t.startswith(("image-heavy: ", "text-heavy: ")) for t in titles.values())


def test_readme_demo_table_has_the_demo_headers():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    header = demo.format_table({}).splitlines()[0]
    assert header in readme
    table = readme[readme.index(header) :].split("\n\n")[0].splitlines()
    for _, label in demo.METHODS:
        assert any(row.startswith(f"| {label} |") for row in table), label
    assert any(re.match(r"\| chance \(a random colour\) \| 25\.0 \|", row) for row in table)


def test_diagnosis_columns_are_diagnose_conditions():
    from modkern.diagnose import CONDITIONS

    for cond, title, _ in demo.DIAGNOSIS_COLUMNS:
        assert cond in CONDITIONS, cond
        assert title.startswith("image-heavy: " if "image_heavy" in CONDITIONS[cond].kinds else "text-heavy: ")
    assert [c for c, _, seen in demo.DIAGNOSIS_COLUMNS if not seen] == ["long_irrelevant_context", demo.HELD_OUT]
    assert "mislead" in demo.HELD_OUT and "held out" in dict(demo.EVAL_COLUMNS)["misleading_note"]
    # the held-out diagnosis condition uses the held-out template of the accuracy column
    assert "held out" in CONDITIONS[demo.HELD_OUT].description


def test_readme_demo_has_the_diagnosis_tables():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    header = demo.format_diagnosis_tables({}).splitlines()[1]
    assert readme.count(header) == 2  # flip rate and JS
    for _, label in demo.METHODS:
        assert readme.count(f"| {label} |") >= 3, label


def test_plot_has_value_labels_and_chance_line(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k)))
    acc = {key: 0.5 + 0.05 * i for i, (key, _) in enumerate(demo.EVAL_COLUMNS)}
    results = {m: {"accuracy": acc, "train_seconds": 1.0} for m, _ in demo.METHODS}
    demo.plot_results(results, str(tmp_path / "r.png"), chance=0.25)
    (ax,) = figures[0].axes
    labels = [t.get_text() for t in ax.texts]
    assert len(labels) == len(demo.METHODS) * len(demo.EVAL_COLUMNS)
    assert labels[: len(demo.EVAL_COLUMNS)] == [f"{100 * v:.0f}" for v in acc.values()]
    assert any("chance (25%)" in t.get_text() for t in ax.get_legend().get_texts())
