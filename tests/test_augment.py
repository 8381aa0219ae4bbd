"""Heuristic augmentation (modkern.objective.augment) and the synthetic task's pieces (modkern.apps.synthetic_task)."""

import random

import pytest
import torch

from modkern.apps.synthetic_task import (
    MISLEADING_NOTE,
    InterferenceTask,
    TaskConfig,
    TaskEncoder,
    WordTokenizer,
    is_misleading_note,
)
from modkern.objective.augment import (
    IGNORE_INDEX,
    AugmentConfig,
    HeuristicAugmenter,
    RobustCollator,
    Sample,
    collate_samples,
)
from modkern.objective.robust import row_ref_index, shift_labels

CLASSES = ("red", "green", "blue")


def _image(value):
    return torch.full((3, 8, 8), value)


def _samples():
    return [
        Sample("what colour ?", "red", _image(0.1), "image_heavy", context="caption : red ."),
        Sample("what does the note say ?", "blue", _image(0.2), "text_heavy", context="note : blue ."),
        Sample("what colour ?", "green", _image(0.3), "image_heavy"),
        Sample("what is shown ?", "green", _image(0.4), "vqa"),
        Sample("note says what ?", "red", _image(0.5), "text_heavy", context="note : red ."),
    ]


def _tokenizer():
    words = "what colour does the note say is shown caption says image shows this a picture of".split()
    return WordTokenizer(words + list(CLASSES) + ["?", ":", ".", "fact", "sky", "blue", "bees", "make", "honey"])


def _collator(config, seed=0, num_image_tokens=4):
    tok = _tokenizer()
    enc = TaskEncoder(tok.encode, tok.image_token_id, num_image_tokens, tok.bos_token_id)
    return RobustCollator(enc, HeuristicAugmenter(config, seed=seed), tok.pad_token_id, return_tags=True), tok


LEGACY_TRANSFORMS = dict(
    text_transforms=("misleading_text", "unrelated_text"),
    image_transforms=("swap_image", "black_image", "white_image", "noise_image"),
    noise_clean_image=False,
)


def test_paper_copies_by_default():
    # image-heavy: a related sentence and an unrelated paragraph in front of the prompt; text-heavy:
    # a uniform-noise clean image and swapped / black / white copies; VQA: none.
    cfg = AugmentConfig(classes=CLASSES, irrelevant_sentences=("fact : bees make honey .", "fact : sky blue ."))
    assert cfg.copies_per_sample is None and cfg.paragraph_sentences == 10
    collate, tok = _collator(cfg)
    samples = _samples()
    batch = collate(samples)
    ref, tags, kinds = batch["ref_index"].tolist(), batch["tags"], batch["sample_kind"]
    assert len(ref) == 5 + 2 * 2 + 3 * 2
    assert ref[:5] == [0, 1, 2, 3, 4] and sorted(ref[5:]) == [0, 0, 1, 1, 1, 2, 2, 4, 4, 4]
    for src in (0, 2):
        assert sorted(tags[r] for r in range(5, 15) if ref[r] == src) == ["related_text", "unrelated_paragraph"]
    for src in (1, 4):
        assert sorted(tags[r] for r in range(5, 15) if ref[r] == src) == ["black_image", "swap_image", "white_image"]
        assert tags[src] == "noise_clean"
    assert [tags[i] for i in (0, 2, 3)] == ["clean"] * 3
    assert all(kinds[r] == kinds[ref[r]] for r in range(15))
    pixels = batch["pixel_values"]
    for i in (0, 2, 3):  # image-heavy and VQA clean images unchanged
        assert torch.equal(pixels[i], samples[i].image)
    for i in (1, 4):  # text-heavy clean images: uniform noise in [0, 1], no longer the real image
        assert not torch.equal(pixels[i], samples[i].image)
        assert 0 <= float(pixels[i].min()) and float(pixels[i].max()) <= 1 and float(pixels[i].std()) > 0.2
    aug = HeuristicAugmenter(cfg, seed=1)
    copies, sources = aug(samples)
    for c, src in zip(copies, sources):
        s = samples[src]
        assert (c.text, c.answer, c.kind) == (s.text, s.answer, s.kind)
        if c.tag == "related_text":
            option = c.context.split("depict a ")[1].split(".")[0]
            assert option in CLASSES and c.context.startswith(s.context)  # any option; the old context kept
            assert c.prompt.endswith(f"depict a {option}. {s.text}")  # right before the question
        if c.tag == "unrelated_paragraph":
            assert c.context.count("fact :") == 10 and c.context.startswith(s.context)
    # a sample with facts: its first fact is the related text
    with_facts = Sample("what colour ?", "red", _image(0.1), "image_heavy", facts=("The image shows red.", "x"))
    assert aug.apply("related_text", [with_facts], 0).context == "The image shows red."
    assert len(modkern_pool()) >= 80


def modkern_pool():
    from modkern.objective.distractors import IRRELEVANT_SENTENCES

    assert len(set(IRRELEVANT_SENTENCES)) == len(IRRELEVANT_SENTENCES)
    return IRRELEVANT_SENTENCES


def test_copies_kinds_and_ref_index():
    cfg = AugmentConfig(
        classes=CLASSES, copies_per_sample=2, unrelated_facts=("fact : bees make honey .",), **LEGACY_TRANSFORMS
    )
    collate, tok = _collator(cfg)
    batch = collate(_samples())
    # 2 image-heavy x 2 text transforms, 2 text-heavy x 2 image transforms, vqa none.
    assert batch["input_ids"].shape[0] == 5 + 8
    ref = batch["ref_index"]
    assert ref.dtype == torch.long
    assert ref[:5].tolist() == [0, 1, 2, 3, 4]  # clean samples first, pointing at themselves
    assert sorted(ref[5:].tolist()) == [0, 0, 1, 1, 2, 2, 4, 4]
    kinds = batch["sample_kind"]
    for r in range(len(kinds)):
        assert kinds[r] == kinds[ref[r]]  # a copy keeps its source's kind
    tags = batch["tags"]
    for r in range(5, len(tags)):
        if kinds[r] == "image_heavy":
            assert tags[r] in ("misleading_text", "unrelated_text")
        else:
            assert tags[r] in ("swap_image", "black_image", "white_image", "noise_image")
    # each sample's two copies are two different transforms
    for src in (0, 1, 2, 4):
        mine = [tags[r] for r in range(5, len(tags)) if ref[r] == src]
        assert len(set(mine)) == 2
    assert batch["pixel_values"].shape == (13, 3, 8, 8)


def test_answer_rows_pair_up_with_the_clean_sample():
    cfg = AugmentConfig(classes=CLASSES, irrelevant_sentences=("fact : bees make honey .",), paragraph_sentences=2)
    collate, tok = _collator(cfg)
    batch = collate(_samples())
    labels, ref = batch["labels"], batch["ref_index"]
    for r in range(labels.shape[0]):
        answer = labels[r][labels[r] != IGNORE_INDEX]
        clean = labels[ref[r]][labels[ref[r]] != IGNORE_INDEX]
        assert answer.numel() > 0 and torch.equal(answer, clean)
    # the row-level map robust_loss builds from this batch is valid and pairs equal answer tokens
    shifted = shift_labels(labels)
    rows = shifted != IGNORE_INDEX
    row_ref = row_ref_index(rows, ref)
    flat = shifted.reshape(-1)
    sel = rows.reshape(-1)
    assert torch.equal(flat[sel], flat[row_ref[sel]])
    # copies with prompts of another length really do need the map (not a plain offset)
    lengths = batch["attention_mask"].sum(1)
    assert any(lengths[r] != lengths[ref[r]] for r in range(5, labels.shape[0]))


def test_text_transforms_replace_context_and_mislead():
    cfg = AugmentConfig(
        classes=CLASSES,
        text_transforms=("misleading_text",),
        misleading_templates=("it is {label} .",),
        copies_per_sample=1,
    )
    aug = HeuristicAugmenter(cfg, seed=3)
    samples = _samples()
    copies, sources = aug(samples)
    assert sources == [0, 1, 2, 4]
    for c, s in zip(copies, sources):
        src = samples[s]
        assert c.answer == src.answer and c.text == src.text and c.kind == src.kind
        if src.kind == "image_heavy":
            assert c.tag == "misleading_text"
            assert c.context.startswith("it is ") and src.answer not in c.context  # a wrong class
            assert c.prompt == f"{c.context} {src.text}"
            assert torch.equal(c.image, src.image)


def test_image_transforms():
    samples = _samples()
    aug = HeuristicAugmenter(AugmentConfig(classes=CLASSES), seed=0)
    black = aug.apply("black_image", samples, 1)
    white = aug.apply("white_image", samples, 1)
    noise = aug.apply("noise_image", samples, 1)
    swap = aug.apply("swap_image", samples, 1)
    assert torch.all(black.image == 0) and torch.all(white.image == 1)
    assert noise.image.shape == samples[1].image.shape
    assert 0 <= noise.image.min() and noise.image.max() <= 1 and noise.image.std() > 0.1
    # swapped in: an image of another sample, preferably of another class
    others = [s for i, s in enumerate(samples) if i != 1 and s.target_class != samples[1].target_class]
    assert any(torch.equal(swap.image, o.image) for o in others)
    for copy in (black, white, noise, swap):
        assert copy.text == samples[1].text and copy.answer == samples[1].answer and copy.context == samples[1].context
    # a batch of one has nothing to swap with: falls back to noise
    alone = aug.apply("swap_image", samples[1:2], 0)
    assert alone.tag == "noise_image"


def test_deterministic_and_prob_zero():
    cfg = AugmentConfig(classes=CLASSES, copies_per_sample=1)
    a, _ = _collator(cfg, seed=7)
    b, _ = _collator(cfg, seed=7)
    ba, bb = a(_samples()), b(_samples())
    for k in ("input_ids", "labels", "ref_index", "pixel_values"):
        assert torch.equal(ba[k], bb[k])
    none, _ = _collator(AugmentConfig(classes=CLASSES, prob=0.0))
    batch = none(_samples())
    assert batch["ref_index"].tolist() == [0, 1, 2, 3, 4]


def test_collate_padding_and_labels():
    tok = _tokenizer()
    enc = TaskEncoder(tok.encode, tok.image_token_id, 4, tok.bos_token_id)
    samples = _samples()
    batch = collate_samples(samples, enc, tok.pad_token_id)
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    for r, s in enumerate(samples):
        n = int(am[r].sum())
        assert torch.all(am[r, :n] == 1) and torch.all(am[r, n:] == 0)  # right padding
        assert torch.all(ids[r, n:] == tok.pad_token_id) and torch.all(labels[r, n:] == IGNORE_INDEX)
        assert ids[r, 0] == tok.bos_token_id and int((ids[r] == tok.image_token_id).sum()) == 4
        assert tok.decode(labels[r][labels[r] != IGNORE_INDEX]) == s.answer
        assert tok.decode(ids[r, 5:n]) == f"{s.prompt} {s.answer}".replace("  ", " ")


def test_bad_arguments():
    with pytest.raises(ValueError, match="text_transforms"):
        AugmentConfig(classes=CLASSES, text_transforms=("rotate",))
    aug = HeuristicAugmenter(AugmentConfig(classes=()))  # related_text names the sample's own options
    with pytest.raises(ValueError, match="classes"):
        aug.apply("related_text", [Sample("q", "a", None, "image_heavy")], 0)
    own = aug.apply("related_text", [Sample("q", "A", None, "image_heavy", options=("cat", "dog"))], 0)
    assert own.context in ("This picture seems to depict a cat.", "This picture seems to depict a dog.")
    with pytest.raises(ValueError, match="classes"):
        AugmentConfig(classes=("red",), text_transforms=("misleading_text",))
    with pytest.raises(ValueError, match="paragraph_sentences"):
        AugmentConfig(classes=CLASSES, paragraph_sentences=0)
    with pytest.raises(ValueError, match="copies_per_sample"):
        AugmentConfig(classes=CLASSES, copies_per_sample=-1)
    with pytest.raises(ValueError, match="kind"):
        Sample("q", "a", None, "audio_heavy")
    with pytest.raises(ValueError, match="samples"):
        RobustCollator(lambda s: ([1], [1]))([])
    with pytest.raises(ValueError, match="encode"):
        RobustCollator()
    with pytest.raises(ValueError, match="image"):
        HeuristicAugmenter(AugmentConfig(classes=CLASSES)).apply(
            "black_image", [Sample("q", "a", None, "text_heavy")], 0
        )


def test_word_tokenizer_roundtrip(tmp_path):
    tok = _tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.image_token_id == len(tok) - 1  # the layout modkern.apps.tiny_models expects
    assert tok.decode(tok.encode("What colour? Red.")) == "what colour ? red ."
    assert tok.encode("zebra") == [tok.unk_token_id]
    tok.save(tmp_path / "v.json")
    again = WordTokenizer.load(tmp_path / "v.json")
    assert again.vocab == tok.vocab


def test_task_sets_are_what_they_claim():
    task = InterferenceTask(TaskConfig(train_size=400, eval_size=24, caption_agree=0.8, image_noise=0.1, seed=1))
    train = task.train_set()
    image_heavy = [s for s in train if s.kind == "image_heavy"]
    agree = sum(f" {s.answer} " in s.context for s in image_heavy) / len(image_heavy)
    assert 0.7 < agree < 0.9  # captions agree with the image about caption_agree of the time
    sets = task.eval_sets()
    assert set(sets) == {
        "clean",
        "misleading_text",
        "unrelated_text",
        "text_clean",
        "text_swapped_image",
        "text_blank_image",
        "misleading_note",
    }
    h = task.config.image_size // 2
    for name, samples in sets.items():
        assert len(samples) == 24
        for s in samples:
            mentioned = [c for c in task.colours if f" {c} " in f" {s.context} "]
            assert len(mentioned) == 1
            if name == "clean":
                assert mentioned == [s.answer]
            elif name in ("misleading_text", "unrelated_text", "misleading_note"):
                assert s.kind == "image_heavy" and mentioned != [s.answer]  # the text names another colour
                assert is_misleading_note(s.context) == (name == "misleading_note")
            else:
                assert s.kind == "text_heavy" and mentioned == [s.answer]
            if s.kind == "image_heavy":
                # the top-left quadrant shows the answer's colour (up to noise)
                quad = s.image[:, :h, :h].mean((1, 2))
                assert torch.allclose(quad, task._rgb(s.answer), atol=0.15)
        if name == "text_blank_image":
            assert all(torch.all(s.image == 0) for s in samples)
    # the training and evaluation items are generated deterministically
    assert torch.equal(InterferenceTask(task.config).train_set()[5].image, train[5].image)


def test_held_out_misleading_note_is_never_produced_by_the_augmentation():
    """The demo's held-out interference (misleading text in the MISLEADING_NOTE template) must never
    reach training: not among the augmenter's texts, not in any copy it makes, not in a clean
    training item, and augment_config refuses it."""
    from modkern.apps.diagnose import CONDITIONS, ConditionContext, image_task_items
    from modkern.apps.synthetic_task import CAPTION

    task = InterferenceTask(TaskConfig(train_size=1500, image_size=8, seed=3))
    assert set(WordTokenizer.split(MISLEADING_NOTE.replace("{label}", ""))) <= set(task.tokenizer().vocab)
    # the detector is not vacuous: it recognizes the held-out texts, and only them
    assert all(is_misleading_note(MISLEADING_NOTE.format(label=c)) for c in task.colours)
    assert all(is_misleading_note(s.context) for s in task.eval_sets(size=8)["misleading_note"])
    items = image_task_items(4, image_size=8)
    ctx = ConditionContext(random.Random(0), torch.Generator().manual_seed(0), task.colours)
    held_out = [CONDITIONS["mislead_note"].make(items, i, ctx) for i in range(4)]
    assert all(is_misleading_note(it.context) for it in held_out)
    assert not is_misleading_note("note : the word is red .") and not is_misleading_note("caption : a red picture .")

    cfg = task.augment_config()
    texts = [t.format(option=c) for t in cfg.related_templates for c in task.colours] + list(cfg.irrelevant_sentences)
    assert MISLEADING_NOTE not in cfg.misleading_templates
    assert not any(is_misleading_note(t) for t in texts)

    train = task.train_set()
    assert not any(is_misleading_note(s.context) for s in train)
    contexts = []
    for seed in range(3):
        augment = HeuristicAugmenter(cfg, seed=seed)
        for lo in range(0, len(train), 32):
            copies, _ = augment(train[lo : lo + 32])
            contexts += [(c.tag, c.context) for c in copies if c.kind == "image_heavy"]
    assert len(contexts) > 2000 and {tag for tag, _ in contexts} == {"related_text", "unrelated_paragraph"}
    for tag, context in contexts:
        caption_end = context.index("picture .") + len("picture .")
        added = context[caption_end:].strip()  # the copy's text, after the caption, before the question
        pieces = [added] if tag == "related_text" else [f.strip() + " ." for f in added.split(" .") if f.strip()]
        assert set(pieces) <= set(texts), added
        assert not is_misleading_note(added) and "note" not in added and "list" not in added

    with pytest.raises(ValueError, match="held-out"):
        task.augment_config(misleading_templates=(CAPTION, MISLEADING_NOTE))
    with pytest.raises(ValueError, match="held-out"):
        task.augment_config(unrelated_facts=(MISLEADING_NOTE.format(label="red"),))
    with pytest.raises(ValueError, match="held-out"):
        task.augment_config(irrelevant_sentences=("list : kite , red .",))
