"""Batches for the tiny models of :mod:`modkern.apps.tiny_models` (tests only).

``make_batch(info, ...)`` builds a right-padded batch for the model ``info`` describes:
``[BOS, 2 prompt tokens, (image block), prompt tokens, answer tokens, padding]`` with labels only
on the answer tokens, random ids and images from a seeded generator. The image block is LLaVA's
placeholders, or Qwen2-VL's ``<vision_start> placeholders <vision_end>`` (with ``pixel_values``,
``image_grid_thw`` and ``mm_token_type_ids``); the text-only model has none.
"""

from __future__ import annotations

import json
import math
import socket

import torch
from PIL import Image

from modkern.apps.tiny_models import qwen2_vl_pixel_values
from modkern.media import write_wav
from modkern.objective.robust import SAMPLE_KINDS as KINDS  # noqa: F401 (re-exported for the tests)


def make_sample_ids(info, prompt_len, answer, gen):
    lo, hi = info["text_token_range"]
    rand = lambda n: torch.randint(lo, hi, (n,), generator=gen)
    parts = [torch.tensor([info["bos_token_id"]]), rand(2)]
    if info["kind"] == "llava":
        parts.append(torch.full((info["num_image_tokens"],), info["image_token_id"]))
    elif info["kind"] == "qwen2_vl":
        parts += [
            torch.tensor([info["vision_start_token_id"]]),
            torch.full((info["num_image_tokens"],), info["image_token_id"]),
            torch.tensor([info["vision_end_token_id"]]),
        ]
    parts.append(rand(prompt_len))
    prompt = torch.cat(parts)
    answer = torch.as_tensor(answer, dtype=torch.long)
    return prompt, answer


def collate(prompts, answers, info, images=None, kinds=None, ref_index=None):
    """Right-pad (prompt + answer) sequences into a batch with labels on the answers."""
    lengths = [len(p) + len(a) for p, a in zip(prompts, answers)]
    length = max(lengths)
    n = len(prompts)
    input_ids = torch.full((n, length), info["pad_token_id"], dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        seq = torch.cat([p, a])
        input_ids[i, : len(seq)] = seq
        labels[i, len(p) : len(seq)] = a
        attention_mask[i, : len(seq)] = 1
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    if info["kind"] == "llava":
        batch["pixel_values"] = images
    elif info["kind"] == "qwen2_vl":
        batch["pixel_values"], batch["image_grid_thw"] = qwen2_vl_pixel_values(images, info)
        batch["mm_token_type_ids"] = (input_ids == info["image_token_id"]).to(torch.int32)
    if kinds is not None:
        batch["sample_kind"] = list(kinds)
    if ref_index is not None:
        batch["ref_index"] = torch.as_tensor(ref_index, dtype=torch.long)
    return batch


def make_batch(info, batch_size=4, *, seed=0, kinds=None, prompt_lens=None, answer_lens=None, copies=()):
    """A random batch; ``copies`` = ((source, new_prompt_len), ...) appends heuristic-style copies.

    A copy keeps its source's answer and image but gets a new random prompt of another length;
    ``ref_index`` is returned when there are copies.
    """
    gen = torch.Generator().manual_seed(seed)
    prompt_lens = prompt_lens or [3 + (i % 3) for i in range(batch_size)]
    answer_lens = answer_lens or [1 + (i % 3) for i in range(batch_size)]
    lo, hi = info["text_token_range"]
    prompts, answers = [], []
    for i in range(batch_size):
        ans = torch.randint(lo, hi, (answer_lens[i],), generator=gen)
        p, a = make_sample_ids(info, prompt_lens[i], ans, gen)
        prompts.append(p)
        answers.append(a)
    images = None
    if info["kind"] != "llama":
        s = info["image_size"]
        images = torch.randn(batch_size, 3, s, s, generator=gen)
    ref_index = None
    if copies:
        ref_index = list(range(batch_size))
        extra = []
        for src, plen in copies:
            p, a = make_sample_ids(info, plen, answers[src], gen)
            prompts.append(p)
            answers.append(a)
            ref_index.append(src)
            extra.append(src)
        if images is not None:
            images = torch.cat([images, images[extra]])
        if kinds is not None:
            kinds = list(kinds) + [kinds[src] for src in extra]
    return collate(prompts, answers, info, images=images, kinds=kinds, ref_index=ref_index)


def split_batch(batch, index):
    """Rows ``index`` of a batch made by :func:`make_batch` (LLaVA / text-only models)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v[index]
        elif isinstance(v, list):
            out[k] = [v[i] for i in index]
    return out


def rows_dataset(batch):
    """A map-style dataset (list of per-sample dicts) from a batch made by :func:`make_batch`.

    Qwen2-VL's ``pixel_values`` (rows of patches) are split per image by ``image_grid_thw``.
    """
    n = batch["input_ids"].shape[0]
    per_image = None
    if "image_grid_thw" in batch:
        per_image = batch["image_grid_thw"].prod(-1).tolist()
        patches = torch.split(batch["pixel_values"], per_image)
    items = []
    for i in range(n):
        item = {}
        for k, v in batch.items():
            if k == "pixel_values" and per_image is not None:
                item[k] = patches[i]
            elif isinstance(v, (torch.Tensor, list)):
                item[k] = v[i]
        items.append(item)
    return items


CAT_KEYS = ("image_grid_thw",)


def collate_rows(items):
    """Inverse of :func:`rows_dataset` (a Trainer ``data_collator``); ``ref_index`` is dropped
    (its values index the full batch)."""
    out = {}
    qwen = "image_grid_thw" in items[0]
    for k in items[0]:
        vals = [it[k] for it in items]
        if k == "ref_index":
            continue
        if isinstance(vals[0], str):
            out[k] = vals
        elif (k == "pixel_values" and qwen) or k in CAT_KEYS:
            out[k] = torch.cat([v.reshape(-1, v.shape[-1]) if k in CAT_KEYS else v for v in vals])
        else:
            out[k] = torch.stack(vals)
    return out


# Plain SGD at a constant rate (no weight decay, no clipping): parameter updates that a test can
# reproduce by hand or compare across runs.
PLAIN_SGD = dict(optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0)


def training_args(output_dir, **kw):
    """``TrainingArguments`` for the tiny models' Trainer tests: CPU, no saving, no reporting, no
    tqdm, the batch's own columns kept (``sample_kind``, ``ref_index``); ``kw`` overrides."""
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


# --- data files (the processor path) ---------------------------------------------------------------

OPTIONS = "Option:\nA: red\nB: green\nC: blue"
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def write_data(folder, n_per_kind: int = 2) -> str:
    """A JSONL data file of ``n_per_kind`` image-heavy, text-heavy (one without an image) and VQA
    samples, with PNG and JPEG images of different sizes; returns its path."""
    (folder / "img").mkdir(exist_ok=True)
    rows = []
    names = list(COLOURS)
    for i in range(n_per_kind):
        colour = names[i % 3]
        ext = "png" if i % 2 == 0 else "jpg"
        Image.new("RGB", (20 + 3 * i, 18), COLOURS[colour]).save(folder / "img" / f"{colour}{i}.{ext}")
        letter = "ABC"[i % 3]
        image = f"img/{colour}{i}.{ext}"
        rows.append(
            dict(
                type="image_heavy",
                image=image,
                question=f"Question:\nWhat colour is the image?\n{OPTIONS}",
                answer=letter,
            )
        )
        note = dict(
            type="text_heavy", question=f"The object is {colour}. Question:\nWhat colour is the object?\n{OPTIONS}"
        )
        rows.append({**note, "answer": letter, **({"image": image} if i else {})})
        rows.append(dict(type="VQA", image=image, question=f"Question:\nWhich colour?\n{OPTIONS}", answer=letter))
    path = folder / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


AV_WORDS = ["What", "colour", "is", "the", "sound", "video", "Do", "and", "show", "same", "yes", "no", "caption"]
AV_WORDS += ["red", "green", "blue", "Question", "Option", "A", "B", "C"]
TONES = {"red": 440, "green": 880, "blue": 660}  # Hz


def write_clip(folder, name: str, colour, sound: str, gif: bool) -> tuple:
    """A 2-frame clip of ``colour`` (an animated GIF, or a folder of PNG frames) and a 0.5 s WAV at
    8 kHz of ``sound``'s tone; returns their paths relative to ``folder``."""
    frames = [Image.new("RGB", (20, 24), colour) for _ in range(2)]
    frames[1].putpixel((0, 0), (128, 128, 128))  # distinct frames (a GIF writer merges equal ones)
    if gif:
        video = folder / f"{name}.gif"
        frames[0].save(video, save_all=True, append_images=frames[1:], duration=100)
    else:
        video = folder / name
        video.mkdir()
        for k, f in enumerate(frames):
            f.save(video / f"frame_{k}.png")
    t = torch.arange(4000) / 8000.0
    write_wav(folder / f"{name}.wav", 0.5 * torch.sin(2 * math.pi * TONES[sound] * t), 8000)
    return video.name, f"{name}.wav"


def write_av_data(folder) -> str:
    """A JSONL data file of 3 clips (frames of one colour, the tone of the next one), each with a
    visual and a sound question (options A-C, the answer a letter), and one question about both
    streams; returns its path."""
    rows = []
    names = list(COLOURS)
    for k, colour in enumerate(names):
        sound = names[(k + 1) % 3]
        video, audio = write_clip(folder, f"clip{k}", COLOURS[colour], sound, gif=k % 2 == 0)
        clip = dict(type="audio_video", video=video, audio=audio, audio_label=sound, visual_label=colour)
        for modality, label in (("visual", colour), ("audio", sound)):
            stream = "video" if modality == "visual" else "sound"
            question = f"Question:\nWhat colour is the {stream}?\n{OPTIONS}"
            rows.append({**clip, "modality": modality, "question": question, "answer": "ABC"[names.index(label)]})
    both = "Question:\nDo the video and the sound show the same colour?\nOption:\nA: yes\nB: no"
    rows.append({**clip, "modality": "both", "question": both, "answer": "B"})
    path = folder / "av.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def free_port() -> int:
    """A TCP port free on localhost now (for a torchrun rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
