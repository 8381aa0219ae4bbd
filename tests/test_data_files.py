"""modkern.data: the official data-file format (JSON list or JSONL), checked sample by sample, every
bad sample named by file and line; ``skip_bad`` leaves them out and lists them. Images are PNG /
JPEG files written by the test."""

import json

import pytest
from PIL import Image

from modkern.data import DataFileError, read_samples

QUESTION = "Question:\nWhat is in the picture?\nOption:\nA: cat\nB: dog\nC: bird"


@pytest.fixture
def images(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "img" / "red.png")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(tmp_path / "img" / "blue.jpg")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    return tmp_path


def _samples():
    return [
        {"type": "image_heavy", "image": "img/red.png", "question": QUESTION, "answer": "A", "facts": {"B": "A dog."}},
        {
            "type": "Text_Heavy",
            "question": "Question:\nThe note says blue. Colour?\nOption:\nA: red\nB: blue",
            "answer": "B",
        },
        {"type": "VQA", "image": "img/blue.jpg", "question": "How many legs?", "answer": 4},
    ]


def _write_jsonl(path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_the_official_format_as_jsonl_and_as_a_json_list(images):
    for path in (_write_jsonl(images / "d.jsonl", _samples()), images / "d.json"):
        if path.suffix == ".json":
            path.write_text(json.dumps(_samples(), indent=2))
        data = read_samples(path)
        assert [s.kind for s in data.samples] == ["image_heavy", "text_heavy", "vqa"]
        first, second, third = data.samples
        assert first.image == str(images / "img" / "red.png") and second.image is None
        assert first.options == {"A": "cat", "B": "dog", "C": "bird"} and first.facts == ("A dog.",)
        assert third.answer == "4" and third.options == {}
        assert data.skipped == []
    lines = [s.line for s in read_samples(images / "d.json").samples]
    assert lines[0] == 2 and lines[0] < lines[1] < lines[2]  # where each element starts


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"type": "caption", "image": "img/red.png", "question": "q", "answer": "a"}, "unknown type 'caption'"),
        ({"type": "image_heavy", "image": "img/missing.png", "question": "q", "answer": "a"}, "not found"),
        ({"type": "image_heavy", "image": "img/broken.png", "question": "q", "answer": "a"}, "not a readable image"),
        ({"type": "VQA", "question": "q", "answer": "a"}, "needs an 'image'"),
        ({"type": "VQA", "image": "img/red.png", "question": "q", "answer": "  "}, "'answer' must be a non-empty"),
        ({"type": "VQA", "image": "img/red.png", "answer": "a"}, "'question' must be"),
        ({"type": "VQA", "image": "img/red.png", "question": "q", "answer": "a", "facts": 3}, "'facts' must be"),
        (["not", "an", "object"], "must be a JSON object"),
    ],
)
def test_a_bad_sample_is_named_with_its_line(images, bad, reason):
    path = _write_jsonl(images / "d.jsonl", [*_samples(), bad])
    with pytest.raises(DataFileError, match=rf"d\.jsonl:4: .*{reason}"):
        read_samples(path)
    data = read_samples(path, skip_bad=True)
    assert len(data.samples) == 3 and len(data.skipped) == 1
    assert data.skipped[0][0] == 4 and reason in data.skipped[0][1]


def test_broken_lines_and_files(images):
    path = _write_jsonl(images / "d.jsonl", _samples()[:1], extra_lines=["{broken", "", json.dumps(_samples()[2])])
    with pytest.raises(DataFileError, match=r"d\.jsonl:2: not a JSON object"):
        read_samples(path)
    data = read_samples(path, skip_bad=True)
    assert [s.line for s in data.samples] == [1, 4] and [line for line, _ in data.skipped] == [2]
    broken = images / "b.json"
    broken.write_text('[\n {"type": "VQA"},\n {"type": \n')
    with pytest.raises(DataFileError, match=r"b\.json:\d+: broken JSON"):
        read_samples(broken, skip_bad=True)  # a broken JSON list cannot be read past the error
    (images / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataFileError, match="empty"):
        read_samples(images / "empty.jsonl")
    with pytest.raises(DataFileError, match="cannot read"):
        read_samples(images / "nowhere.jsonl")
    all_bad = _write_jsonl(images / "bad.jsonl", [{"type": "x"}])
    with pytest.raises(DataFileError, match=r"no usable sample \(1 bad ones left out\)"):
        read_samples(all_bad, skip_bad=True)


def test_kind_mix_sampler_makes_the_official_batches():
    from modkern.data import OFFICIAL_MIX, KindMixSampler, parse_mix

    kinds = ["image_heavy"] * 5 + ["text_heavy"] * 6 + ["vqa"] * 13
    sampler = KindMixSampler(kinds, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2  # image-heavy runs out first: 5 // 2
    for batch in batches:
        assert [kinds[i] for i in batch] == ["image_heavy"] * 2 + ["text_heavy"] * 2 + ["vqa"] * 4
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))  # no sample twice in an epoch
    assert batches == list(KindMixSampler(kinds, seed=3))  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != batches  # reshuffled per epoch
    assert parse_mix("1:1:6") == {"image_heavy": 1, "text_heavy": 1, "vqa": 6} and OFFICIAL_MIX == parse_mix("2:2:4")
    assert [kinds[i] for i in next(iter(KindMixSampler(kinds, parse_mix("0:3:1"))))] == ["text_heavy"] * 3 + ["vqa"]
    with pytest.raises(ValueError, match="three counts"):
        parse_mix("2:2")
    with pytest.raises(ValueError, match=r"more samples of \['image_heavy', 'text_heavy'\]"):
        KindMixSampler(["vqa"] * 8)
    with pytest.raises(ValueError, match="count >= 0 per kind"):
        KindMixSampler(kinds, {"captions": 2})
