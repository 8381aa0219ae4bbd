"""The main job (`modkern train`) end to end in --quick mode, and the CLI around it."""

import json
import math
import re
from pathlib import Path

import pytest

from modkern.apps import cli, demo
from modkern.apps.synthetic_task import MISLEADING_NOTE


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["train", "--quick", "--out", str(out), "--no-progress", "--seeds", "1,2"]) == 0
    printed = capsys.readouterr().out
    # the table: a header with every evaluation column, one row per method, the chance level
    assert "| method | image-heavy: no interference | image-heavy: misleading text |" in printed
    for _, label in demo.METHODS:
        assert f"| {label} |" in printed
    assert "| chance (a random colour) | 25.0 | 25.0 |" in printed
    assert "mean ± sd over 2 seeds" in printed
    # one line per run, with the table's method and column names
    for seed in (1, 2):
        for _, label in demo.METHODS:
            line = next(line for line in printed.splitlines() if line.startswith(f"seed {seed} {label}: "))
            for _, title in demo.EVAL_COLUMNS:
                assert f" {title} " in line, (title, line)
    results = json.loads((out / "results.json").read_text())
    assert results["chance"] == 0.25
    assert set(results["runs"]) == {"1", "2"}
    methods = {m for m, _ in demo.METHODS}
    assert set(results["summary"]) == methods
    for runs in results["runs"].values():
        assert set(runs) == methods
        for res in runs.values():
            assert set(res["accuracy"]) == {key for key, _ in demo.EVAL_COLUMNS}
            assert all(0.0 <= a <= 1.0 for a in res["accuracy"].values())
            assert res["history"] and res["train_seconds"] > 0
        # (c) and (e) ran the adversarial branch; (c) and (d) the consistency term; (a) neither
        final = {m: runs[m]["final_loss"] for m in methods}
        assert final["modkern"]["ce_adv"] > 0 and final["modkern"]["consistency"] > 0
        assert final["attack_only"]["ce_adv"] > 0 and final["attack_only"]["consistency"] == 0
        assert final["consistency_only"]["ce_adv"] == 0 and final["consistency_only"]["consistency"] > 0
        assert final["sft"]["ce_adv"] == 0
        # the attack's telemetry is logged where the attack runs
        assert 0 < final["modkern"]["attack_step_over_eps"] and 0 <= final["modkern"]["delta_at_bound"] <= 1
        assert "attack_grad_norm" not in final["sft"]
    # mean ± sd over the seeds, from the runs
    for method, summ in results["summary"].items():
        values = [results["runs"][s][method]["accuracy"]["clean"] for s in ("1", "2")]
        stat = summ["accuracy"]["clean"]
        assert stat["values"] == values and stat["mean"] == pytest.approx(sum(values) / 2)
        assert stat["sd"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    assert results["config"]["quick"] and results["config"]["seeds"] == [1, 2]
    # the diagnosis (modkern.apps.diagnose): flip rate and JS per method and interference, held-out included
    conditions = [cond for cond, _, _ in demo.DIAGNOSIS_COLUMNS]
    assert set(demo.HELD_OUT) <= set(conditions) and "mislead_text" in conditions and "swap_image" in conditions
    assert results["held_out"]["conditions"] == list(demo.HELD_OUT)
    assert results["held_out"]["templates"]["mislead_note"] == MISLEADING_NOTE
    for runs in results["runs"].values():
        for res in runs.values():
            diag = res["diagnosis"]
            assert list(diag) == conditions
            for cond, d in diag.items():
                assert 0.0 <= d["flip_rate"] <= 1.0 and 0.0 <= d["js"] <= math.log(2) + 1e-6, (cond, d)
                assert d["items"] == 16  # the demo's clean evaluation items of the condition's kind (--quick)
                assert d["held_out"] == (cond in demo.HELD_OUT)
                assert d["in_augmentation"] == (cond not in demo.HELD_OUT)
            # the same clean items as the accuracy table's interference-free columns
            assert abs(diag["mislead_text"]["clean_accuracy"] - res["accuracy"]["clean"]) <= 1 / 16
            assert abs(diag["swap_image"]["clean_accuracy"] - res["accuracy"]["text_clean"]) <= 1 / 16
    assert results["diagnosis_tables"] in printed
    for title in ("Flip rate (%", "JS (10^-3 nats"):
        assert title in printed
    for _, label in demo.METHODS:
        assert sum(line.startswith(f"| {label} |") for line in printed.splitlines()) == 3  # 3 tables
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert (out / "checkpoints" / "modkern" / demo.TOKENIZER_FILE).exists()

    # --model: a local checkpoint (the one just written) instead of the random tiny LLaVA
    out2 = tmp_path / "again"
    ckpt = out / "checkpoints" / "modkern"
    argv = [
        "train",
        "--quick",
        "--model",
        str(ckpt),
        "--out",
        str(out2),
        "--no-progress",
        "--steps",
        "2",
        "--seed",
        "3",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert str(ckpt) in printed
    again = json.loads((out2 / "results.json").read_text())
    assert again["config"]["model"] == str(ckpt) and again["config"]["steps"] == 2
    assert again["config"]["seeds"] == [3]


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
    assert cli.main(["train", "--seeds", "1,1"]) == 2
    assert "--seeds: must be one or more distinct integers" in capsys.readouterr().err
    assert cli.main(["train", "--seeds", "0,x"]) == 2
    assert "--seeds: must be comma-separated integers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="seeds"):
        demo.DemoConfig(seeds=())
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
    from modkern.apps.diagnose import CONDITIONS

    for cond, title, _ in demo.DIAGNOSIS_COLUMNS:
        assert cond in CONDITIONS, cond
        assert title.startswith("image-heavy: " if "image_heavy" in CONDITIONS[cond].kinds else "text-heavy: ")
    assert [c for c, _, seen in demo.DIAGNOSIS_COLUMNS if not seen] == list(demo.HELD_OUT)
    assert "held out" in dict(demo.EVAL_COLUMNS)["misleading_note"]
    for cond in demo.HELD_OUT:  # the held-out conditions say so, and the column titles too
        assert "held out" in CONDITIONS[cond].description
        assert "held out" in dict((c, t) for c, t, _ in demo.DIAGNOSIS_COLUMNS)[cond]


def test_readme_demo_has_the_diagnosis_tables():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    header = demo.format_diagnosis_tables({}).splitlines()[1]
    assert readme.count(header) == 2  # flip rate and JS
    for _, label in demo.METHODS:
        assert readme.count(f"| {label} |") >= 3, label


def _fake_summary():
    def stat(v):
        return {"mean": v, "sd": 0.1 * v, "values": [v]}

    acc = {key: stat(0.5 + 0.05 * i) for i, (key, _) in enumerate(demo.EVAL_COLUMNS)}
    diag = {
        c: {q: stat(0.2 + 0.01 * i) for q in ("flip_rate", "js", "accuracy")}
        for i, (c, _, _) in enumerate(demo.DIAGNOSIS_COLUMNS)
    }
    return {m: {"accuracy": acc, "diagnosis": diag, "train_seconds": stat(1.0)} for m, _ in demo.METHODS}


def test_plot_shows_flip_rates_with_error_bars_and_the_held_out_columns(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k)))
    summary = _fake_summary()
    demo.plot_results(summary, str(tmp_path / "r.png"), chance=0.25)
    flips, accuracy = figures[0].axes
    assert "flip rate" in flips.get_ylabel() and "accuracy" in accuracy.get_ylabel()
    # one bar per method and interference, with an error bar each; the held-out ones hatched
    bars = [p for p in flips.patches]
    assert len(bars) == len(demo.METHODS) * len(demo.DIAGNOSIS_COLUMNS)
    assert len(flips.containers) == 2 * len(demo.METHODS)  # bar + error-bar containers
    held = [i for i, (c, _, _) in enumerate(demo.DIAGNOSIS_COLUMNS) if c in demo.HELD_OUT]
    hatched = [i % len(demo.DIAGNOSIS_COLUMNS) for i, p in enumerate(bars) if p.get_hatch()]
    assert sorted(set(hatched)) == held
    assert any("chance (25%)" in t.get_text() for t in accuracy.get_legend().get_texts())


def test_tables_give_mean_and_sd():
    summary = _fake_summary()
    table = demo.format_table(summary, 0.25)
    assert "| 50.0 ± 5.0 |" in table
    diag = demo.format_diagnosis_tables(summary)
    assert "| 20.0 ± 2.0 |" in diag and "mean ± sd over seeds" in diag
