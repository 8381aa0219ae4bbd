"""modkern.apps.diagnose / `modkern diagnose`: every number against a hand computation on a fixed tiny
model, skipped conditions with reasons, errors, the CLI and its files."""

from __future__ import annotations

import json
import math
import os
import statistics

import pytest
import torch

from modkern.apps.diagnose import (
    CONDITIONS,
    Collator,
    DiagnoseError,
    Item,
    ModelSpec,
    cohens_d,
    diagnose,
    format_table,
    image_task_items,
    plot_report,
    task_words,
)
from modkern.apps.diagnose.conditions import BUILTIN_CONDITIONS
from modkern.apps.diagnose.metrics import MIN_POOLED_SD
from modkern.apps.synthetic_task import WordTokenizer
from modkern.apps.tiny_models import tiny_llava
from modkern.apps.train_loop import save_checkpoint

TOK = WordTokenizer(task_words())


@pytest.fixture(scope="module")
def llava():
    model, _ = tiny_llava(len(TOK), num_layers=2, seed=3)
    model.eval()
    return model


def _answer_view(model, item):
    """Unbatched, by hand: the answer-position probabilities [A, V] (float64) and answer ids [A]."""
    col = Collator(ModelSpec.from_model(model), TOK)
    batch = col([item])
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], output_attentions=True, use_cache=False
        )
    model.set_attn_implementation("sdpa")
    labels = batch["labels"][0]
    pos = [t for t in range(labels.shape[0]) if labels[t] != -100]  # answer tokens
    probs = torch.softmax(out.logits[0].double(), -1)[[t - 1 for t in pos]]
    return probs, labels[pos], out.attentions, batch["input_ids"][0], [t - 1 for t in pos]


def _js(p, q):
    m = 0.5 * (p + q)
    kl = lambda a, b: float((a * (a / b).log()).sum())
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_every_number_against_a_hand_computation(llava):
    items = image_task_items(3)  # 3 image-heavy + 3 text-heavy
    report = diagnose(
        llava,
        tokenizer=TOK,
        items=items,
        conditions=["black_image", "white_image"],
        batch_size=4,  # padded batches of mixed lengths
        progress=False,
        log=None,
    )
    text_items = [it for it in items if it.kind == "text_heavy"]
    for name, value in (("black_image", 0.0), ("white_image", 1.0)):
        flips, effects, jss, correct, clean_correct = [], [], [], [], []
        for it in text_items:
            pc, target, *_ = _answer_view(llava, it)
            pp, _, *_ = _answer_view(llava, Item(**{**it.__dict__, "image": torch.full_like(it.image, value)}))
            rows = range(len(target))
            clean_correct.append(all(int(pc[r].argmax()) == int(target[r]) for r in rows))
            correct.append(all(int(pp[r].argmax()) == int(target[r]) for r in rows))
            flips.append(any(int(pc[r].argmax()) != int(pp[r].argmax()) for r in rows))
            p_clean = math.prod(float(pc[r, target[r]]) for r in rows)
            p_pert = math.prod(float(pp[r, target[r]]) for r in rows)
            effects.append(p_clean - p_pert)
            jss.append(statistics.mean(_js(pc[r], pp[r]) for r in rows))
        got = report["conditions"][name]
        assert got["items"] == 3 and got["applies_to"] == ["text_heavy"]
        assert got["accuracy"] == pytest.approx(statistics.mean(correct))
        assert got["clean_accuracy"] == pytest.approx(statistics.mean(clean_correct))
        assert got["flip_rate"] == pytest.approx(statistics.mean(flips))
        assert got["causal_effect"]["mean"] == pytest.approx(statistics.mean(effects), abs=1e-6)
        assert got["causal_effect"]["std"] == pytest.approx(statistics.stdev(effects), abs=1e-6)
        assert got["js"]["mean"] == pytest.approx(statistics.mean(jss), rel=1e-3, abs=1e-9)
        assert got["js"]["std"] == pytest.approx(statistics.stdev(jss), rel=1e-2, abs=1e-9)
        assert got["js"]["mean"] > 0

    # attention share: answer positions -> text / image tokens, per layer, mean over heads and positions
    att = report["attention"]
    assert att["modalities"] == ["text", "image"] and att["layers"] == 2
    per_item = []
    for it in items:
        _, _, attentions, ids, queries = _answer_view(llava, it)
        img = [k for k in range(ids.shape[0]) if int(ids[k]) == llava.config.image_token_id]
        txt = [k for k in range(ids.shape[0]) if k not in img]
        layers = []
        for a in attentions:
            a = a[0].double().mean(0)  # [L, L], mean over heads
            layers.append([statistics.mean(float(a[q, keys].sum()) for q in queries) for keys in (txt, img)])
        per_item.append(layers)
    shares = torch.tensor(per_item)  # [items, layers, 2]
    torch.testing.assert_close(torch.tensor(att["share"]), shares.mean(0).float(), atol=1e-5, rtol=1e-4)
    assert torch.allclose(shares.sum(-1), torch.ones(shares.shape[:2], dtype=shares.dtype), atol=1e-5)
    img_f, txt_f = shares[:3], shares[3:]
    torch.testing.assert_close(torch.tensor(att["share_by_prompt_type"]["image-focused"]), img_f.mean(0).float())
    d = att["cohens_d"]["image-focused vs text-focused"]
    for layer in range(2):
        for m in range(2):
            a, b = img_f[:, layer, m].tolist(), txt_f[:, layer, m].tolist()
            pooled = math.sqrt((2 * statistics.variance(a) + 2 * statistics.variance(b)) / 4)
            if pooled < MIN_POOLED_SD:  # near-constant shares: undefined, not a huge d
                assert d[layer][m] is None
            else:
                assert d[layer][m] == pytest.approx((statistics.mean(a) - statistics.mean(b)) / pooled, rel=1e-3)
    assert "pooled sd below" in att["cohens_d_note"]


def test_cohens_d_hand_values_and_undefined_cases():
    a = torch.tensor([1.0, 2.0, 3.0])[:, None]
    b = torch.tensor([2.0, 4.0, 6.0, 8.0])[:, None]
    pooled = math.sqrt((2 * 1.0 + 3 * statistics.variance([2, 4, 6, 8])) / 5)
    assert float(cohens_d(a, b)) == pytest.approx((2.0 - 5.0) / pooled)
    assert math.isnan(float(cohens_d(a[:1], b)))  # one item on a side
    assert math.isnan(float(cohens_d(torch.ones(3, 1), torch.ones(3, 1))))  # zero spread
    # near-constant shares (an untrained model's): a d of ~ -40 from sds of 1e-6 is noise -> undefined
    tiny = torch.tensor([0.5, 0.500001, 0.499999])[:, None]
    assert math.isnan(float(cohens_d(tiny, tiny + 4e-5)))
    assert float(cohens_d(tiny, tiny + 4e-5, min_pooled_sd=0.0)) < -30


def test_table_and_picture_use_one_unit_per_quantity(tmp_path):
    cond = dict(items=4, accuracy=0.25, clean_accuracy=0.75, flip_rate=0.5)
    cond.update(causal_effect={"mean": 0.125, "std": 0.05}, js={"mean": 0.0123, "std": 0.004})
    report = dict(model="m", clean={"image_heavy": {"accuracy": 0.75}}, items={"image_heavy": 4}, skipped={})
    report["conditions"] = {"mislead_text": cond}
    table = format_table(report)
    assert "acc. %" in table and "flip %" in table and "JS, 10^-3 nats" in table
    row = next(line for line in table.splitlines() if line.startswith("mislead_text"))
    assert row.split()[2:5] == ["25.0", "75.0", "50.0"] and "+12.50" in row and "12.300" in row
    assert os.path.getsize(plot_report(report, str(tmp_path / "d.png"))) > 0


def test_batch_size_does_not_change_the_numbers(llava):
    kw = dict(tokenizer=TOK, max_items=4, conditions="mislead_text,swap_image", progress=False, log=None, seed=1)
    one, many = diagnose(llava, batch_size=1, **kw), diagnose(llava, batch_size=8, **kw)
    for name in ("mislead_text", "swap_image"):
        a, b = one["conditions"][name], many["conditions"][name]
        assert a["flip_rate"] == b["flip_rate"] and a["accuracy"] == b["accuracy"]
        assert a["js"]["mean"] == pytest.approx(b["js"]["mean"], rel=1e-3, abs=1e-9)
        assert a["causal_effect"]["mean"] == pytest.approx(b["causal_effect"]["mean"], abs=1e-6)
    torch.testing.assert_close(torch.tensor(one["attention"]["share"]), torch.tensor(many["attention"]["share"]))


def test_a_conditions_variants_do_not_depend_on_the_other_conditions_chosen(llava):
    kw = dict(tokenizer=TOK, max_items=6, progress=False, log=None, seed=3, attention=False)
    alone = diagnose(llava, conditions="mislead_text", **kw)["conditions"]["mislead_text"]
    both = diagnose(llava, conditions="unrelated_text,mislead_text", **kw)["conditions"]["mislead_text"]
    assert alone["js"]["mean"] == both["js"]["mean"] and alone["flip_rate"] == both["flip_rate"]
    other_seed = diagnose(llava, conditions="mislead_text", **dict(kw, seed=4))["conditions"]["mislead_text"]
    assert other_seed["js"]["mean"] != alone["js"]["mean"]  # the seed still matters


def test_conditions_are_named_and_unsupported_ones_skipped_with_a_reason(llava):
    assert any("mislead" in n for n in CONDITIONS)
    lines = []
    report = diagnose(llava, tokenizer=TOK, max_items=2, progress=True, log=lines.append)
    # the built-in tasks' default: every image condition but the two data-file texts
    image_conditions = [n for n, c in CONDITIONS.items() if c.requires == ("image",) and n in BUILTIN_CONDITIONS]
    assert list(report["conditions"]) == image_conditions
    assert {"misleading_sentence", "unrelated_paragraph"}.isdisjoint(BUILTIN_CONDITIONS)
    for name in ("misaligned_audio_video", "removed_audio", "zeroed_frames"):
        assert "audio" in report["skipped"][name]
    text = "\n".join(lines)
    assert "skipped" in text and "mislead_text" in text and "Cohen's d" in text
    assert "diagnose: 4/4 items (100%)" in text  # stdout is not a terminal here: plain progress lines
    assert report["items"] == {"image_heavy": 2, "text_heavy": 2}
    # the model is back in its mode and attention implementation
    assert llava.config._attn_implementation == "sdpa" and not llava.training


def test_errors(llava, tmp_path):
    with pytest.raises(DiagnoseError, match="no such directory"):
        diagnose(str(tmp_path / "missing"), log=None)
    with pytest.raises(DiagnoseError, match="unknown condition"):
        diagnose(llava, tokenizer=TOK, conditions=["mislead_txt"], log=None)
    for empty in ("", " , ", []):  # an empty selection is an error, not a report without conditions
        with pytest.raises(DiagnoseError, match="no condition names"):
            diagnose(llava, tokenizer=TOK, conditions=empty, log=None)
    with pytest.raises(DiagnoseError, match="tokenizer"):
        diagnose(llava, log=None)
    with pytest.raises(DiagnoseError, match="max_items"):
        diagnose(llava, tokenizer=TOK, max_items=0, log=None)
    # a model that gives no attentions (sdpa, and it cannot switch) when the white-box part is asked for
    model, _ = tiny_llava(len(TOK), seed=0)
    model.set_attn_implementation("sdpa")
    model.set_attn_implementation = lambda impl: None
    with pytest.raises(DiagnoseError, match="no attentions"):
        diagnose(model, tokenizer=TOK, max_items=1, progress=False, log=None)
    report = diagnose(model, tokenizer=TOK, max_items=1, attention=False, progress=False, log=None)
    assert "attention" not in report


def test_output_problems_are_reported_before_the_run(llava, tmp_path, monkeypatch):
    """A bad --out, or no matplotlib for the PNG, fails before any forward, not after the whole run."""
    import importlib.util

    calls = []
    handle = llava.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        blocker = tmp_path / "a_file"
        blocker.write_text("")
        with pytest.raises(DiagnoseError, match="--out .*cannot create"):
            diagnose(llava, tokenizer=TOK, out=str(blocker / "diag"), max_items=1, log=None)
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a))
        with pytest.raises(DiagnoseError, match="matplotlib"):
            diagnose(llava, tokenizer=TOK, out=str(tmp_path / "diag"), max_items=1, log=None)
    finally:
        handle.remove()
    assert not calls


def test_cli_writes_table_json_and_png(tmp_path, capsys, llava):
    from modkern.apps.cli import main

    ckpt = tmp_path / "ckpt"
    save_checkpoint(llava, ckpt)
    TOK.save(os.path.join(ckpt, "modkern_tokenizer.json"))
    out = tmp_path / "diag"
    code = main(["diagnose", "--model", str(ckpt), "--out", str(out), "--max-items", "3", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mislead_text" in printed and "flip" in printed
    report = json.loads((out / "diagnosis.json").read_text())
    assert {"conditions", "clean", "skipped", "attention", "items", "settings"} <= set(report)
    assert set(report["conditions"]["mislead_text"]) >= {"accuracy", "flip_rate", "causal_effect", "js"}
    assert (out / "diagnosis.png").stat().st_size > 1000

    code = main(["diagnose", "--model", str(tmp_path / "nope"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "no such directory" in err and len(err.strip().splitlines()) == 1
    code = main(["diagnose", "--model", str(ckpt), "--conditions", "bogus", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "unknown condition" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["diagnose", "--help"])
    assert exc.value.code == 0
    assert "--max-items" in capsys.readouterr().out


def test_qwen2_vl_takes_the_image_conditions():
    from modkern.apps.tiny_models import tiny_qwen2_vl

    model, _ = tiny_qwen2_vl(len(TOK) + 4, seed=0)
    report = diagnose(model, tokenizer=TOK, max_items=2, progress=False, log=None)
    assert report["family"] == "qwen_vl" and report["attention"]["modalities"] == ["text", "image"]
    assert list(report["conditions"]) == [
        n for n, c in CONDITIONS.items() if c.requires == ("image",) and n in BUILTIN_CONDITIONS
    ]
    assert all("audio" in reason for reason in report["skipped"].values())


def test_progress_bar_only_when_its_stream_is_a_terminal(monkeypatch):
    """The bar is drawn on stderr: with stdout a terminal but stderr a file (`2> log`), the file gets
    no carriage-return bar, and the progress comes as plain lines instead."""
    import io
    import sys

    from modkern.apps.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = io.StringIO()
    monkeypatch.setattr(sys, "stdout", Terminal())
    monkeypatch.setattr(sys, "stderr", err)
    lines = []
    bar = Progress(20, "diagnose", unit="item", log=lines.append)
    for _ in range(20):
        bar.update(1)
    bar.close()
    assert "\r" not in err.getvalue()
    assert lines and lines[-1].startswith("diagnose: 20/20 items (100%)")


IMAGE_CONDITIONS = ["swap_image", "black_image", "white_image", "noise_image"]


def _text_heavy(items):
    return [it for it in items if it.kind == "text_heavy"]


def test_swap_image_without_a_donor_of_another_class_is_skipped_not_a_noise_image(llava):
    """max_items=1: one text-heavy item, no image of another class to swap in. The condition is
    skipped with the reason (it used to run a noise image under the name swap_image)."""
    kw = dict(tokenizer=TOK, progress=False, log=None, attention=False)
    report = diagnose(llava, max_items=1, conditions="swap_image,noise_image", **kw)
    assert "swap_image" not in report["conditions"] and "noise_image" in report["conditions"]
    assert "another class" in report["skipped"]["swap_image"]
    # every text-heavy item of one class: no same-class image passed off as a swapped one either
    items = image_task_items(4)
    first = _text_heavy(items)[0].target_class
    one_class = [it for it in items if it.kind == "image_heavy" or it.target_class == first]
    one_class.append(Item(**{**_text_heavy(items)[0].__dict__, "image": _text_heavy(items)[1].image}))
    report = diagnose(llava, items=one_class, conditions="swap_image,black_image", **kw)
    assert "another class" in report["skipped"]["swap_image"] and "swap_image" not in report["conditions"]
    assert report["conditions"]["black_image"]["items"] == 2


def test_items_without_an_image_are_left_out_of_the_image_conditions_with_a_reason(llava):
    items = image_task_items(3)
    text = _text_heavy(items)
    no_image = Item(**{**text[0].__dict__, "image": None})
    lines = []
    report = diagnose(
        llava,
        tokenizer=TOK,
        items=[*items, no_image],
        conditions=IMAGE_CONDITIONS,
        progress=False,
        log=lines.append,
    )
    assert report["items"]["text_heavy"] == 4 and report["skipped"] == {}
    for name in IMAGE_CONDITIONS:
        c = report["conditions"][name]
        assert c["items"] == 3 and c["items_skipped"] == 1, name
        assert list(c["items_skipped_reasons"].values()) == [1]
        assert "no image" in next(iter(c["items_skipped_reasons"]))
    assert "1 item(s) left out: " in "\n".join(lines)
    # no text-heavy item with an image at all: the conditions are skipped, not a TypeError
    report = diagnose(
        llava,
        tokenizer=TOK,
        items=[it for it in items if it.kind == "image_heavy"] + [no_image],
        conditions=["mislead_text", *IMAGE_CONDITIONS],
        progress=False,
        log=None,
    )
    assert list(report["conditions"]) == ["mislead_text"]
    for name in IMAGE_CONDITIONS:
        assert "no image" in report["skipped"][name], name


def test_misaligned_audio_video_with_too_few_items_is_skipped_not_fatal():
    from modkern.apps.tiny_models import tiny_qwen2_5_omni

    model, _ = tiny_qwen2_5_omni(len(TOK) + 7, num_layers=1, seed=0)
    kw = dict(tokenizer=TOK, progress=False, log=None, attention=False)
    av = "misaligned_audio_video,removed_audio,zeroed_frames"
    report = diagnose(model, max_items=1, conditions=av, **kw)  # one item of each audio-visual kind
    assert "another class" in report["skipped"]["misaligned_audio_video"]
    assert report["conditions"]["removed_audio"]["items"] == 1 and report["conditions"]["zeroed_frames"]["items"] == 1
    # an item without the stream a condition changes is left out of it (not a TypeError / a no-op variant)
    from modkern.apps.diagnose import av_task_items

    items = av_task_items(2, mel_bins=8)
    visual = [it for it in items if it.kind == "av_visual"]
    sound = [it for it in items if it.kind == "av_audio"]
    silent = Item(**{**visual[0].__dict__, "audio": None})
    blind = Item(**{**sound[0].__dict__, "video": None})
    report = diagnose(model, items=[*items, silent, blind], conditions=av, **kw)
    cond = report["conditions"]
    for name, stream in (("removed_audio", "audio"), ("zeroed_frames", "video")):
        assert cond[name]["items"] == 2 and f"no {stream}" in next(iter(cond[name]["items_skipped_reasons"]))
    assert cond["misaligned_audio_video"]["items"] == 4 and cond["misaligned_audio_video"]["items_skipped"] == 2
