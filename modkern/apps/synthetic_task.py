"""A synthetic modality-interference task, generated in code (no downloads).

Two kinds of items share one answer vocabulary (colour words):

* image-heavy - ``caption : a red picture . question : what colour is the picture ? answer :``
  The image (a noisy solid colour) decides the answer. During training the caption names the
  image's colour with probability ``caption_agree`` (default 0.9), so a plain fine-tune can reach
  that accuracy by copying the caption - the shortcut that modality interference exploits.
* text-heavy - ``note : the word is blue . question : what word does the note say ? answer :``
  The note decides the answer; the image is irrelevant, but shows the same colour with
  probability ``image_agree`` during training.

Evaluation sets (:meth:`InterferenceTask.eval_sets`): image-heavy ``clean`` (agreeing caption),
``misleading_text`` (the caption names another colour), ``unrelated_text`` (an unrelated fact
naming another colour, about objects never seen in training, in place of the caption), and
text-heavy ``text_clean`` (agreeing image), ``text_swapped_image`` (the image of another colour)
and ``text_blank_image`` (a black image); and the held-out interference ``misleading_note``:
image-heavy items whose context is a *note* naming another colour for the picture
(:data:`MISLEADING_NOTE`), a template that the heuristic augmentation never uses
(:meth:`InterferenceTask.augment_config` refuses it), so it measures generalization beyond the
heuristics.

:class:`WordTokenizer` is a tiny word-level tokenizer built from the task's own words;
:class:`TaskEncoder` turns a :class:`~modkern.objective.augment.Sample` into ``(input_ids, labels)`` with the
image placeholder repeated once per image feature, as the LLaVA processor does.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import torch

from modkern.constants import IGNORE_INDEX
from modkern.objective.augment import AugmentConfig, Sample

_WORD = re.compile(r"<[a-z_]+>|\w+|[^\w\s]")


class WordTokenizer:
    """Lower-cased word / punctuation tokenizer over a fixed vocabulary.

    Layout (the one :mod:`modkern.apps.tiny_models` models expect): ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2,
    ``<unk>`` 3, the words, and the image placeholder ``<image>`` last (``len(tokenizer) - 1``).
    Words outside the vocabulary map to ``<unk>``.
    """

    SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
    IMAGE = "<image>"

    def __init__(self, words: Iterable[str]):
        vocab = list(self.SPECIALS)
        seen = set(vocab) | {self.IMAGE}
        for w in words:
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        vocab.append(self.IMAGE)
        self.vocab = vocab
        self.token_to_id = {w: i for i, w in enumerate(vocab)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> WordTokenizer:
        return cls(w for t in texts for w in cls.split(t))

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def __len__(self) -> int:
        return len(self.vocab)

    pad_token_id = property(lambda self: self.token_to_id["<pad>"])
    bos_token_id = property(lambda self: self.token_to_id["<s>"])
    eos_token_id = property(lambda self: self.token_to_id["</s>"])
    unk_token_id = property(lambda self: self.token_to_id["<unk>"])
    image_token_id = property(lambda self: self.token_to_id[self.IMAGE])

    def encode(self, text: str) -> list[int]:
        unk = self.unk_token_id
        return [self.token_to_id.get(w, unk) for w in self.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"vocab": self.vocab}, f)

    @classmethod
    def load(cls, path) -> WordTokenizer:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)["vocab"]
        if tuple(vocab[: len(cls.SPECIALS)]) != cls.SPECIALS or vocab[-1] != cls.IMAGE:
            raise ValueError(f"{path}: not a WordTokenizer vocabulary (special tokens differ)")
        return cls(vocab[len(cls.SPECIALS) : -1])


@dataclass
class TaskEncoder:
    """``encode(sample) -> (input_ids, labels)``: ``[bos] <image>*n prompt answer``.

    ``tokenizer`` needs ``encode(text) -> list[int]`` (a :class:`WordTokenizer`, or a Hugging Face
    tokenizer through :func:`hf_text_encoder`). Labels are ``-100`` except on the answer tokens.
    ``bos_token_id=None`` leaves the start token out; ``num_image_tokens`` is the number of image
    features the model puts in the placeholder slots (0 for text-only models).
    """

    encode_text: object
    image_token_id: Optional[int]
    num_image_tokens: int
    bos_token_id: Optional[int] = None

    def __call__(self, sample: Sample) -> tuple[list[int], list[int]]:
        ids = [] if self.bos_token_id is None else [self.bos_token_id]
        if sample.image is not None and self.num_image_tokens > 0:
            if self.image_token_id is None:
                raise ValueError("image_token_id: the sample has an image but the encoder has no image token")
            ids += [self.image_token_id] * self.num_image_tokens
        ids += self.encode_text(sample.prompt)
        answer = self.encode_text(" " + sample.answer)
        if not answer:
            raise ValueError(f"answer {sample.answer!r} encodes to no tokens")
        return ids + answer, [IGNORE_INDEX] * len(ids) + answer


def hf_text_encoder(tokenizer):
    """``encode(text) -> ids`` for a Hugging Face tokenizer, without special tokens."""
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


# --- the task ---------------------------------------------------------------------------------

COLOURS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "purple": (0.6, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
TRAIN_OBJECTS = ("car", "door", "ball", "hat", "boat", "lamp")
EVAL_OBJECTS = ("kite", "cup", "shirt", "bike")

IMAGE_QUESTION = "question : what colour is the picture ? answer :"
TEXT_QUESTION = "question : what word does the note say ? answer :"
CAPTION = "caption : a {label} picture ."
NOTE = "note : the word is {label} ."
FACT = "fact : the {obj} is {label} ."
# Heuristic augmentation texts for this task: the related sentence of the paper's copy (naming any
# colour, the right one included: "This picture seems to depict a {option}."), and the misleading one
# of the earlier misleading_text transform (a wrong colour).
RELATED = "hint : it looks {option} ."
HINT = "hint : it looks {label} ."
# A held-out distractor of another form: a list of unrelated words (objects and colours) in front of
# the caption; no training text is a list.
WORD_LIST = "list : {words} ."
# The held-out interference: misleading text in a template the augmentation never shows in training,
# in the form of the text-heavy items' note but about the picture (every word is a training word).
MISLEADING_NOTE = "note : the picture is {label} ."


def _fill(template: str, holes) -> str:
    for hole in holes:
        template = template.replace(hole, "")
    return template


def is_misleading_note(context: str) -> bool:
    """Whether ``context`` is the held-out misleading note (:data:`MISLEADING_NOTE`, any label)."""
    head, tail = MISLEADING_NOTE.split("{label}")
    return context.startswith(head) and context.endswith(tail) and len(context) > len(head) + len(tail)


@dataclass
class TaskConfig:
    """Sizes and difficulty of :class:`InterferenceTask`.

    ``caption_rate``: share of the image-heavy items (training and the clean evaluation items) that
    carry a caption (1: every one, the shortcut setting; 0: none, as the official image-heavy data,
    which has no text about the image: a caption then only appears as an interference);
    ``caption_agree``: probability that a training caption names the image's colour;
    ``image_agree``: probability that a text-heavy training image shows the note's colour;
    ``text_heavy_fraction``: share of text-heavy items in the training set; ``image_noise``: std
    of the pixel noise; ``contrast``: colour strength (pixels are ``0.5 + contrast * (rgb - 0.5)``).
    """

    num_colours: int = 4
    image_size: int = 16
    channels: int = 3
    train_size: int = 4000
    eval_size: int = 200
    caption_rate: float = 1.0
    caption_agree: float = 0.9
    image_agree: float = 0.9
    text_heavy_fraction: float = 0.3
    image_noise: float = 0.6
    contrast: float = 0.3
    layout: str = "quadrant"
    seed: int = 0

    def __post_init__(self):
        if self.layout not in ("quadrant", "solid"):
            raise ValueError(f"layout must be 'quadrant' or 'solid', got {self.layout!r}")
        if self.image_size % 2:
            raise ValueError(f"image_size must be even, got {self.image_size}")
        if not 2 <= self.num_colours <= len(COLOURS):
            raise ValueError(f"num_colours must lie in [2, {len(COLOURS)}], got {self.num_colours}")
        for name in ("caption_rate", "caption_agree", "image_agree", "text_heavy_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")


class InterferenceTask:
    """Generates the training set, the evaluation sets and the vocabulary of the task."""

    def __init__(self, config: Optional[TaskConfig] = None):
        self.config = config or TaskConfig()
        self.colours = tuple(list(COLOURS)[: self.config.num_colours])

    # -- pieces --
    def _rgb(self, colour: str) -> torch.Tensor:
        c = self.config
        rgb = torch.tensor(COLOURS[colour], dtype=torch.float32)
        rgb = rgb.repeat(c.channels // 3 + 1)[: c.channels]  # more than 3 channels: repeat the colour
        return 0.5 + c.contrast * (rgb - 0.5)

    def image(self, colour: str, gen: torch.Generator) -> torch.Tensor:
        """``[C, S, S]`` in [0, 1]: ``colour`` in the top-left quadrant (the whole image when
        ``layout == "solid"``), random colours in the other quadrants, plus pixel noise."""
        c = self.config
        s, h = c.image_size, c.image_size // 2
        img = self._rgb(colour)[:, None, None].repeat(1, s, s)
        if c.layout == "quadrant":
            for top, left in ((0, h), (h, 0), (h, h)):
                other = self.colours[int(torch.randint(len(self.colours), (1,), generator=gen))]
                img[:, top : top + h, left : left + h] = self._rgb(other)[:, None, None]
        noise = c.image_noise * torch.randn((c.channels, s, s), generator=gen)
        return (img + noise).clamp_(0.0, 1.0)

    def other(self, colour: str, rng: random.Random) -> str:
        return rng.choice([c for c in self.colours if c != colour])

    def image_heavy(self, colour: str, caption: Optional[str], gen, context: Optional[str] = None, tag="clean"):
        """An image-heavy item; ``context`` (when given) replaces the caption, ``caption=None`` and no
        ``context``: no text in front of the question."""
        if context is None:
            context = "" if caption is None else CAPTION.format(label=caption)
        ctx = context
        return Sample(IMAGE_QUESTION, colour, self.image(colour, gen), "image_heavy", context=ctx, tag=tag)

    def text_heavy(self, word: str, image_colour: Optional[str], gen, tag="clean"):
        image = self.image(image_colour, gen) if image_colour is not None else None
        return Sample(TEXT_QUESTION, word, image, "text_heavy", context=NOTE.format(label=word), tag=tag)

    # -- sets --
    def train_set(self) -> list[Sample]:
        c = self.config
        rng = random.Random(c.seed)
        gen = torch.Generator().manual_seed(c.seed)
        out = []
        for _ in range(c.train_size):
            colour = rng.choice(self.colours)
            if rng.random() < c.text_heavy_fraction:
                shown = colour if rng.random() < c.image_agree else self.other(colour, rng)
                out.append(self.text_heavy(colour, shown, gen))
            else:
                caption = colour if rng.random() < c.caption_agree else self.other(colour, rng)
                if c.caption_rate < 1.0 and rng.random() >= c.caption_rate:
                    caption = None
                out.append(self.image_heavy(colour, caption, gen))
        return out

    def eval_sets(self, size: Optional[int] = None) -> dict[str, list[Sample]]:
        c = self.config
        n = c.eval_size if size is None else size
        rng = random.Random(c.seed + 1_000_003)
        gen = torch.Generator().manual_seed(c.seed + 1_000_003)
        colours = [self.colours[i % len(self.colours)] for i in range(n)]  # balanced classes
        sets = {
            "clean": [self.image_heavy(k, k if c.caption_rate > 0 else None, gen) for k in colours],
            "misleading_text": [self.image_heavy(k, self.other(k, rng), gen, tag="misleading_text") for k in colours],
            "unrelated_text": [
                self.image_heavy(
                    k, None, gen, FACT.format(obj=rng.choice(EVAL_OBJECTS), label=self.other(k, rng)), "unrelated_text"
                )
                for k in colours
            ],
            "text_clean": [self.text_heavy(k, k, gen) for k in colours],
            "text_swapped_image": [self.text_heavy(k, self.other(k, rng), gen, "swap_image") for k in colours],
        }
        blank = []
        for s in sets["text_clean"]:
            blank.append(Sample(s.text, s.answer, torch.zeros_like(s.image), s.kind, context=s.context, tag="black"))
        sets["text_blank_image"] = blank
        # Held out (made last, so the other sets' random draws do not depend on it).
        sets["misleading_note"] = [
            self.image_heavy(k, None, gen, MISLEADING_NOTE.format(label=self.other(k, rng)), "misleading_note")
            for k in colours
        ]
        return sets

    def augment_config(self, **overrides) -> AugmentConfig:
        """The paper's heuristic augmentation in this task's words: for image-heavy items a related
        sentence naming any colour (:data:`RELATED`) and a paragraph of facts about training objects
        (10 by default); for text-heavy items a noise clean image and swapped / black / white image
        copies. The held-out :data:`MISLEADING_NOTE` and :data:`WORD_LIST` forms are never among the
        texts (a ``ValueError`` if ``overrides`` put them there)."""
        facts = tuple(FACT.format(obj=o, label=k) for o in TRAIN_OBJECTS for k in self.colours)
        kwargs = dict(
            classes=self.colours,
            related_templates=(RELATED,),
            irrelevant_sentences=facts,
            misleading_templates=(CAPTION, HINT),
            unrelated_facts=facts,
        )
        kwargs.update(overrides)
        config = AugmentConfig(**kwargs)
        texts = [*config.related_templates, *config.irrelevant_sentences, *config.misleading_templates]
        texts += config.unrelated_facts
        held_out = WORD_LIST.split("{words}")[0]
        if any(t == MISLEADING_NOTE or is_misleading_note(t) or t.startswith(held_out) for t in texts):
            raise ValueError(
                f"augment_config: {MISLEADING_NOTE!r} and {WORD_LIST!r} are the held-out interferences "
                "(evaluation only); the augmentation must not use them"
            )
        return config

    def words(self) -> list[str]:
        texts = [IMAGE_QUESTION, TEXT_QUESTION, CAPTION, NOTE, FACT, HINT, MISLEADING_NOTE, WORD_LIST, ","]
        texts += list(COLOURS) + list(TRAIN_OBJECTS) + list(EVAL_OBJECTS)
        holes = ("{label}", "{obj}", "{option}", "{words}")
        return [w for t in texts for w in WordTokenizer.split(_fill(t, holes))]

    def tokenizer(self) -> WordTokenizer:
        return WordTokenizer(self.words())
