"""The data-file path through the model's own processor (modkern.processing), for each supported family:
tiny random checkpoints with processors built locally (a BPE tokenizer trained on a word list, the
families' image processors and chat templates), data files with PNG / JPEG images written here.

Covered: labels exactly on the assistant turn (decoded back), the prompt exactly what the processor
makes of the sample, the heuristic copies identical to processing the changed sample directly,
ref_index / sample_kind pairing, a robust loss with gradients, an unsupported processor, the
option-likelihood scoring of the diagnosis."""

import math

import pytest
import torch
from tiny_models import OPTIONS, write_data

from modkern.apps.tiny_processors import FAMILIES, tiny_model_and_processor
from modkern.constants import IGNORE_INDEX
from modkern.data import read_samples
from modkern.objective.augment import AugmentConfig, HeuristicAugmenter
from modkern.objective.robust import RobustConfig, robust_loss
from modkern.processing import (
    OFFICIAL_SYSTEM_PROMPT,
    ChatProcessor,
    ProcessorError,
    check_processor,
    processor_collator,
    to_sample,
)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def samples(data_file):
    return [to_sample(s) for s in read_samples(data_file).samples]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model, processor = tiny_model_and_processor(request.param, seed=0)
    return request.param, model, processor


def _row(batch, r):
    keep = batch["attention_mask"][r].bool()
    return batch["input_ids"][r][keep], batch["labels"][r][keep]


def _image_rows(batch, r):
    """The pixel values of row ``r``'s image (one image per row in these batches)."""
    if "image_grid_thw" in batch:  # Qwen: patches of all images concatenated
        sizes = batch["image_grid_thw"].prod(-1).tolist()
        start = sum(sizes[:r])
        return batch["pixel_values"][start : start + sizes[r]]
    return batch["pixel_values"][r]


def _same_image(batch, r, alone) -> bool:
    """Row ``r``'s image in ``batch`` is the one image of ``alone`` (LLaVA-NeXT pads the patches of
    a batch's images to the most patches with zeros)."""
    a, b = _image_rows(batch, r), _image_rows(alone, 0)
    if "image_sizes" in batch and not torch.equal(batch["image_sizes"][r], alone["image_sizes"][0]):
        return False
    if a.shape != b.shape and a.dim() == 4 and a.shape[0] > b.shape[0]:
        return torch.equal(a[: b.shape[0]], b) and not a[b.shape[0] :].any()
    return torch.equal(a, b)


def test_labels_are_the_assistant_turn(family, samples):
    name, _, processor = family
    chat = ChatProcessor(processor)
    batch = chat(samples)
    tok = processor.tokenizer
    for r, s in enumerate(samples):
        ids, labels = _row(batch, r)
        answer = labels != IGNORE_INDEX
        # labels: a suffix of the row, exactly the template's assistant turn, the answer decoded back
        assert answer.any() and bool(answer[answer.nonzero()[0, 0] :].all())
        assert torch.equal(labels[answer], ids[answer])
        assert tok.decode(labels[answer]) == chat.answer_text(s)
        assert tok.decode(labels[answer], skip_special_tokens=True).strip() == s.answer
        # the prompt: what the processor makes of the templated prompt and the image on its own
        alone = processor(text=[chat.prompt_text(s)], images=[_pil(s.image)], return_tensors="pt")
        assert torch.equal(ids[~answer], alone["input_ids"][0])
        assert _same_image(batch, r, dict(alone))
        system = OFFICIAL_SYSTEM_PROMPT in tok.decode(ids)
        assert system == (s.kind != "vqa"), (name, s.kind)  # the official system prompt, none for VQA


def _pil(image):
    from modkern.processing import to_pil

    return to_pil(image)


def test_copies_are_the_processed_changed_samples(family, samples):
    name, _, processor = family
    collate = processor_collator(processor, seed=3, return_tags=True)
    batch = collate(samples)
    n = len(samples)
    # the same augmenter state gives the same copies: process each one alone
    twin = HeuristicAugmenter(AugmentConfig(), seed=3)
    copies, sources = twin(samples)
    clean = twin.clean(samples)
    rows = clean + copies
    assert batch["ref_index"].tolist() == list(range(n)) + sources
    assert batch["sample_kind"] == [s.kind for s in rows]
    assert batch["tags"][n:] == [c.tag for c in copies]
    assert sorted(set(batch["tags"][n:])) == sorted(
        ["related_text", "unrelated_paragraph", "swap_image", "black_image", "white_image"]
    )
    chat = ChatProcessor(processor)
    for r, s in enumerate(rows):
        alone = chat([s])
        ids, labels = _row(batch, r)
        assert torch.equal(ids, alone["input_ids"][0]), (name, r, batch["tags"][r])
        assert torch.equal(labels, alone["labels"][0])
        assert _same_image(batch, r, alone)
    # a copy keeps its clean sample's answer tokens, so the consistency rows pair one to one
    for r in range(n, len(rows)):
        src = batch["ref_index"][r]
        assert torch.equal(
            _row(batch, r)[1][_row(batch, r)[1] != IGNORE_INDEX],
            _row(batch, src)[1][_row(batch, src)[1] != IGNORE_INDEX],
        )
    # the text-heavy clean image is uniform noise, the black / white copies constant
    tags = batch["tags"]
    assert tags[[i for i, s in enumerate(samples) if s.kind == "text_heavy"][0]] == "noise_clean"
    black = rows[tags.index("black_image")].image
    assert float(black.max()) == 0.0 and float(rows[tags.index("white_image")].image.min()) == 1.0


def test_robust_loss_runs_on_the_processed_batch(family, samples):
    name, model, processor = family
    batch = processor_collator(processor, seed=0)(samples[:6])
    out = robust_loss(model, batch, RobustConfig())
    assert math.isfinite(float(out.loss))
    assert float(out.consistency) > 0  # image- and text-heavy copies compared with their clean samples
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


def test_unsupported_processor_and_missing_template():
    _, processor = tiny_model_and_processor("llava")
    with pytest.raises(ProcessorError, match="not a processor modkern supports.*LLaVA-1.5"):
        check_processor(processor.tokenizer)
    template = processor.chat_template
    processor.chat_template = None
    try:
        with pytest.raises(ProcessorError, match="chat_template"):
            ChatProcessor(processor)
    finally:
        processor.chat_template = template
    assert check_processor(processor) == "LLaVA-1.5"


def test_option_likelihood_scoring(samples):
    from modkern.apps.diagnose.items import Item
    from modkern.apps.diagnose.metrics import AnswerRows, compare, item_metrics
    from modkern.apps.diagnose.models import ChatItemCollator, ModelSpec

    model, processor = tiny_model_and_processor("qwen2_vl")
    collate = ChatItemCollator(ModelSpec.from_model(model), processor)
    opts = (("A", "red"), ("B", "green"), ("C", "blue"))
    items = [
        Item("Question:\nWhich?\n" + OPTIONS, "B", "image_heavy", image=samples[0].image, options=opts),
        Item("How many?", "four", "vqa", image=samples[0].image),  # a free answer: exact match
    ]
    option_ids, answer, position = collate.option_targets(items)
    tok = processor.tokenizer
    assert answer.tolist() == [1, -1] and position.tolist()[0] == 0
    assert [tok.decode([i]) for i in option_ids[0].tolist()] == ["A", "B", "C"]
    batch = collate(items)
    shifted = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], IGNORE_INDEX)], 1)
    target = shifted[shifted != IGNORE_INDEX]
    item = (shifted != IGNORE_INDEX).nonzero()[:, 0]
    vocab = len(tok)
    logits = torch.randn(target.numel(), vocab)
    logits[0, option_ids[0]] = torch.tensor([5.0, 4.0, 1.0])  # option A preferred: wrong
    logits[torch.arange(1, target.numel()), target[1:]] = 50.0  # every other token the argmax
    rows = AnswerRows(logits, target, item)
    m = item_metrics(rows, 2, (option_ids, answer, position))
    assert m["choice"].tolist() == [0, -1] and m["correct"].tolist() == [False, True]
    flipped = logits.clone()
    flipped[0, option_ids[0]] = torch.tensor([1.0, 4.0, 5.0])  # now C: the choice changes
    c = compare(rows, AnswerRows(flipped, target, item), 2, options=(option_ids, answer, position))
    assert c["flip"].tolist() == [True, False]


def test_answer_tokens_are_the_ones_after_the_prompt(samples):
    """A SentencePiece-style tokenizer (Metaspace: "▁" before the first word of a text) encodes the
    answer "A" alone as "▁A" and after "assistant\n" as "A": the labels are the latter, the tokens
    the model sees and generates."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from modkern.apps.tiny_processors import QWEN_TEMPLATE, WORDS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    special = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False)
    tok.train_from_iterator([" ".join(WORDS) + " A B C " + OFFICIAL_SYSTEM_PROMPT] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=fast,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>"),
    )
    chat = ChatProcessor(processor)
    s = samples[0]
    alone = fast(chat.answer_text(s), add_special_tokens=False)["input_ids"]
    in_context = chat.answer_ids(s)
    assert fast.convert_ids_to_tokens(alone)[0] == "▁A" and fast.convert_ids_to_tokens(in_context)[0] == "A"
    batch = chat([s])
    ids, labels = _row(batch, 0)
    assert labels[labels != IGNORE_INDEX].tolist() == in_context
    whole = processor(text=[chat.prompt_text(s) + chat.answer_text(s)], images=[_pil(s.image)], return_tensors="pt")
    assert torch.equal(ids, whole["input_ids"][0])  # exactly the processor's encoding of the conversation
