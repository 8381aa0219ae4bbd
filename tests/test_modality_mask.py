"""modality_mask: vectorized version against the token-by-token reference, on LLaVA-style and
Qwen-style sequences with answers and padding, plus per-batch / per-sample selections."""

import pytest
import torch
from conftest import DEVICE

import modkern
from modkern.ops.perturb.mask import selector_names
from modkern.ops.perturb.reference import modality_mask_rows

IMAGE = 32000  # LLaVA-1.5's <image>
PAD = 0
Q_IMAGE, Q_VIDEO, Q_START, Q_END = 151655, 151656, 151652, 151653  # Qwen2-VL ids
Q_PAD = 151643


def llava_batch():
    """Three samples: right padding, left padding, no image; answers labelled, the rest -100."""
    rows = [
        ([1, 319, 1110] + [IMAGE] * 5 + [29871, 2], [450, 7, 2], 2, "right"),
        ([1, 3148] + [IMAGE] * 5 + [13], [319, 2], 4, "left"),
        ([1, 319, 1110, 3148, 29871, 13, 13], [4874, 29889, 2], 0, "right"),
    ]
    length = max(len(p) + len(a) + pad for p, a, pad, _ in rows)
    ids, labels, attn = [], [], []
    for prompt, answer, _, side in rows:
        seq = prompt + answer
        lab = [-100] * len(prompt) + answer
        fill = length - len(seq)
        if side == "right":
            ids.append(seq + [PAD] * fill), labels.append(lab + [-100] * fill), attn.append([1] * len(seq) + [0] * fill)
        else:
            ids.append([PAD] * fill + seq), labels.append([-100] * fill + lab), attn.append([0] * fill + [1] * len(seq))
    t = lambda x: torch.tensor(x, device=DEVICE)  # noqa: E731
    return t(ids), t(labels), t(attn)


def qwen_batch():
    """Image and video blocks wrapped in <|vision_start|> / <|vision_end|>, padding, answers."""
    im = [Q_START] + [Q_IMAGE] * 4 + [Q_END]
    vid = [Q_START] + [Q_VIDEO] * 6 + [Q_END]
    rows = [
        ([151644, 872, 198] + im + [3838, 374, 30, 151645, 198], [32, 151645]),
        ([151644, 872, 198] + vid + im + [3838, 151645, 198], [33, 13, 151645]),
        ([151644, 872, 198, 3838, 374, 279, 151645, 198], [34, 151645]),
    ]
    length = max(len(p) + len(a) for p, a in rows) + 1
    ids, labels, attn = [], [], []
    for prompt, answer in rows:
        seq = prompt + answer
        fill = length - len(seq)
        ids.append(seq + [Q_PAD] * fill)
        labels.append([-100] * len(prompt) + answer + [-100] * fill)
        attn.append([1] * len(seq) + [0] * fill)
    t = lambda x: torch.tensor(x, device=DEVICE)  # noqa: E731
    return t(ids), t(labels), t(attn)


LLAVA_IDS = {"image": IMAGE}
QWEN_IDS = {"image": Q_IMAGE, "video": [Q_VIDEO]}
QWEN_MARKERS = (Q_START, Q_END)


def check(input_ids, perturb, selections, token_ids, labels=None, attention_mask=None, exclude_ids=()):
    got = modkern.modality_mask(
        input_ids,
        perturb=perturb,
        token_ids=token_ids,
        labels=labels,
        attention_mask=attention_mask,
        exclude_ids=exclude_ids,
    )
    ids = {k: [v] if isinstance(v, int) else list(v) for k, v in token_ids.items()}
    expected = modality_mask_rows(input_ids.cpu(), selections, ids, labels, attention_mask, exclude_ids)
    assert got.dtype == torch.bool and got.shape == input_ids.shape and got.device == input_ids.device
    assert torch.equal(got.cpu(), expected.cpu())
    return got


def test_llava_per_sample_paper_rule():
    ids, labels, attn = llava_batch()
    got = check(ids, ["text", "image", "none"], [{"text"}, {"image"}, set()], LLAVA_IDS, labels, attn)
    # Spelled out for sample 0: text tokens are the prompt's non-image tokens only.
    assert got[0].tolist()[:10] == [True, True, True] + [False] * 5 + [True, True]
    assert not got[0, 10:].any()  # answer + padding
    assert got[1].sum() == 5 and (ids[1][got[1]] == IMAGE).all()
    assert not got[2].any()


@pytest.mark.parametrize(
    "perturb,selection",
    [("text", {"text"}), ("image", {"image"}), ("none", set()), (("text", "image"), {"text", "image"})],
)
def test_llava_per_batch(perturb, selection):
    ids, labels, attn = llava_batch()
    check(ids, perturb, [selection] * 3, LLAVA_IDS, labels, attn)


def test_llava_without_labels_or_attention_mask():
    ids, labels, attn = llava_batch()
    check(ids, "text", [{"text"}] * 3, LLAVA_IDS)  # answers and padding count as text then
    check(ids, "text", [{"text"}] * 3, LLAVA_IDS, labels=labels)
    check(ids, "text", [{"text"}] * 3, LLAVA_IDS, attention_mask=attn)


def test_qwen_markers_are_not_text():
    ids, labels, attn = qwen_batch()
    got = check(ids, "text", [{"text"}] * 3, QWEN_IDS, labels, attn, exclude_ids=QWEN_MARKERS)
    for marker in (*QWEN_MARKERS, Q_IMAGE, Q_VIDEO, Q_PAD):
        assert not got[ids == marker].any()
    # Without exclude_ids the markers would count as text.
    plain = modkern.modality_mask(ids, perturb="text", token_ids=QWEN_IDS, labels=labels, attention_mask=attn)
    assert plain[ids == Q_START].all()


def test_qwen_per_sample_lists_and_codes():
    ids, labels, attn = qwen_batch()
    sels = [{"image", "video"}, {"video"}, {"text"}]
    check(ids, [("image", "video"), "video", ["text"]], sels, QWEN_IDS, labels, attn, QWEN_MARKERS)
    names = selector_names(QWEN_IDS)
    assert names == ("none", "text", "image", "video")
    codes = torch.tensor([names.index("image"), names.index("none"), names.index("text")], device=DEVICE)
    check(ids, codes, [{"image"}, set(), {"text"}], QWEN_IDS, labels, attn, QWEN_MARKERS)


def test_many_modalities_random_sequences():
    """Image, video, audio and depth placeholders with several ids each, random selections."""
    gen = torch.Generator().manual_seed(0)
    token_ids = {"image": [900, 901], "video": 902, "audio": (903, 904, 905), "depth": torch.tensor([906])}
    B, L = 16, 48
    ids = torch.randint(890, 910, (B, L), generator=gen)
    labels = torch.where(torch.rand(B, L, generator=gen) < 0.2, ids, torch.full_like(ids, -100))
    attn = (torch.rand(B, L, generator=gen) < 0.9).long()
    choices = ["none", "text", "image", "video", "audio", "depth"]
    sels, perturb = [], []
    for _ in range(B):
        k = int(torch.randint(0, 3, (1,), generator=gen))
        picked = {choices[int(i)] for i in torch.randint(1, 6, (k,), generator=gen)}
        sels.append(picked)
        perturb.append(tuple(picked) if picked else "none")
    to = lambda x: x.to(DEVICE)  # noqa: E731
    check(to(ids), perturb, sels, token_ids, to(labels), to(attn), exclude_ids=[908])


def test_compiles_per_batch():
    ids, labels, attn = qwen_batch()
    fn = lambda i, lab, a: modkern.modality_mask(  # noqa: E731
        i, perturb="text", token_ids=QWEN_IDS, labels=lab, attention_mask=a, exclude_ids=QWEN_MARKERS
    )
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(ids, labels, attn), fn(ids, labels, attn))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(perturb="audio"), ValueError, "perturb"),
        (dict(perturb=["text", "image"]), ValueError, "perturb"),  # 2 entries for 3 rows
        (dict(perturb=["text", "image", "sound"]), ValueError, r"perturb\[2\]"),
        (dict(perturb=3), TypeError, "perturb"),
        (dict(perturb=torch.tensor([0, 1, 9])), ValueError, "perturb"),
        (dict(perturb=torch.tensor([0.0, 1.0, 1.0])), ValueError, "perturb"),
        (dict(token_ids={"text": 5}), ValueError, "token_ids"),
        (dict(token_ids={"image": 5, "video": [6, 5]}), ValueError, "token_ids"),
        (dict(token_ids={"image": 5.0}), TypeError, "token_ids"),
        (dict(token_ids=[IMAGE]), TypeError, "token_ids"),
        (dict(exclude_ids=[IMAGE]), ValueError, "exclude_ids"),
        (dict(labels=torch.zeros(3, 2, dtype=torch.long)), ValueError, "labels"),
        (dict(attention_mask=torch.ones(2, 3)), ValueError, "attention_mask"),
        (dict(input_ids=torch.zeros(3, 4)), ValueError, "input_ids"),
        (dict(input_ids=torch.zeros(3, 4, dtype=torch.bool)), ValueError, "input_ids"),
        (dict(input_ids=torch.zeros(12, dtype=torch.long)), ValueError, "input_ids"),
    ],
)
def test_bad_input(kwargs, error, match):
    ids, _, _ = llava_batch()
    call = dict(input_ids=ids, perturb="text", token_ids=LLAVA_IDS)
    call.update(kwargs)
    with pytest.raises(error, match=match):
        modkern.modality_mask(call.pop("input_ids"), **call)
