"""One robust training step in a process of its own: peak memory and step time of one provider.

Run by ``bench_robust_step.py::test_robust_step_memory`` once per provider, so that each peak
resident set size (CPU) or peak allocation (CUDA) belongs to that provider alone::

    python benchmarks/robust_step_worker.py --provider modkern --vocab 152064 --batch 4 --seq 512 --answer 8

Prints one JSON line: ``provider``, ``loss``, ``step_ms`` (median of the timed steps),
``peak_mb`` (CPU: peak RSS of the process; CUDA: peak allocated), ``base_mb`` (the same right
before the first step: interpreter, torch, model, batch), ``step_peak_mb = peak_mb - base_mb``.

The model is a Llama text model with random weights (hidden 128, 2 layers by default: the layers
are tiny so that the vocabulary-sized work dominates, as it does per token at real scale); every
sample perturbs its prompt; alpha 0.1, epsilon 1e-3, K = 2, lambda 0.01, KL consistency (the
paper's LLaVA setting).
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


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.train()
    input_ids = torch.randint(3, args.vocab, (args.batch, args.seq), device=device)
    labels = torch.full_like(input_ids, -100)
    labels[:, -args.answer :] = input_ids[:, -args.answer :]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return model, batch


def objective(provider: str, model, batch):
    if provider == "modkern":
        from modkern.objective.robust import RobustConfig, robust_loss

        config = RobustConfig(divergence="kl", **HPARAMS)
        return lambda: robust_loss(model, batch, config).loss
    from eager_objective import eager_robust_loss

    return lambda: eager_robust_loss(model, batch, **HPARAMS)[0]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--provider", choices=("modkern", "eager-official"), required=True)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--answer", type=int, default=8, help="answer tokens per sample")
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
    loss_fn = objective(args.provider, model, batch)

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return float(loss.detach())

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        base = rss_mb()
    times, losses = [], []
    for i in range(args.warmup + args.repeat):
        start = time.perf_counter()
        losses.append(step())
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
        shape=f"B={args.batch} L={args.seq} answer={args.answer} V={args.vocab} H={args.hidden} layers={args.layers}",
        dtype=args.dtype,
        threads=torch.get_num_threads(),
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
