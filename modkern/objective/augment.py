"""Heuristic augmentation for modality-robust fine-tuning (the paper's data side).

Every sample has a *kind* that says which modality carries the answer. By default the copies are
the official code's (``LlavaDataset`` of the paper's repository):

* ``"image_heavy"`` - the answer is in the image; the text may mislead. Two copies, each with a
  text right before the question (after the sample's ``context``, kept): a related sentence,
  ``"This picture seems to depict a {option}."`` with an option drawn from all the classes (it may
  name the right one) or the sample's first ``facts`` entry when it has one (``related_text``); and
  a paragraph of 10 sentences drawn with replacement from a pool of 88 irrelevant or false
  statements (``unrelated_paragraph``, :data:`modkern.objective.distractors.IRRELEVANT_SENTENCES`).
* ``"text_heavy"`` - the answer is in the text; the image is irrelevant. The clean sample's image is
  replaced by uniform noise (so the real image is no shortcut), and three copies get another
  sample's image, a black and a white image.
* ``"vqa"`` - both matter; no copies.

The kinds and number of copies are options of :class:`AugmentConfig` (the earlier transforms
``misleading_text`` - a wrong class in the context slot -, ``unrelated_text`` - one fact - and
``noise_image`` stay available). A copy keeps the answer of its clean sample, so its answer tokens
(and the rows the consistency loss compares) pair up one-to-one with the clean sample's.
:class:`RobustCollator` puts the clean samples first and the copies after them, and returns
``ref_index`` (each row's clean sample, itself for clean samples) and ``sample_kind`` (copies keep
their source's kind) next to the usual ``input_ids`` / ``attention_mask`` / ``labels`` /
``pixel_values``: the batch format of :func:`modkern.objective.robust.robust_loss`.

Example::

    aug = HeuristicAugmenter(AugmentConfig(classes=("cat", "dog")), seed=0)
    collate = RobustCollator(encode, augmenter=aug, pad_token_id=0)
    batch = collate([Sample("What animal is this?", "cat", image, "image_heavy")])
    # batch["ref_index"] == tensor([0, 0, 0]); batch["sample_kind"] == ["image_heavy"] * 3
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from modkern.constants import IGNORE_INDEX
from modkern.objective.distractors import IRRELEVANT_SENTENCES
from modkern.objective.robust import SAMPLE_KINDS

TEXT_TRANSFORMS = ("related_text", "unrelated_paragraph", "misleading_text", "unrelated_text")
IMAGE_TRANSFORMS = ("swap_image", "black_image", "white_image", "noise_image")
# The official copies: both texts for image-heavy samples, three images for text-heavy ones.
PAPER_TEXT_TRANSFORMS = ("related_text", "unrelated_paragraph")
PAPER_IMAGE_TRANSFORMS = ("swap_image", "black_image", "white_image")
RELATED_TEMPLATES = ("This picture seems to depict a {option}.",)


@dataclass(frozen=True)
class Sample:
    """One training or evaluation item.

    ``text`` is the question (the prompt after the image placeholder and the context),
    ``answer`` the target text, ``image`` a ``[C, H, W]`` float tensor with values in [0, 1] (or
    ``None``), ``kind`` one of :data:`SAMPLE_KINDS`, ``label`` the answer's class name (used to pick
    a *wrong* class for misleading text; defaults to ``answer``), ``context`` optional text in
    front of the question (a caption, a fact; text augmentations write here) and ``tag`` a
    free-form name of how the sample was made ("clean", "misleading_text", ...), ``facts`` texts
    about the image naming a wrong option (the first is the ``related_text`` copy's) and
    ``options`` the sample's own answer options (``related_text`` names one of them; the
    ``classes`` of :class:`AugmentConfig` when empty). The prompt is ``context + " " + text``.
    """

    text: str
    answer: str
    image: Optional[Tensor] = None
    kind: str = "vqa"
    label: Optional[str] = None
    context: str = ""
    tag: str = "clean"
    facts: tuple = ()
    options: tuple = ()

    def __post_init__(self):
        if self.kind not in SAMPLE_KINDS:
            raise ValueError(f"kind must be one of {SAMPLE_KINDS}, got {self.kind!r}")

    @property
    def target_class(self) -> str:
        return self.answer if self.label is None else self.label

    @property
    def prompt(self) -> str:
        return f"{self.context} {self.text}" if self.context else self.text


DEFAULT_MISLEADING = ("The image shows {label}.", "This is a picture of {label}.")
DEFAULT_FACTS = (
    "The Eiffel Tower is in Paris.",
    "Water boils at one hundred degrees.",
    "A week has seven days.",
    "Bees make honey.",
)


@dataclass
class AugmentConfig:
    """Which heuristic copies to make (defaults: the official code's).

    ``text_transforms`` (image-heavy samples) and ``image_transforms`` (text-heavy samples) name
    the copies; ``copies_per_sample=None`` makes one of each (the paper), an int draws that many
    distinct ones per sample; each sample gets copies with probability ``prob``.
    ``noise_clean_image`` replaces a text-heavy clean sample's image by uniform noise.
    ``classes`` are the answer options of ``related_text`` for samples without ``options`` of
    their own (any of them, the right one included) and the candidate wrong labels of
    ``misleading_text`` (a sample's own class excluded).
    ``related_templates`` (``{option}``), ``irrelevant_sentences`` with ``paragraph_sentences`` per
    paragraph (``unrelated_paragraph``), ``misleading_templates`` (``{label}``) and
    ``unrelated_facts`` are the texts. ``noise_std`` is the std of the ``noise_image`` copy's
    Gaussian noise around 0.5 (clamped to [0, 1]).
    """

    text_transforms: tuple[str, ...] = PAPER_TEXT_TRANSFORMS
    image_transforms: tuple[str, ...] = PAPER_IMAGE_TRANSFORMS
    copies_per_sample: Optional[int] = None
    prob: float = 1.0
    noise_clean_image: bool = True
    classes: tuple[str, ...] = ()
    related_templates: tuple[str, ...] = RELATED_TEMPLATES
    irrelevant_sentences: tuple[str, ...] = IRRELEVANT_SENTENCES
    paragraph_sentences: int = 10
    misleading_templates: tuple[str, ...] = DEFAULT_MISLEADING
    unrelated_facts: tuple[str, ...] = DEFAULT_FACTS
    noise_std: float = 0.3

    def __post_init__(self):
        self.text_transforms, self.image_transforms = tuple(self.text_transforms), tuple(self.image_transforms)
        for name in self.text_transforms:
            if name not in TEXT_TRANSFORMS:
                raise ValueError(f"text_transforms: unknown transform {name!r}; choose from {TEXT_TRANSFORMS}")
        for name in self.image_transforms:
            if name not in IMAGE_TRANSFORMS:
                raise ValueError(f"image_transforms: unknown transform {name!r}; choose from {IMAGE_TRANSFORMS}")
        if self.copies_per_sample is not None and self.copies_per_sample < 0:
            raise ValueError(
                f"copies_per_sample must be None (one copy per transform) or >= 0, got {self.copies_per_sample}"
            )
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"prob must lie in [0, 1], got {self.prob}")
        if self.paragraph_sentences < 1:
            raise ValueError(f"paragraph_sentences must be >= 1, got {self.paragraph_sentences}")
        self.classes = tuple(self.classes)
        needs = {
            "related_text": ("related_templates",),
            "unrelated_paragraph": ("irrelevant_sentences",),
            "misleading_text": ("misleading_templates",),
            "unrelated_text": ("unrelated_facts",),
        }
        for transform in self.text_transforms:
            for name in needs[transform]:
                if not getattr(self, name):
                    raise ValueError(f"{name} must not be empty when {transform} is enabled")
        if "misleading_text" in self.text_transforms and len(self.classes) < 2:
            raise ValueError(
                "classes: misleading_text needs at least two candidate answer labels, e.g. "
                "AugmentConfig(classes=('red', 'green', 'blue')), or leave it out of text_transforms"
            )


# --- single transforms: each returns a new Sample with the same answer -------------------------


def with_context(sample: Sample, context: str, tag: str) -> Sample:
    """``sample`` with ``context`` in front of its question (replacing the old context, if any)."""
    return dataclasses.replace(sample, context=context, tag=tag)


def insert_before_question(sample: Sample, text: str, tag: str) -> Sample:
    """``sample`` with ``text`` right before its question (after its context, which is kept), as the
    official copies put their text before the question (its samples have no context)."""
    return dataclasses.replace(sample, context=f"{sample.context} {text}".strip(), tag=tag)


def related_text(sample: Sample, classes: Sequence[str], rng: random.Random, templates=RELATED_TEMPLATES) -> Sample:
    """The official related / misleading sentence in front of the prompt: the sample's first fact,
    else a template naming an option drawn from the sample's ``options`` or, when it has none,
    from ``classes`` (possibly the right one)."""
    if sample.facts:
        return insert_before_question(sample, sample.facts[0], "related_text")
    options = sample.options or tuple(classes)
    if not options:
        raise ValueError(
            "related_text: the sample has no facts and no options, and AugmentConfig.classes is empty; "
            "give the answer options (AugmentConfig(classes=...)) or leave related_text out"
        )
    return insert_before_question(sample, rng.choice(templates).format(option=rng.choice(options)), "related_text")


def unrelated_paragraph(sample: Sample, sentences: Sequence[str], n: int, rng: random.Random) -> Sample:
    """A paragraph of ``n`` sentences drawn with replacement from ``sentences`` in front of the prompt."""
    return insert_before_question(sample, " ".join(rng.choice(sentences) for _ in range(n)), "unrelated_paragraph")


def uniform_noise_image(sample: Sample, generator: torch.Generator, tag: str = "noise_clean") -> Sample:
    """The sample with its image replaced by uniform noise in [0, 1] (the official text-heavy clean
    image: uniform random pixels)."""
    image = _require_image(sample, tag)
    noise = torch.rand(image.shape, generator=generator, dtype=torch.float32)
    return dataclasses.replace(sample, image=noise.to(dtype=image.dtype, device=image.device), tag=tag)


def misleading_text(sample: Sample, classes: Sequence[str], rng: random.Random, templates=DEFAULT_MISLEADING):
    """Put a description naming a class other than the sample's own in front of the question."""
    wrong = [c for c in classes if c != sample.target_class]
    if not wrong:
        raise ValueError(f"classes: no class other than {sample.target_class!r} to mislead with")
    return with_context(sample, rng.choice(templates).format(label=rng.choice(wrong)), "misleading_text")


def unrelated_text(sample: Sample, facts: Sequence[str], rng: random.Random) -> Sample:
    """Put a fact that has nothing to do with the question in front of it."""
    return with_context(sample, rng.choice(facts), "unrelated_text")


def _require_image(sample: Sample, what: str) -> Tensor:
    if sample.image is None:
        raise ValueError(f"{what} needs a sample with an image")
    return sample.image


def constant_image(sample: Sample, value: float, tag: str) -> Sample:
    """The sample with its image replaced by a constant (0 = black, 1 = white)."""
    image = _require_image(sample, tag)
    return dataclasses.replace(sample, image=torch.full_like(image, value), tag=tag)


def noise_image(sample: Sample, generator: torch.Generator, std: float = 0.3) -> Sample:
    """The sample with its image replaced by Gaussian noise around 0.5, clamped to [0, 1]."""
    image = _require_image(sample, "noise_image")
    noise = torch.randn(image.shape, generator=generator, dtype=torch.float32)
    noise = (0.5 + std * noise).clamp_(0.0, 1.0).to(dtype=image.dtype, device=image.device)
    return dataclasses.replace(sample, image=noise, tag="noise_image")


def swap_image(sample: Sample, other: Sample) -> Sample:
    """The sample with the image of ``other``."""
    _require_image(sample, "swap_image")
    return dataclasses.replace(sample, image=_require_image(other, "swap_image"), tag="swap_image")


class HeuristicAugmenter:
    """Makes the heuristic copies of a list of samples (deterministic for a given ``seed``)."""

    def __init__(self, config: AugmentConfig, seed: int = 0):
        self.config = config
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def transforms_for(self, kind: str) -> tuple[str, ...]:
        if kind == "image_heavy":
            return self.config.text_transforms
        if kind == "text_heavy":
            return self.config.image_transforms
        return ()

    def apply(self, name: str, samples: Sequence[Sample], i: int) -> Sample:
        """Transform ``name`` applied to ``samples[i]`` (the list supplies images to swap in)."""
        cfg, s = self.config, samples[i]
        if name == "related_text":
            return related_text(s, cfg.classes, self.rng, cfg.related_templates)
        if name == "unrelated_paragraph":
            return unrelated_paragraph(s, cfg.irrelevant_sentences, cfg.paragraph_sentences, self.rng)
        if name == "misleading_text":
            return misleading_text(s, cfg.classes, self.rng, cfg.misleading_templates)
        if name == "unrelated_text":
            return unrelated_text(s, cfg.unrelated_facts, self.rng)
        if name == "black_image":
            return constant_image(s, 0.0, name)
        if name == "white_image":
            return constant_image(s, 1.0, name)
        if name == "noise_image":
            return noise_image(s, self.generator, cfg.noise_std)
        if name == "swap_image":
            others = [j for j, o in enumerate(samples) if j != i and o.image is not None]
            if not others:  # nothing to swap with in a batch of one: noise is the closest stand-in
                return noise_image(s, self.generator, cfg.noise_std)
            # Prefer an image of another class, so the swap really changes the content.
            different = [j for j in others if samples[j].target_class != s.target_class]
            return swap_image(s, samples[self.rng.choice(different or others)])
        raise ValueError(f"unknown transform {name!r}")

    def clean(self, samples: Sequence[Sample]) -> list[Sample]:
        """The clean samples as they are trained: a text-heavy sample's image replaced by uniform
        noise when ``noise_clean_image`` (the official text-heavy input), the others unchanged."""
        if not self.config.noise_clean_image:
            return list(samples)
        return [
            uniform_noise_image(s, self.generator) if s.kind == "text_heavy" and s.image is not None else s
            for s in samples
        ]

    def __call__(self, samples: Sequence[Sample]) -> tuple[list[Sample], list[int]]:
        """Returns ``(copies, sources)``: the copies and the index of each one's clean sample."""
        copies, sources = [], []
        for i, s in enumerate(samples):
            names = self.transforms_for(s.kind)
            if not names or self.config.copies_per_sample == 0 or self.rng.random() >= self.config.prob:
                continue
            if self.config.copies_per_sample is None:
                chosen = list(names)
            else:
                chosen = self.rng.sample(list(names), min(self.config.copies_per_sample, len(names)))
            for name in chosen:
                copies.append(self.apply(name, samples, i))
                sources.append(i)
        return copies, sources


# --- collation -----------------------------------------------------------------------------------

Encode = Callable[[Sample], tuple[list[int], list[int]]]


@dataclass
class RobustCollator:
    """Turns a list of samples (plus their heuristic copies) into one padded batch.

    ``encode(sample) -> (input_ids, labels)`` tokenizes one sample, image placeholders included,
    with ``labels`` equal to ``-100`` outside the answer. ``image_transform`` maps a ``[C, H, W]``
    image in [0, 1] to the model's ``pixel_values`` (e.g. normalization). Rows are right-padded
    with ``pad_token_id``. The batch holds ``input_ids``, ``attention_mask``, ``labels``,
    ``pixel_values`` (when samples have images; one row per image, in sample order),
    ``sample_kind`` (list of kinds), ``ref_index`` (int64: the clean sample of each row) and
    ``tags`` (how each row was made, for logging; not a model input). ``collate`` replaces the
    encoding and padding of the samples (clean ones first, then the copies) by a callable that
    makes the whole batch, e.g. :class:`modkern.processing.ChatProcessor` (the model's own
    processor); ``encode`` is then unused.
    """

    encode: Optional[Encode] = None
    augmenter: Optional[HeuristicAugmenter] = None
    pad_token_id: int = 0
    image_transform: Optional[Callable[[Tensor], Tensor]] = None
    return_tags: bool = field(default=False)
    collate: Optional[Callable[[list], dict]] = None

    def __post_init__(self):
        if self.encode is None and self.collate is None:
            raise ValueError("RobustCollator needs encode (one sample -> ids, labels) or collate (samples -> batch)")

    def __call__(self, samples: Sequence[Sample]) -> dict:
        samples = list(samples)
        if not samples:
            raise ValueError("samples must not be empty")
        ref_index = list(range(len(samples)))
        if self.augmenter is not None:
            copies, sources = self.augmenter(samples)
            samples = self.augmenter.clean(samples) + copies
            ref_index += sources
        if self.collate is not None:
            batch = self.collate(samples)
        else:
            batch = collate_samples(samples, self.encode, self.pad_token_id, self.image_transform)
        batch["ref_index"] = torch.tensor(ref_index, dtype=torch.long)
        if self.return_tags:
            batch["tags"] = [s.tag for s in samples]
        return batch


def right_pad(encoded, pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)`` ``[n, L]`` from ``(ids, labels)`` lists, right-padded
    with ``pad_token_id`` / -100 to the longest sequence."""
    length = max(len(ids) for ids, _ in encoded)
    n = len(encoded)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    for k, (ids, lab) in enumerate(encoded):
        input_ids[k, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[k, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention_mask[k, : len(ids)] = 1
    return input_ids, attention_mask, labels


def collate_samples(samples, encode: Encode, pad_token_id: int = 0, image_transform=None) -> dict:
    """Encode and right-pad ``samples`` (no copies); see :class:`RobustCollator` for the keys."""
    encoded = [encode(s) for s in samples]
    for k, (ids, labels) in enumerate(encoded):
        if len(ids) != len(labels):
            raise ValueError(f"encode returned {len(ids)} input ids but {len(labels)} labels for sample {k}")
    input_ids, attention_mask, labels = right_pad(encoded, pad_token_id)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "sample_kind": [s.kind for s in samples],
    }
    images = [s.image for s in samples if s.image is not None]
    if images:
        pixel_values = torch.stack(images).float()
        batch["pixel_values"] = image_transform(pixel_values) if image_transform is not None else pixel_values
    return batch
