"""One robust training step in a process of its own: peak memory and step time of one provider.

Run by ``bench_robust_step.py::test_robust_step_memory`` once per provider, so that each peak
resident set size (CPU) or peak allocation (CUDA) belongs to that provider alone::

    python benchmarks/robust_step_worker.py --provider modkern --vocab 152064 --batch 4 --seq 512 --answer 8

Prints one JSON line: ``provider``, ``loss``, ``step_ms`` (median of the timed steps),
``peak_mb`` (CPU: peak RSS of the process; CUDA: peak allocated), ``base_mb`` (the same right
before the first step: interpreter, torch, model, batch), ``step_peak_mb = peak_mb - base_mb``.

The model is a Llama text model with random weights (hidden 128, 2 layers by default: the layers
are tiny so that the vocabulary-sized work dominates: the regime where the logits' memory decides.
At real scale that holds for memory, not for time: the decoder layers dominate the step's compute,
which ``bench_step_cost.py`` measures); every sample perturbs its prompt; alpha 0.1, epsilon 1e-3,
K = 2, lambda 0.01, KL consistency (the paper's LLaVA setting). With ``--image-tokens N`` the batch
is instead the LLaVA-like 2:2:4 mix of :func:`mix_batch` (``bench_step_cost.py``'s layout).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

HPARAMS = dict(epsilon=1e-3, alpha=0.1, steps=2, lam=0.01, temperature=1.0)
PROVIDERS = ("sft", "eager-official", "modkern", "modkern-whole-batch")

# The LLaVA-like layout: per sample a system prompt, N image placeholders, a question and the
# answer; 8 samples in the official configs' 2:2:4 mix (image-heavy, text-heavy, VQA).
MIX = ["image_heavy"] * 2 + ["text_heavy"] * 2 + ["vqa"] * 4
IMAGE_TOKEN = 3
SYSTEM, QUESTION = 32, 16


def mix_batch(image_tokens: int, answer: int, vocab: int, device) -> dict:
    """[system prompt, image placeholders, question, answer] per sample of :data:`MIX`."""
    gen = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(4, vocab, (len(MIX), n), generator=gen)  # noqa: E731
    image = torch.full((len(MIX), image_tokens), IMAGE_TOKEN)
    input_ids = torch.cat([text(SYSTEM), image, text(QUESTION), text(answer)], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -answer:] = input_ids[:, -answer:]
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
    return {k: v.to(device) for k, v in batch.items()}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (VmHWM; the process's lifetime peak without it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Reset the kernel's peak RSS (VmHWM) to the current RSS (Linux: ``5`` into clear_refs), so that
    the peak measured after it belongs to the step, not to the imports or the model's construction."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def llama(vocab, hidden, intermediate, layers, heads, kv_heads, max_positions, dtype, device):
    """A Llama causal LM with random weights (seed 0), in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.train()


def train_step(model, loss_fn) -> float:
    """``zero_grad`` + loss + ``backward`` (no optimizer step); the loss, after a device sync."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    if loss.is_cuda:
        torch.cuda.synchronize()
    return float(loss.detach())


def build(args, device):
    model = llama(
        args.vocab,
        args.hidden,
        args.intermediate or 2 * args.hidden,
        args.layers,
        args.heads,
        args.kv_heads,
        max(2048, args.seq),
        getattr(torch, args.dtype),
        device,
    )
    if args.image_tokens:
        return model, mix_batch(args.image_tokens, args.answer, args.vocab, device)
    input_ids = torch.randint(3, args.vocab, (args.batch, args.seq), device=device)
    labels = torch.full_like(input_ids, -100)
    labels[:, -args.answer :] = input_ids[:, -args.answer :]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return model, batch


def objective(provider: str, model, batch, mix: bool = False):
    """One provider's loss of ``batch`` (``mix``: the batch of :func:`mix_batch`, with sample kinds)."""
    from eager_objective import eager_robust_loss

    from modkern.objective.robust import RobustConfig, robust_loss, shift_labels

    if provider == "sft":

        def sft():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            targets = shift_labels(batch["labels"]).flatten()
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=-100)

        return sft
    if provider == "eager-official":
        kinds = dict(data_types=[{"vqa": "VQA"}.get(k, k) for k in MIX], image_token_id=IMAGE_TOKEN) if mix else {}
        return lambda: eager_robust_loss(model, batch, **kinds, **HPARAMS)[0]
    config = RobustConfig(divergence="kl", skip_unperturbed=provider == "modkern", **HPARAMS)
    if mix:
        config = config.replace(token_ids={"image": IMAGE_TOKEN})
        batch = dict(batch, sample_kind=MIX)
    return lambda: robust_loss(model, batch, config).loss


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--provider", choices=PROVIDERS, required=True)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--answer", type=int, default=8, help="answer tokens per sample")
    parser.add_argument("--image-tokens", type=int, default=0, help="> 0: the 2:2:4 mix layout (mix_batch)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=0, help="MLP size (0: 2 x hidden)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model, batch = build(args, device)
    loss_fn = objective(args.provider, model, batch, mix=args.image_tokens > 0)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        reset_peak_rss()
        base = rss_mb()
    times, losses = [], []
    for i in range(args.warmup + args.repeat):
        start = time.perf_counter()
        losses.append(train_step(model, loss_fn))
        if i >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else peak_rss_mb()
    times.sort()
    result = dict(
        provider=args.provider,
        loss=losses[-1],
        step_ms=times[len(times) // 2],
        step_times_ms=times,
        peak_mb=peak,
        base_mb=base,
        step_peak_mb=peak - base,
        memory="peak allocated (CUDA)" if cuda else "peak RSS of the process",
        shape=f"B={batch['input_ids'].shape[0]} L={batch['input_ids'].shape[1]} answer={args.answer} V={args.vocab} "
        f"H={args.hidden} layers={args.layers}",
        dtype=args.dtype,
        threads=torch.get_num_threads(),
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
