"""Tiny checkpoints saved *with their real processor*, built locally (no download).

:func:`build_tokenizer` trains a byte-level BPE tokenizer (the ``tokenizers`` library) on a small
word list, so any text encodes and decodes back exactly; :func:`save_tiny_checkpoint` writes a
tiny random model of a family (:data:`FAMILIES`) next to the family's processor class (its image
processor from the default config at a tiny size, that tokenizer, the family's chat template), so
that ``AutoProcessor.from_pretrained`` and ``from_pretrained`` of the model load it like a real
checkpoint. Used by the tests of the data-file path and as a first try of ``modkern train --data``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from modkern.apps.tiny_models import tiny_llava
from modkern.processing import OFFICIAL_SYSTEM_PROMPT

# The chat templates of the families (as their Hugging Face checkpoints ship them, trimmed to text
# and images). LLaVA-1.5 renders a system turn's text as plain text before "USER:".
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% else %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BASE_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
FAMILIES = ("llava",)
WORDS = (
    "Question:", "Option:", "What", "colour", "is", "the", "image", "object", "in", "this", "picture", "seems",
    "to", "depict", "a", "red", "green", "blue", "yellow", "cat", "dog", "ASSISTANT:", "USER:",
)  # fmt: skip


def build_tokenizer(words: Sequence[str] = (), *, image_token: str = "<image>", extra_specials: Sequence[str] = ()):
    """A ``PreTrainedTokenizerFast``: byte-level BPE trained on ``words`` (+ :data:`WORDS` and the
    official system prompt), pad/bos/eos/unk = ids 0..3, ``extra_specials`` next and ``image_token``
    the last id (``len(tokenizer) - 1``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [*BASE_SPECIALS, *extra_specials]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(WORDS), OFFICIAL_SYSTEM_PROMPT, " ".join(words)]
    tok.train_from_iterator(corpus * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    return tokenizer


def save_tiny_checkpoint(family: str, path, *, words: Sequence[str] = (), seed: int = 0, image_size: int = 16) -> str:
    """Write a tiny random ``family`` checkpoint (:data:`FAMILIES`) and its processor to ``path``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    path = os.fspath(path)
    model, processor = _tiny_llava(words, seed, image_size)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _tiny_llava(words, seed: int, image_size: int, patch_size: int = 4):
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = build_tokenizer(words)
    model, _ = tiny_llava(len(tokenizer), image_size=image_size, patch_size=patch_size, max_positions=2048, seed=seed)
    model.config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        chat_template=LLAVA_TEMPLATE,
        image_token="<image>",
    )
    return model, processor
