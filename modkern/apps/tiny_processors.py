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

from modkern.apps.frames_video import FramesVideoProcessor, without_torchvision
from modkern.apps.tiny_models import (
    clip_vision_config,
    mrope_text_config,
    qwen_vision,
    text_config,
    tiny_llava,
    tiny_qwen2_5_omni,
    tiny_qwen3_omni,
)
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
# Qwen2.5-Omni's: the same turns, its own image, video and audio markers.
OMNI_TEMPLATE = QWEN_TEMPLATE.replace(
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}",
    "{% if content['type'] == 'image' %}{{ '<|vision_bos|><|IMAGE|><|vision_eos|>' }}"
    "{% elif content['type'] == 'video' %}{{ '<|vision_bos|><|VIDEO|><|vision_eos|>' }}"
    "{% elif content['type'] == 'audio' %}{{ '<|audio_bos|><|AUDIO|><|audio_eos|>' }}",
)
# Qwen3-Omni's: Qwen-VL's image and video markers, its own audio ones.
QWEN3_OMNI_TEMPLATE = QWEN_TEMPLATE.replace(
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}",
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'audio' %}{{ '<|audio_start|><|audio_pad|><|audio_end|>' }}",
)
QWEN3_OMNI_PATCH_SIZE = 16  # Qwen3-VL's, Qwen3-Omni's vision encoder
OMNI_PATCH_SIZE = 14  # Qwen2.5-Omni's: its processor sizes video frames for 28-pixel merged patches
AUDIO_SECONDS = 2  # the tiny feature extractor's window (Whisper's is 30 s)
BASE_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>")
# The Omni tokenizer's named special tokens (attribute -> token), as its processor reads them.
OMNI_TOKENS = {
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "audio_token": "<|AUDIO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}
# Qwen3-Omni's tokenizer: the same attributes, other tokens.
QWEN3_OMNI_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "audio_token": "<|audio_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}
FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen2_5_omni", "qwen3_omni")
WORDS = (
    "Question:", "Option:", "What", "colour", "is", "the", "image", "object", "in", "this", "picture", "seems",
    "to", "depict", "a", "red", "green", "blue", "yellow", "cat", "dog", "ASSISTANT:", "USER:", "system",
    "user", "assistant",
)  # fmt: skip


def build_tokenizer(words: Sequence[str] = (), *, specials: Sequence[str] = (), named: dict | None = None):
    """A ``PreTrainedTokenizerFast``: byte-level BPE trained on ``words`` (+ :data:`WORDS` and the
    official system prompt), pad/bos/eos/unk = ids 0..3, then ``specials`` and the values of
    ``named`` (attribute -> token, e.g. ``{"image_token": "<image>"}``: ``tokenizer.image_token``
    and ``tokenizer.image_token_id``), all special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    named = dict(named or {})
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=[*BASE_SPECIALS, *specials, *named.values()],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(WORDS), OFFICIAL_SYSTEM_PROMPT, " ".join(words)]
    tok.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=named,
    )


def tiny_model_and_processor(family: str, *, words: Sequence[str] = (), seed: int = 0, image_size: int = 16):
    """``(model, processor)``: a tiny random ``family`` model (:data:`FAMILIES`) and its processor,
    the placeholder ids of the model's config those of the processor's tokenizer.

    The Qwen families' processors include a video processor, which transformers 5 builds only with
    torchvision; without it, the processor is the family's class with a torch-only one
    (:mod:`modkern.apps.frames_video`), saved and loaded back the same way. The Qwen2.5-Omni thinker
    has Qwen2.5-Omni's patch size (14: its processor's video frame sizes assume it), images of 28²
    pixels and a feature extractor of 8 mel bins over at most :data:`AUDIO_SECONDS` seconds; the
    Qwen3-Omni thinker Qwen3-Omni's patch size (16) and windows of audio (13 placeholders a second);
    its processor sizes video frames to at least 128 x 32² pixels, whatever the frames' size."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return _BUILDERS[family](words, seed, image_size)


def save_tiny_checkpoint(family: str, path, *, words: Sequence[str] = (), seed: int = 0, image_size: int = 16) -> str:
    """Write a tiny random ``family`` checkpoint and its processor to ``path`` (loaded back by
    :func:`modkern.apps.frames_video.load_processor`, or ``AutoProcessor`` where torchvision is installed)."""
    model, processor = tiny_model_and_processor(family, words=words, seed=seed, image_size=image_size)
    path = os.fspath(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _tiny_llava(words, seed: int, image_size: int, patch_size: int = 4):
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = build_tokenizer(words, named={"image_token": "<image>"})
    model, _ = tiny_llava(len(tokenizer), image_size=image_size, patch_size=patch_size, max_positions=2048, seed=seed)
    model.config.image_token_id = tokenizer.image_token_id
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
    )
    return model, processor


def _tiny_llava_next(words, seed: int, image_size: int, patch_size: int = 4):
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = build_tokenizer(words, named={"image_token": "<image>"})
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    config = LlavaNextConfig(
        vision_config=clip_vision_config(image_size, patch_size),
        text_config=dict(model_type="llama", **text_config(len(tokenizer), 32, 1, 2, None, 2048)),
        image_token_id=tokenizer.image_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=0,
    )
    model = _build(LlavaNextForConditionalGeneration, config, seed)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return model, processor


def _build(cls, config, seed: int):
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = cls(config)
    finally:
        torch.random.set_rng_state(state)
    return model.train()


def _qwen_image_processor(image_size: int, patch_size: int = 4, merge: int = 2):
    from transformers import Qwen2VLImageProcessor

    pixels = image_size * image_size
    return Qwen2VLImageProcessor(
        min_pixels=pixels, max_pixels=pixels, patch_size=patch_size, merge_size=merge, temporal_patch_size=2
    )


def _tiny_qwen_vl(family: str):
    def build(words, seed: int, image_size: int):
        import transformers

        tokenizer = build_tokenizer(words, specials=QWEN_SPECIALS)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
        vision_common = dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        if family == "qwen2_vl":
            vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, **vision_common)
            config_cls, model_cls, proc_cls = "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"
        else:
            vision = dict(
                depth=1,
                hidden_size=16,
                intermediate_size=32,
                num_heads=2,
                window_size=image_size,
                out_hidden_size=32,
                fullatt_block_indexes=[0],
                **vision_common,
            )
            config_cls, model_cls = "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"
            proc_cls = "Qwen2_5_VLProcessor"
        text = mrope_text_config(len(tokenizer), 32, 1, 2, None, 2048, qwen_vision(image_size, 4, 2, 2))
        config = getattr(transformers, config_cls)(
            vision_config=vision,
            text_config=text,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        model = _build(getattr(transformers, model_cls), config, seed)
        processor = _processor(getattr(transformers, proc_cls), _qwen_image_processor(image_size), tokenizer)
        return model, processor

    return build


def _tiny_omni(words, seed: int, image_size: int):
    import transformers

    tokenizer = build_tokenizer(words, specials=QWEN_SPECIALS[:2], named=OMNI_TOKENS)
    image_size = max(image_size, 2 * OMNI_PATCH_SIZE)
    model, _ = tiny_qwen2_5_omni(
        len(tokenizer), image_size=image_size, patch_size=OMNI_PATCH_SIZE, max_positions=2048, seed=seed
    )
    tid = {name: getattr(tokenizer, name + "_id") for name in OMNI_TOKENS}
    config = model.config
    config.image_token_id, config.video_token_id, config.audio_token_id = (
        tid["image_token"],
        tid["video_token"],
        tid["audio_token"],
    )
    config.vision_start_token_id, config.vision_end_token_id = tid["vision_bos_token"], tid["vision_eos_token"]
    config.audio_start_token_id, config.audio_end_token_id = tid["audio_bos_token"], tid["audio_eos_token"]
    return model, _omni_processor(
        transformers.Qwen2_5OmniProcessor, tokenizer, image_size, OMNI_PATCH_SIZE, OMNI_TEMPLATE
    )


def _tiny_qwen3_omni(words, seed: int, image_size: int):
    import transformers

    tokenizer = build_tokenizer(words, specials=QWEN_SPECIALS[:2], named=QWEN3_OMNI_TOKENS)
    tid = {name: getattr(tokenizer, name + "_id") for name in QWEN3_OMNI_TOKENS}
    token_ids = dict(
        image_token_id=tid["image_token"],
        video_token_id=tid["video_token"],
        audio_token_id=tid["audio_token"],
        vision_start_token_id=tid["vision_bos_token"],
        vision_end_token_id=tid["vision_eos_token"],
        audio_start_token_id=tid["audio_bos_token"],
        audio_end_token_id=tid["audio_eos_token"],
        user_token_id=tokenizer.convert_tokens_to_ids("user"),
    )
    model = tiny_qwen3_omni(len(tokenizer), token_ids, patch_size=QWEN3_OMNI_PATCH_SIZE, seed=seed)
    image_size = max(image_size, 2 * QWEN3_OMNI_PATCH_SIZE)
    processor = _omni_processor(
        transformers.Qwen3OmniMoeProcessor, tokenizer, image_size, QWEN3_OMNI_PATCH_SIZE, QWEN3_OMNI_TEMPLATE
    )
    return model, processor


def _omni_processor(cls, tokenizer, image_size: int, patch_size: int, template: str):
    """An Omni processor ``cls``: Qwen image processor of ``patch_size`` patches, 8-bin Whisper features."""
    import transformers

    return _processor(
        cls,
        _qwen_image_processor(image_size, patch_size),
        tokenizer,
        feature_extractor=transformers.WhisperFeatureExtractor(feature_size=8, chunk_length=AUDIO_SECONDS),
        template=template,
        patch_size=patch_size,
    )


def _processor(cls, image_processor, tokenizer, template=QWEN_TEMPLATE, patch_size: int = 4, **others):
    """``cls`` with ``image_processor``, ``tokenizer`` (+ ``others``), the Qwen chat template and a
    video processor: transformers' (with torchvision), else a :class:`FramesVideoProcessor` in
    :func:`without_torchvision` ``(cls)``."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        from transformers import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2)
        return cls(
            image_processor=image_processor,
            video_processor=video,
            tokenizer=tokenizer,
            chat_template=template,
            **others,
        )
    video = FramesVideoProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    return without_torchvision(cls)(
        image_processor=image_processor, video_processor=video, tokenizer=tokenizer, chat_template=template, **others
    )


_BUILDERS = {
    "llava": _tiny_llava,
    "llava_next": _tiny_llava_next,
    "qwen2_vl": _tiny_qwen_vl("qwen2_vl"),
    "qwen2_5_vl": _tiny_qwen_vl("qwen2_5_vl"),
    "qwen2_5_omni": _tiny_omni,
    "qwen3_omni": _tiny_qwen3_omni,
}
