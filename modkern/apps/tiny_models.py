"""Tiny multimodal and text-only models built from configs with random weights (no download).

Used by the tests and the CPU demo. Every builder returns ``(model, info)``: ``model`` is a
Hugging Face model in train mode on CPU, ``info`` a dict with the ids and sizes a caller needs to
build inputs:

- ``"kind"``: ``"llava"``, ``"qwen2_vl"``, ``"qwen2_5_omni"`` or ``"llama"``;
- ``"vocab_size"``, ``"hidden_size"``;
- ``"pad_token_id"`` (0), ``"bos_token_id"`` (1), ``"eos_token_id"`` (2);
- ``"text_token_range"``: ``(lo, hi)``, ids ``lo <= id < hi`` are free for ordinary text;
- ``"token_ids"``: the modality placeholder mapping for :func:`modkern.modality_mask`
  (``{}`` for the text-only model);
- multimodal models: ``"image_token_id"``, ``"image_size"``, ``"num_image_tokens"`` (placeholder
  tokens per image); Qwen2-VL also ``"video_token_id"``, ``"vision_start_token_id"``,
  ``"vision_end_token_id"``, ``"patch_size"``, ``"temporal_patch_size"``, ``"spatial_merge_size"``
  (turn images into its inputs with :func:`qwen2_vl_pixel_values`);
- the Qwen2.5-Omni thinker (:func:`tiny_qwen2_5_omni`) additionally ``"audio_token_id"``,
  ``"audio_start_token_id"``, ``"audio_end_token_id"``, ``"num_mel_bins"`` (videos through
  :func:`qwen_video_pixel_values`, audio placeholders per clip from :func:`omni_audio_tokens`).

Special ids sit at the top of the vocabulary; dropout is 0 everywhere, so a forward is
deterministic given the weights.
"""

from __future__ import annotations

import torch

PAD, BOS, EOS = 0, 1, 2


def _seeded(seed: int):
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    return gen_state


def _finish(model, seed_state, dtype):
    torch.random.set_rng_state(seed_state)
    model = model.to(dtype=dtype)
    model.train()
    return model


def text_config(vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_positions):
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        attention_dropout=0.0,
    )


def _info(kind, vocab_size, hidden_size, text_token_range, token_ids, **extra):
    return dict(
        kind=kind,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        text_token_range=text_token_range,
        token_ids=token_ids,
        **extra,
    )


def mrope_text_config(vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_positions, vision):
    """The decoder config of the Qwen-VL family (M-RoPE), after checking the vision geometry."""
    if vision["image_size"] % (vision["patch_size"] * vision["spatial_merge_size"]):
        raise ValueError("image_size must be a multiple of patch_size * spatial_merge_size")
    head_dim = hidden_size // num_heads
    if head_dim % 2:
        raise ValueError("hidden_size // num_heads must be even")
    # M-RoPE splits head_dim / 2 frequencies over (temporal, height, width).
    half = head_dim // 2
    mrope_section = [half - 2 * (half // 3), half // 3, half // 3]
    text = text_config(vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_positions)
    text["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope_section)
    return text


def qwen_vision(image_size, patch_size, temporal_patch_size, spatial_merge_size) -> dict:
    """The vision geometry of the Qwen-VL family, as ``info`` records it."""
    side = image_size // patch_size
    return dict(
        image_size=image_size,
        patch_size=patch_size,
        temporal_patch_size=temporal_patch_size,
        spatial_merge_size=spatial_merge_size,
        num_image_tokens=(side // spatial_merge_size) ** 2,
    )


def clip_vision_config(image_size: int, patch_size: int, hidden_size: int = 32) -> dict:
    """A one-layer CLIP vision tower's config (the LLaVA families' vision tower)."""
    return dict(
        model_type="clip_vision_model",
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=3,
        attention_dropout=0.0,
    )


def tiny_llava(
    vocab_size: int = 128,
    *,
    hidden_size: int = 32,
    num_layers: int = 1,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    image_size: int = 16,
    patch_size: int = 4,
    vision_hidden_size: int = 32,
    max_positions: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama) with random weights.

    Each image (``[3, image_size, image_size]``, passed as ``pixel_values [B, 3, S, S]``) fills
    ``(image_size // patch_size) ** 2`` placeholder tokens (``info["num_image_tokens"]``).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    image_token_id = vocab_size - 1
    num_image_tokens = (image_size // patch_size) ** 2
    config = LlavaConfig(
        vision_config=clip_vision_config(image_size, patch_size, vision_hidden_size),
        text_config=dict(
            model_type="llama",
            **text_config(vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_positions),
        ),
        image_token_id=image_token_id,
        image_seq_length=num_image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=PAD,
    )
    state = _seeded(seed)
    model = _finish(LlavaForConditionalGeneration(config), state, dtype)
    info = _info(
        "llava",
        vocab_size,
        hidden_size,
        (3, vocab_size - 1),
        {"image": image_token_id},
        image_token_id=image_token_id,
        image_size=image_size,
        num_image_tokens=num_image_tokens,
    )
    return model, info


def tiny_qwen2_vl(
    vocab_size: int = 128,
    *,
    hidden_size: int = 32,
    num_layers: int = 1,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    image_size: int = 16,
    patch_size: int = 4,
    spatial_merge_size: int = 2,
    temporal_patch_size: int = 2,
    vision_hidden_size: int = 32,
    max_positions: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A ``Qwen2VLForConditionalGeneration`` (with M-RoPE) with random weights.

    Each ``image_size``-square image fills ``(image_size // patch_size // spatial_merge_size) ** 2``
    placeholder tokens (``info["num_image_tokens"]``), conventionally wrapped in
    ``vision_start_token_id`` / ``vision_end_token_id``. Build ``pixel_values`` and
    ``image_grid_thw`` with :func:`qwen2_vl_pixel_values`; pass ``mm_token_type_ids``
    (1 at image placeholders, 2 at video ones, else 0) so the model can compute M-RoPE.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = qwen_vision(image_size, patch_size, temporal_patch_size, spatial_merge_size)
    text = mrope_text_config(vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_positions, vision)
    image_token_id, video_token_id = vocab_size - 1, vocab_size - 2
    vision_start, vision_end = vocab_size - 4, vocab_size - 3
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=1,
            embed_dim=vision_hidden_size,
            hidden_size=hidden_size,
            num_heads=2,
            mlp_ratio=2,
            patch_size=patch_size,
            spatial_merge_size=spatial_merge_size,
            temporal_patch_size=temporal_patch_size,
            in_channels=3,
        ),
        text_config=text,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        vision_start_token_id=vision_start,
        vision_end_token_id=vision_end,
    )
    state = _seeded(seed)
    model = _finish(Qwen2VLForConditionalGeneration(config), state, dtype)
    info = _info(
        "qwen2_vl",
        vocab_size,
        hidden_size,
        (3, vocab_size - 4),
        {"image": image_token_id, "video": video_token_id},
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        vision_start_token_id=vision_start,
        vision_end_token_id=vision_end,
        **vision,
    )
    return model, info


def tiny_llama(
    vocab_size: int = 128,
    *,
    hidden_size: int = 32,
    num_layers: int = 1,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A text-only ``LlamaForCausalLM`` with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    text = text_config(vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_positions)
    config = LlamaConfig(**text)
    state = _seeded(seed)
    model = _finish(LlamaForCausalLM(config), state, dtype)
    info = _info("llama", vocab_size, hidden_size, (3, vocab_size), {})
    return model, info


def qwen2_vl_pixel_values(images: torch.Tensor, info: dict):
    """Turn images ``[N, 3, S, S]`` into Qwen2-VL's ``(pixel_values, image_grid_thw)``.

    Same patch order as the Qwen2-VL image processor: each image is repeated over
    ``temporal_patch_size`` frames and cut into ``patch_size`` patches grouped by
    ``spatial_merge_size`` blocks; returns ``pixel_values [N * gh * gw, 3 * tp * ps * ps]`` and
    ``image_grid_thw [N, 3]`` (int64).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [N, 3, S, S], got {tuple(images.shape)}")
    n, c, h, w = images.shape
    return qwen_video_pixel_values(images.unsqueeze(1).expand(n, info["temporal_patch_size"], c, h, w), info)


def tiny_qwen2_5_omni(
    vocab_size: int = 128,
    *,
    hidden_size: int = 32,
    num_layers: int = 1,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    image_size: int = 16,
    patch_size: int = 4,
    spatial_merge_size: int = 2,
    temporal_patch_size: int = 2,
    vision_hidden_size: int = 16,
    num_mel_bins: int = 8,
    audio_hidden_size: int = 16,
    max_positions: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A ``Qwen2_5OmniThinkerForConditionalGeneration`` (image, video and audio) with random weights.

    The thinker of Qwen2.5-Omni: a Qwen2.5-VL vision encoder (images and videos), a Whisper-style
    audio encoder and a Qwen2 decoder with M-RoPE. Placeholder ids at the top of the vocabulary:
    image ``V-1``, video ``V-2``, audio ``V-3``, ``<vision_start>`` ``V-4``, ``<vision_end>`` ``V-5``,
    ``<audio_start>`` ``V-6``, ``<audio_end>`` ``V-7``. Each block of placeholders must sit between
    its start and end markers (the model's 3-D position ids are computed from them).

    Inputs: images as for :func:`tiny_qwen2_vl` (``pixel_values``, ``image_grid_thw``; ``num_image_tokens``
    placeholders each); videos ``[T, 3, S, S]`` (``T`` a multiple of ``temporal_patch_size``) through
    :func:`qwen_video_pixel_values` (``pixel_values_videos``, ``video_grid_thw``; pass
    ``video_second_per_grid``), ``(T // temporal_patch_size) * num_image_tokens`` placeholders; audio
    as mel features ``input_features [N, num_mel_bins, frames]`` with ``feature_attention_mask
    [N, frames]``, :func:`omni_audio_tokens` ``(frames)`` placeholders per clip.
    """
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    vision = qwen_vision(image_size, patch_size, temporal_patch_size, spatial_merge_size)
    text = mrope_text_config(vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_positions, vision)
    text["tie_word_embeddings"] = False
    ids = dict(
        image_token_id=vocab_size - 1,
        video_token_id=vocab_size - 2,
        audio_token_id=vocab_size - 3,
        vision_start_token_id=vocab_size - 4,
        vision_end_token_id=vocab_size - 5,
        audio_start_token_id=vocab_size - 6,
        audio_end_token_id=vocab_size - 7,
    )
    config = Qwen2_5OmniThinkerConfig(
        audio_config=dict(
            num_mel_bins=num_mel_bins,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=2 * audio_hidden_size,
            d_model=audio_hidden_size,
            output_dim=hidden_size,
            n_window=8,
            max_source_positions=max_positions,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=vision_hidden_size,
            intermediate_size=2 * vision_hidden_size,
            num_heads=2,
            in_channels=3,
            patch_size=patch_size,
            spatial_merge_size=spatial_merge_size,
            temporal_patch_size=temporal_patch_size,
            window_size=image_size,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[0],
        ),
        text_config=text,
        audio_token_index=ids["audio_token_id"],
        image_token_index=ids["image_token_id"],
        video_token_index=ids["video_token_id"],
        audio_start_token_id=ids["audio_start_token_id"],
        audio_end_token_id=ids["audio_end_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
    )
    state = _seeded(seed)
    model = _finish(Qwen2_5OmniThinkerForConditionalGeneration(config), state, dtype)
    info = _info(
        "qwen2_5_omni",
        vocab_size,
        hidden_size,
        (3, vocab_size - 7),
        {"image": ids["image_token_id"], "video": ids["video_token_id"], "audio": ids["audio_token_id"]},
        num_mel_bins=num_mel_bins,
        **vision,
        **ids,
    )
    return model, info


def tiny_qwen3_omni(
    vocab_size: int,
    token_ids: dict,
    *,
    hidden_size: int = 32,
    num_layers: int = 1,
    num_heads: int = 2,
    num_experts: int = 4,
    patch_size: int = 16,
    num_mel_bins: int = 8,
    max_positions: int = 2048,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A ``Qwen3OmniMoeThinkerForConditionalGeneration`` (image, video and audio) with random weights.

    The thinker of Qwen3-Omni: a Qwen3-VL vision encoder (2x2 merged ``patch_size`` patches, 2 frames
    a temporal patch, its first block's features added to the first decoder layer: "deepstack"), an
    audio encoder (13 placeholders per 100 mel frames: windows of ``n_window`` = 50, Qwen3-Omni's)
    and a mixture-of-experts decoder (``num_experts``, 2 routed per token) with interleaved M-RoPE.
    ``token_ids``: the ids of its tokenizer's placeholders and markers (``image_token_id``,
    ``video_token_id``, ``audio_token_id``, ``vision_start_token_id``, ``vision_end_token_id``,
    ``audio_start_token_id``, ``audio_end_token_id``, ``user_token_id``): the model reads them
    to place its 3-D positions. Fed through ``Qwen3OmniMoeProcessor`` (:mod:`modkern.apps.tiny_processors`).
    """
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    head_dim = hidden_size // num_heads
    half = head_dim // 2  # M-RoPE splits head_dim / 2 frequencies over (temporal, height, width)
    text = text_config(vocab_size, hidden_size, num_layers, num_heads, None, max_positions)
    text.update(
        head_dim=head_dim,
        rope_parameters=dict(
            rope_type="default",
            rope_theta=10000.0,
            mrope_section=[half - 2 * (half // 4), half // 4, half // 4],
            mrope_interleaved=True,
        ),
        num_experts=num_experts,
        num_experts_per_tok=2,
        moe_intermediate_size=hidden_size // 2,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    )
    config = Qwen3OmniMoeThinkerConfig(
        text_config=text,
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            in_channels=3,
            patch_size=patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=hidden_size,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        ),
        audio_config=dict(
            num_mel_bins=num_mel_bins,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=32,
            d_model=16,
            output_dim=hidden_size,
            max_source_positions=64,
            n_window=50,
            n_window_infer=800,
            conv_chunksize=500,
            downsample_hidden_size=8,
        ),
        position_id_per_seconds=13,
        tie_word_embeddings=False,
        **token_ids,
    )
    state = _seeded(seed)
    return _finish(Qwen3OmniMoeThinkerForConditionalGeneration(config), state, dtype)


def qwen_video_pixel_values(videos: torch.Tensor, info: dict):
    """Turn videos ``[N, T, 3, S, S]`` into Qwen-VL's ``(pixel_values_videos, video_grid_thw)``.

    ``T`` must be a multiple of ``temporal_patch_size``; same patch order as
    :func:`qwen2_vl_pixel_values` (which is the case ``T == temporal_patch_size`` of a repeated image).
    """
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must have shape [N, T, 3, S, S], got {tuple(videos.shape)}")
    n, t, c, h, w = videos.shape
    ps, tp, ms = info["patch_size"], info["temporal_patch_size"], info["spatial_merge_size"]
    if t % tp:
        raise ValueError(f"the number of frames ({t}) must be a multiple of temporal_patch_size ({tp})")
    if h % (ps * ms) or w % (ps * ms):
        raise ValueError(f"frame height/width must be multiples of {ps * ms}, got {h}x{w}")
    gt, gh, gw = t // tp, h // ps, w // ps
    patches = videos.reshape(n, gt, tp, c, gh // ms, ms, ps, gw // ms, ms, ps)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    pixel_values = patches.reshape(n * gt * gh * gw, c * tp * ps * ps).contiguous()
    grid = torch.tensor([[gt, gh, gw]] * n, dtype=torch.long, device=videos.device)
    return pixel_values, grid


def omni_audio_tokens(frames: int) -> int:
    """Audio placeholders the Qwen2.5-Omni audio encoder makes from ``frames`` mel frames
    (a stride-2 convolution, then stride-2 pooling)."""
    after_conv = (frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1
