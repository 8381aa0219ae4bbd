"""The robust step against a plain SFT step where the decoder layers, not the LM head, decide.

At real scale the head is ~2-8% of a 7B model's per-token work: the robust step's cost is its
K + 2 passes through the layers. This suite measures one training step (``zero_grad`` + loss +
``backward``; no optimizer step) of three providers, alternated round by round in one process:

* ``sft``: next-token CE of the clean batch (the step robust training replaces);
* ``eager-official``: the objective written the way the official code writes it
  (``eager_objective.py``: K attack passes and one concatenated clean + adversarial pass over the
  whole batch, full logits);
* ``modkern``: ``robust_loss`` with the paper's defaults (``skip_unperturbed``: the attack and the
  adversarial forward only on the samples with something to perturb);
* ``modkern-whole-batch``: the same with ``skip_unperturbed=False`` (every pass on the whole batch).

Model and batch (a LLaVA-like layout on a Llama decoder with placeholder image tokens: the vision
encoder is not re-run by the attack, so the decoder is what the passes cost): a system prompt,
256 image placeholders, a question and 8 answer tokens per sample; 8 samples in the official
configs' 2:2:4 mix (image-heavy: the text is perturbed; text-heavy: the image tokens; VQA:
nothing). K = 2, KL consistency, lambda 0.01. CPU: hidden 256, 6 layers, V 2048, fp32 (the
LLaVA-1.5 576-token layout too, ``MODKERN_BENCH_COST_LLAVA=1``); GPU: a Qwen2-0.5B-like decoder
(hidden 896, 24 layers, V 151936) in bf16.

Each case records ``median_ms`` and ``time_over_sft`` (its median over the SFT median of the same
rounds), and the step's peak memory (``peak_mem_mb``, ``peak_over_sft``) from a process of its own
(``robust_step_worker.py``: peak RSS increase on CPU, peak allocation on GPU). Target on CPU:
modkern <= 2.3x an SFT step (the official-style objective ~4x). CPU ratios are indicative (one thread; see conftest.py).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from _harness import DEVICE, ON_CUDA, median, record, run_step_worker, set_group
from robust_step_worker import MIX, PROVIDERS, QUESTION, SYSTEM, llama, mix_batch, objective, train_step

ANSWER = 8
if ON_CUDA:
    MODEL = dict(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=151936)
    DTYPE, ROUNDS = torch.bfloat16, 5
else:
    MODEL = dict(hidden=256, intermediate=688, layers=6, heads=4, kv_heads=4, vocab=2048)
    DTYPE, ROUNDS = torch.float32, 3
LAYOUTS = {"256 image tokens": 256}
if ON_CUDA or os.environ.get("MODKERN_BENCH_COST_LLAVA") == "1":
    LAYOUTS["LLaVA-1.5 576 image tokens"] = 576
_RESULTS: dict = {}


def _model():
    keys = ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads")
    return llama(*(MODEL[k] for k in keys), 2048, DTYPE, DEVICE)


def _measure(image_tokens: int) -> dict:
    """Every provider's step times, alternated round by round (one warm-up round first), and each
    provider's peak memory from a process of its own (robust_step_worker.py)."""
    model = _model()
    batch = mix_batch(image_tokens, ANSWER, MODEL["vocab"], DEVICE)
    loss_fns = {p: objective(p, model, batch, mix=True) for p in PROVIDERS}
    times = {p: [] for p in PROVIDERS}
    losses = {}
    for round_ in range(ROUNDS + 1):
        for provider in PROVIDERS:
            t0 = time.perf_counter()
            losses[provider] = train_step(model, loss_fns[provider])
            if round_:
                times[provider].append(1e3 * (time.perf_counter() - t0))
    del model, loss_fns
    case = dict(image_tokens=image_tokens, answer=ANSWER, **MODEL, warmup=0, repeat=1)
    peaks = {p: run_step_worker(p, case) for p in PROVIDERS}
    return dict(times=times, losses=losses, peaks=peaks)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_step_cost(benchmark, provider, layout):
    if layout not in _RESULTS:
        _RESULTS[layout] = _measure(LAYOUTS[layout])
    result = _RESULTS[layout]
    ms, sft_ms = median(result["times"][provider]), median(result["times"]["sft"])
    peak, sft_peak = result["peaks"][provider]["step_peak_mb"], result["peaks"]["sft"]["step_peak_mb"]
    length = SYSTEM + LAYOUTS[layout] + QUESTION + ANSWER
    shape = f"B={len(MIX)} (2:2:4) L={length} {layout}, H={MODEL['hidden']} layers={MODEL['layers']} V={MODEL['vocab']}"
    info = dict(op="robust_step_cost", mode="K=2 kl, time / SFT step", provider=provider, shape=shape)
    info["dtype"] = str(DTYPE)[6:]
    set_group(benchmark, info)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    record(
        benchmark,
        median_ms=ms,
        bytes_moved=None,
        peak_mem_mb=peak,
        timer=f"host perf_counter, {ROUNDS} rounds alternated with the other providers",
        info=info,
    )
    benchmark.extra_info.update(
        time_over_sft=ms / sft_ms,
        peak_over_sft=peak / sft_peak,
        peak_memory=result["peaks"][provider]["memory"] + ", the step's increase, own process",
        step_times_ms=result["times"][provider],
        loss=result["losses"][provider],
    )
    print(
        f"\n{layout}: {provider} {ms:.1f} ms = {ms / sft_ms:.2f}x SFT, step peak {peak:.0f} MB = "
        f"{peak / sft_peak:.2f}x SFT (loss {result['losses'][provider]:.4f})"
    )
    assert torch.isfinite(torch.tensor(result["losses"][provider]))
