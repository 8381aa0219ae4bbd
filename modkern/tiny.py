"""Tiny multimodal and text-only models built from configs with random weights (no download).

Used by the tests and the CPU demo. Every builder returns ``(model, info)``: ``model`` is a
Hugging Face model in train mode on CPU, ``info`` a dict with the ids and sizes a caller needs to
build inputs:

- ``"kind"``: ``"llava"``, ``"qwen2_vl"`` or ``"llama"``;
- ``"vocab_size"``, ``"hidden_size"``;
- ``"pad_token_id"`` (0), ``"bos_token_id"`` (1), ``"eos_token_id"`` (2);
- ``"text_token_range"``: ``(lo, hi)``, ids ``lo <= id < hi`` are free for ordinary text;
- ``"token_ids"``: the modality placeholder mapping for :func:`modkern.modality_mask`
  (``{}`` for the text-only model);
- multimodal models: ``"image_token_id"``, ``"image_size"``, ``"num_image_tokens"`` (placeholder
  tokens per image); Qwen2-VL also ``"video_token_id"``, ``"vision_start_token_id"``,
  ``"vision_end_token_id"``, ``"patch_size"``, ``"temporal_patch_size"``, ``"spatial_merge_size"``
  (turn images into its inputs with :func:`qwen2_vl_pixel_values`).

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


def _text_config(vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_positions):
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
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=vision_hidden_size,
            intermediate_size=2 * vision_hidden_size,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
            num_channels=3,
            attention_dropout=0.0,
        ),
        text_config=dict(
            model_type="llama",
            **_text_config(vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_positions),
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

    if image_size % (patch_size * spatial_merge_size):
        raise ValueError("image_size must be a multiple of patch_size * spatial_merge_size")
    head_dim = hidden_size // num_heads
    if head_dim % 2:
        raise ValueError("hidden_size // num_heads must be even")
    # M-RoPE splits head_dim / 2 frequencies over (temporal, height, width).
    half = head_dim // 2
    mrope_section = [half - 2 * (half // 3), half // 3, half // 3]
    image_token_id, video_token_id = vocab_size - 1, vocab_size - 2
    vision_start, vision_end = vocab_size - 4, vocab_size - 3
    text = _text_config(vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_positions)
    text["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope_section)
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
    side = image_size // patch_size
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
        image_size=image_size,
        patch_size=patch_size,
        temporal_patch_size=temporal_patch_size,
        spatial_merge_size=spatial_merge_size,
        num_image_tokens=(side // spatial_merge_size) ** 2,
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

    text = _text_config(vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_positions)
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
    ps, tp, ms = info["patch_size"], info["temporal_patch_size"], info["spatial_merge_size"]
    if h % (ps * ms) or w % (ps * ms):
        raise ValueError(f"image height/width must be multiples of {ps * ms}, got {h}x{w}")
    gh, gw = h // ps, w // ps
    frames = images.unsqueeze(1).expand(n, tp, c, h, w)
    patches = frames.reshape(n, 1, tp, c, gh // ms, ms, ps, gw // ms, ms, ps)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    pixel_values = patches.reshape(n * gh * gw, c * tp * ps * ps).contiguous()
    grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.long, device=images.device)
    return pixel_values, grid
