"""End to end: one robust training step (clean + K=2 attack + adversarial pass + consistency).

One step = ``zero_grad`` + the objective of SPEC §2 + one backward (no optimizer step: it is the
same for both sides). Model: a Llama text model with random weights in the shape of LLaVA-1.5's
language model (on GPU a ~1.1B-parameter TinyLlama-shaped model, bf16, V = 32064 and 152064; on
CPU a tiny one). Every sample perturbs its prompt (the text tokens that are neither answer nor
padding), with the paper's LLaVA hyper-parameters: alpha 0.1, epsilon 1e-3, K = 2, lambda 0.01,
KL consistency.

Providers: ``modkern`` (``modkern.objective.robust.robust_loss``) and ``eager-official`` (the same
objective written the way the official code writes it: ``eager_objective.py``). Records the step
time (CUDA events on GPU) and the peak memory.

``test_robust_step_memory`` runs the step at Qwen's vocabulary (V = 152064) with each provider in
a process of its own (``robust_step_worker.py``), so that the peak resident memory on CPU belongs
to one provider: on CPU a Llama with tiny layers (hidden 128, 2 layers), batch 4 x 512 tokens with
8 answer tokens per sample; on GPU the TinyLlama shape in bf16, batch 8 x 1024.
"""

from __future__ import annotations

import os

import pytest
import torch
from _harness import (
    DEVICE,
    ON_CUDA,
    events_median_ms,
    median,
    record,
    run_step_worker,
    set_group,
    skip_out_of_memory,
)
from eager_objective import eager_robust_loss

HPARAMS = dict(epsilon=1e-3, alpha=0.1, steps=2, lam=0.01, temperature=1.0)
VOCABS = (32064, 152064)

if ON_CUDA:
    # TinyLlama-1.1B shape (Llama-2 architecture, GQA): ~1.1B parameters at V = 32064.
    MODEL = dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
    )
    BATCH = int(os.environ.get("MODKERN_BENCH_E2E_BATCH", "8"))
    SEQ = int(os.environ.get("MODKERN_BENCH_E2E_SEQ", "1024"))
    ANSWER = int(os.environ.get("MODKERN_BENCH_E2E_ANSWER", "64"))
    DTYPE = torch.bfloat16
    WARMUP, REPEAT = 2, 5
else:
    MODEL = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    BATCH, SEQ, ANSWER = 2, 32, 4
    DTYPE = torch.float32
    WARMUP, REPEAT = 1, 2


def _robust_api():
    try:
        from modkern.objective.robust import RobustConfig, robust_loss
    except ImportError as exc:
        return None, f"modkern.objective.robust is not importable yet ({exc})"
    return (RobustConfig, robust_loss), None


_API, _API_MISSING = _robust_api()


def _build_model(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=max(2048, SEQ),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attention_dropout=0.0,
        **MODEL,
    )
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config)
    model = model.to(DTYPE)
    model.train()
    return model


def _batch(vocab):
    input_ids = torch.randint(3, vocab, (BATCH, SEQ), device=DEVICE)
    labels = torch.full_like(input_ids, -100)
    labels[:, -ANSWER:] = input_ids[:, -ANSWER:]
    attention_mask = torch.ones_like(input_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(scope="module", params=VOCABS, ids=lambda v: f"V{v}")
def model_and_batch(request):
    model = _build_model(request.param)
    yield model, request.param
    del model
    if ON_CUDA:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("provider", ["modkern", "eager-official"])
def test_robust_step(benchmark, provider, model_and_batch):
    model, vocab = model_and_batch
    torch.manual_seed(0)
    batch = _batch(vocab)
    if provider == "modkern":
        if _API_MISSING:
            pytest.skip(_API_MISSING)
        config_cls, robust_loss = _API
        config = config_cls(divergence="kl", **HPARAMS)
        objective = lambda: robust_loss(model, batch, config).loss
    else:
        objective = lambda: eager_robust_loss(model, batch, **HPARAMS)[0]

    losses = []

    def step():
        model.zero_grad(set_to_none=True)
        loss = objective()
        loss.backward()
        losses.append(loss.detach())

    n_params = sum(p.numel() for p in model.parameters())
    shape = (
        f"B={BATCH} L={SEQ} V={vocab} ({n_params / 1e9:.2f}B params)"
        if ON_CUDA
        else (f"B={BATCH} L={SEQ} V={vocab} (tiny, {n_params / 1e6:.1f}M params)")
    )
    info = dict(op="robust_step", mode="K=2 kl", provider=provider, shape=shape, dtype=str(DTYPE)[6:])
    set_group(benchmark, info)
    try:
        times = events_median_ms(step, warmup=WARMUP, repeat=REPEAT)
        peak = base = None
        if ON_CUDA:
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(DEVICE)
            base = torch.cuda.memory_allocated(DEVICE)
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(DEVICE)
    except torch.OutOfMemoryError as exc:
        model.zero_grad(set_to_none=True)
        losses.clear()
        skip_out_of_memory(info, exc)
    assert all(bool(torch.isfinite(x)) for x in losses), f"{provider} produced a non-finite loss"

    def synced_step():
        step()
        if ON_CUDA:
            torch.cuda.synchronize()

    benchmark.pedantic(synced_step, rounds=1, iterations=1)
    record(
        benchmark,
        median_ms=median(times),
        bytes_moved=None,
        peak_mem_mb=None if peak is None else (peak - base) / 2**20,
        timer="CUDA events median" if ON_CUDA else "host perf_counter median (CPU)",
        info=info,
    )
    benchmark.extra_info.update(
        step_times_ms=times,
        peak_mem_total_mb=None if peak is None else peak / 2**20,
        loss=float(losses[-1]),
    )


# ----------------------------------------------------------------------------------------------
# The step at a real vocabulary, each provider in a process of its own (peak memory per provider)

MEMORY_CASE = dict(
    vocab=int(os.environ.get("MODKERN_BENCH_MEM_VOCAB", "152064")),
    batch=int(os.environ.get("MODKERN_BENCH_MEM_BATCH", "8" if ON_CUDA else "4")),
    seq=int(os.environ.get("MODKERN_BENCH_MEM_SEQ", "1024" if ON_CUDA else "512")),
    answer=int(os.environ.get("MODKERN_BENCH_MEM_ANSWER", "8")),
    hidden=2048 if ON_CUDA else 128,
    layers=22 if ON_CUDA else 2,
    intermediate=5632 if ON_CUDA else 256,
    heads=32 if ON_CUDA else 4,
    kv_heads=4 if ON_CUDA else 2,
)
_MEMORY_RESULTS: dict = {}


@pytest.mark.parametrize("provider", ["eager-official", "modkern"])
def test_robust_step_memory(benchmark, provider):
    """Peak memory and step time of one robust step at V = 152064, each provider in its own process.

    The modkern row also records the ratios to the eager row measured in the same run
    (``peak_ratio``: whole-process peak; ``step_peak_ratio``: the step's own increase).
    """
    result = run_step_worker(provider, MEMORY_CASE)
    _MEMORY_RESULTS[provider] = result
    info = dict(op="robust_step_memory", mode="K=2 kl", provider=provider, shape=result["shape"], dtype=result["dtype"])
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    record(
        benchmark,
        median_ms=result["step_ms"],
        bytes_moved=None,
        peak_mem_mb=result["peak_mb"],
        timer="host perf_counter, 1 warm-up + 1 timed step, own process",
        info=info,
    )
    benchmark.extra_info.update(
        loss=result["loss"], base_mb=result["base_mb"], step_peak_mb=result["step_peak_mb"], memory=result["memory"]
    )
    eager = _MEMORY_RESULTS.get("eager-official")
    if provider == "modkern" and eager is not None:
        ratios = dict(
            peak_ratio=result["peak_mb"] / eager["peak_mb"],
            step_peak_ratio=result["step_peak_mb"] / eager["step_peak_mb"],
            time_ratio=result["step_ms"] / eager["step_ms"],
        )
        benchmark.extra_info.update(ratios)
        print(
            f"\nrobust step {result['shape']}: modkern / eager-official = peak {ratios['peak_ratio']:.3f}x "
            f"(step's own {ratios['step_peak_ratio']:.3f}x), time {ratios['time_ratio']:.3f}x; "
            f"loss {result['loss']:.4f} vs {eager['loss']:.4f}"
        )
