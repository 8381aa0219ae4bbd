"""The interference conditions: each makes the perturbed variant of a clean item (or says why it cannot)."""

from __future__ import annotations

import dataclasses
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from modkern.apps.diagnose.items import VIDEO_CAPTION, DiagnoseError, NotBuilt, donor, needs, other_class
from modkern.apps.diagnose.models import ModelSpec
from modkern.apps.synthetic_task import CAPTION, EVAL_OBJECTS, FACT, MISLEADING_NOTE, WORD_LIST
from modkern.objective.alignment import CAPTION_STREAM, CAPTION_TEMPLATE, caption_label
from modkern.objective.augment import RELATED_TEMPLATES
from modkern.objective.distractors import IRRELEVANT_SENTENCES

# --- conditions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """A perturbation of clean items: ``make(items, i, ctx)`` returns the perturbed ``items[i]``
    (or raises ``NotBuilt`` with the reason: the item is left out of the condition and counted).

    ``kinds``: the item kinds it applies to; ``requires``: the model inputs it needs.
    """

    name: str
    kinds: tuple
    requires: tuple
    description: str
    make: Callable


@dataclass
class ConditionContext:
    rng: random.Random
    gen: torch.Generator
    classes: tuple


def condition_context(seed: int, name: str, classes) -> ConditionContext:
    """Random state of one condition: seeded from the run's seed and the condition's name."""
    own = (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62
    return ConditionContext(random.Random(own), torch.Generator().manual_seed(own + 1), tuple(classes))


def _mislead_text(items, i, ctx):
    it = items[i]
    return dataclasses.replace(it, context=CAPTION.format(label=other_class(it.target_class, ctx.classes, ctx.rng)))


def _unrelated_text(items, i, ctx):
    it = items[i]
    fact = FACT.format(obj=ctx.rng.choice(EVAL_OBJECTS), label=other_class(it.target_class, ctx.classes, ctx.rng))
    return dataclasses.replace(it, context=fact)


def _long_context(items, i, ctx, sentences: int = 8):
    it = items[i]
    facts = [FACT.format(obj=ctx.rng.choice(EVAL_OBJECTS), label=ctx.rng.choice(ctx.classes)) for _ in range(sentences)]
    return dataclasses.replace(it, context=" ".join([*facts, it.context]).strip())


def _word_list(items, i, ctx, words: int = 6):
    it = items[i]
    picked = [ctx.rng.choice(EVAL_OBJECTS) for _ in range(words // 2)]
    picked += [other_class(it.target_class, ctx.classes, ctx.rng)] + [
        ctx.rng.choice(ctx.classes) for _ in range(words // 2 - 1)
    ]
    ctx.rng.shuffle(picked)
    return dataclasses.replace(it, context=f"{WORD_LIST.format(words=' , '.join(picked))} {it.context}".strip())


def _mislead_note(items, i, ctx):
    it = items[i]
    return dataclasses.replace(
        it, context=MISLEADING_NOTE.format(label=other_class(it.target_class, ctx.classes, ctx.rng))
    )


def _misleading_sentence(items, i, ctx):
    """The paper's related-text copy, always wrong: its template naming another option of the item."""
    it = items[i]
    classes = [text for _, text in it.options] or ctx.classes
    wrong = other_class(it.target_class, classes, ctx.rng)
    return dataclasses.replace(it, context=RELATED_TEMPLATES[0].format(option=wrong))


def _unrelated_paragraph(items, i, ctx, sentences: int = 10):
    """The paper's unrelated-paragraph copy: 10 sentences drawn from the irrelevant pool."""
    paragraph = " ".join(ctx.rng.choice(IRRELEVANT_SENTENCES) for _ in range(sentences))
    return dataclasses.replace(items[i], context=paragraph)


def _misleading_caption(items, i, ctx):
    """MMA-Bench's misleading text on a data-file item: the alignment copies' caption, naming the other
    stream's content (or another option / class) as the queried stream's (:func:`caption_label`)."""
    it = items[i]
    if it.kind == "av_both":  # its options (yes / no) are no content: the contents the file names
        candidates = sorted({o.stream_label(s) for o in items for s in ("audio", "video")} - {None})
    else:
        candidates = [text for _, text in it.options] or ctx.classes
    label = caption_label(
        it.kind, it.target_class, it.stream_label("video"), it.stream_label("audio"), candidates, ctx.rng
    )
    if label is None:
        raise NotBuilt("no content other than the item's own to name")
    return dataclasses.replace(it, context=CAPTION_TEMPLATE.format(stream=CAPTION_STREAM[it.kind], label=label))


def _swap_image(items, i, ctx):
    needs(items[i], "image", "to swap")
    return dataclasses.replace(items[i], image=donor(items, i, "image", ctx.rng))


def _const_image(value):
    def make(items, i, ctx):
        return dataclasses.replace(items[i], image=torch.full_like(needs(items[i], "image", "to replace"), value))

    return make


def _noise_image(items, i, ctx):
    img = needs(items[i], "image", "to replace")
    noise = 0.5 + 0.3 * torch.randn(img.shape, generator=ctx.gen)
    return dataclasses.replace(items[i], image=noise.clamp_(0.0, 1.0).to(img.dtype))


def _misaligned(items, i, ctx):
    # The stream the question does not ask about comes from an item of another class.
    it = items[i]
    attr = "audio" if it.kind == "av_visual" else "video"
    needs(it, attr, "to misalign")
    return dataclasses.replace(it, **{attr: donor(items, i, attr, ctx.rng)})


def _removed_audio(items, i, ctx):
    needs(items[i], "audio", "to remove")  # else the variant would be the clean item
    return dataclasses.replace(items[i], audio=None)


def _zeroed_frames(items, i, ctx):
    return dataclasses.replace(items[i], video=torch.zeros_like(needs(items[i], "video", "to zero")))


def _mislead_caption(items, i, ctx):
    it = items[i]
    return dataclasses.replace(
        it, context=VIDEO_CAPTION.format(label=other_class(it.target_class, ctx.classes, ctx.rng))
    )


CONDITIONS = {
    c.name: c
    for c in (
        Condition(
            "mislead_text",
            ("image_heavy",),
            ("image",),
            "image-heavy items; the caption names another colour",
            _mislead_text,
        ),
        Condition(
            "unrelated_text",
            ("image_heavy",),
            ("image",),
            "image-heavy items; an unrelated fact naming another colour replaces the caption",
            _unrelated_text,
        ),
        Condition(
            "long_irrelevant_context",
            ("image_heavy",),
            ("image",),
            "image-heavy items; eight facts about other objects in front of the caption",
            _long_context,
        ),
        Condition(
            "word_list",
            ("image_heavy",),
            ("image",),
            "image-heavy items; a list of unrelated words (objects and colours, one of them another colour) in "
            "front of the caption (held out: no training text of the demo is a list)",
            _word_list,
        ),
        Condition(
            "mislead_note",
            ("image_heavy",),
            ("image",),
            "image-heavy items; a note (the text-heavy items' form) names another colour for the picture "
            "(held out: the demo's augmentation never uses this template)",
            _mislead_note,
        ),
        Condition(
            "misleading_sentence",
            ("image_heavy",),
            ("image",),
            "image-heavy items; 'This picture seems to depict a <another option>.' before the question (data files)",
            _misleading_sentence,
        ),
        Condition(
            "unrelated_paragraph",
            ("image_heavy", "av_visual", "av_audio", "av_both"),
            (),
            "image-heavy and audio-video items; a paragraph of 10 irrelevant sentences before the question "
            "(data files)",
            _unrelated_paragraph,
        ),
        Condition(
            "swap_image", ("text_heavy",), ("image",), "text-heavy items; the image of another item", _swap_image
        ),
        Condition("black_image", ("text_heavy",), ("image",), "text-heavy items; a black image", _const_image(0.0)),
        Condition("white_image", ("text_heavy",), ("image",), "text-heavy items; a white image", _const_image(1.0)),
        Condition("noise_image", ("text_heavy",), ("image",), "text-heavy items; a Gaussian noise image", _noise_image),
        Condition(
            "misaligned_audio_video",
            ("av_visual", "av_audio"),
            ("audio", "video"),
            "audio-visual items; the stream the question does not ask about comes from another clip showing "
            "something else",
            _misaligned,
        ),
        Condition(
            "removed_audio",
            ("av_visual",),
            ("audio", "video"),
            "visual questions; the audio track is removed",
            _removed_audio,
        ),
        Condition(
            "zeroed_frames",
            ("av_audio",),
            ("audio", "video"),
            "sound questions; every video frame is zero",
            _zeroed_frames,
        ),
        Condition(
            "mislead_caption_av",
            ("av_visual", "av_audio"),
            ("audio", "video"),
            "audio-visual items; a caption names another colour for both streams",
            _mislead_caption,
        ),
        Condition(
            "misleading_caption",
            ("av_visual", "av_audio"),
            ("audio", "video"),
            "audio-visual items; a caption names another option as the queried stream's content (data files)",
            _misleading_caption,
        ),
    )
}


# The defaults: the built-in tasks' conditions (their texts are in the demo's word vocabulary), and the
# paper's interferences for data files (any tokenizer).
DATA_FILE_ONLY = ("misleading_sentence", "unrelated_paragraph", "misleading_caption")
DATA_FILE_CONDITIONS = (
    "misleading_sentence",
    "unrelated_paragraph",
    "swap_image",
    "black_image",
    "white_image",
    "noise_image",
    "misaligned_audio_video",
    "removed_audio",
    "zeroed_frames",
    "misleading_caption",
)
BUILTIN_CONDITIONS = tuple(n for n in CONDITIONS if n not in DATA_FILE_ONLY)


def data_file_conditions(kinds_present) -> tuple:
    """The default conditions of a data file: those of :data:`DATA_FILE_CONDITIONS` that apply to
    its item kinds (an image file is not told that the audio conditions were skipped); all of them
    (each skipped with its reason) when none applies."""
    applicable = tuple(n for n in DATA_FILE_CONDITIONS if any(k in kinds_present for k in CONDITIONS[n].kinds))
    return applicable or DATA_FILE_CONDITIONS


def resolve_conditions(names, spec: ModelSpec, kinds_present, default=BUILTIN_CONDITIONS):
    """The conditions to run and ``{name: reason}`` for those skipped (never silently); ``names``
    None runs ``default``."""
    if names is None:
        names = list(default)
    elif isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:  # e.g. --conditions "" from an unset variable: not a run that measures nothing
        raise DiagnoseError(f"no condition names given; choose from {', '.join(CONDITIONS)} (or leave it out for all)")
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        raise DiagnoseError(f"unknown condition(s) {unknown}; choose from {', '.join(CONDITIONS)}")
    run, skipped = [], {}
    for n in names:
        c = CONDITIONS[n]
        missing = [m for m in c.requires if m not in spec.modalities]
        if missing:
            skipped[n] = f"the model ({spec.family}) takes no {' or '.join(missing)} input"
        elif not any(k in kinds_present for k in c.kinds):
            skipped[n] = f"no {' or '.join(c.kinds)} items in the data"
        else:
            run.append(c)
    return run, skipped
