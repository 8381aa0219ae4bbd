"""Worker programs of the multi-process tests (tests/test_distributed.py), one per engine.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node=2 distributed_workers.py NAME OUT_DIR``;
each rank writes ``OUT_DIR/rank{r}.pt`` (full parameters and a few facts about its run). The ranks get
different data on purpose (:func:`rank_batches`): an all-VQA micro-batch (empty modality mask) on one
rank while the other perturbs text, heuristic copies (``ref_index``) and different answer lengths, and a
micro-batch without any answer row. The objective must run the same module forwards and backwards on
every rank whatever its data, or the parameter all-gathers / reduce-scatters of FSDP2 and ZeRO-3 stop
pairing up (gloo: a hang or a collective mismatch).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch

from modkern.objective.robust import RobustConfig

# zero start: the attack is deterministic, so a single process can compute the reference
# attack_normalization="num_items": the perturbation does not depend on how the batch is split over
# ranks / micro-batches, so the sharded runs equal one process on the whole batch.
CONFIG = RobustConfig(init="zero", steps=2, epsilon=0.05, alpha=2.0, lam=0.5, attack_normalization="num_items")
LR = 0.5


def rank_batches(info):
    """``[step][rank]`` micro-batches (2 steps x 2 ranks) for a tiny LLaVA."""
    from tiny_models import make_batch

    vqa = make_batch(info, 2, seed=10, kinds=["vqa", "vqa"], answer_lens=[2, 1])
    text = make_batch(info, 2, seed=11, kinds=["image_heavy", "text_heavy"], answer_lens=[3, 1], copies=((0, 5),))
    image = make_batch(info, 3, seed=12, kinds=["image_heavy"] * 3, answer_lens=[1, 4, 2])
    no_answer = make_batch(info, 2, seed=13, kinds=["vqa", "image_heavy"])
    no_answer["labels"] = torch.full_like(no_answer["labels"], -100)
    return [[vqa, text], [image, no_answer]]


def answer_tokens(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def step_counts(batches) -> dict:
    """The accumulated normalizers of one step's batches (every rank's): answer tokens, clean samples."""
    from modkern.objective.robust import count_clean_samples

    return dict(
        num_items_in_batch=sum(answer_tokens(b) for b in batches), num_clean_in_batch=count_clean_samples(batches)
    )


def reference_params(build, steps_batches, config=CONFIG, lr=LR):
    """What the ranks must end with: SGD on the sum of every rank's robust loss over the step's tokens."""
    from modkern.objective.robust import robust_loss

    model, _ = build()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for batches in steps_batches:
        counts = step_counts(batches)
        for batch in batches:
            robust_loss(model, batch, config, **counts).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class AttackWatch:
    """Records, on every call of a module, whether its parameters require grad, and checks after each
    attack that no parameter accumulated a gradient."""

    def __init__(self, module, model, head=None):
        self.flags, self.head_flags = [], []
        self.model = model
        self.grads_after_attack = []
        module.register_forward_pre_hook(lambda m, a: self.flags.append([p.requires_grad for p in m.parameters()]))
        if head is not None:  # a module of the root FSDP2 unit (gathered from the clean forward on)
            head.register_forward_pre_hook(
                lambda m, a: self.head_flags.append([p.requires_grad for p in m.parameters()])
            )

    def __enter__(self):
        import modkern.objective.robust as robust

        self._robust, self._attack = robust, robust._attack

        def attack(*a, **k):
            out = self._attack(*a, **k)
            self.grads_after_attack.append([n for n, p in self.model.named_parameters() if p.grad is not None])
            return out

        robust._attack = attack
        return self

    def __exit__(self, *exc):
        self._robust._attack = self._attack
        return False


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _save(out_dir, rank, model, **facts):
    params = {n: _full(p.detach()).cpu().clone() for n, p in model.named_parameters()}
    torch.save({"params": params, **facts}, os.path.join(out_dir, f"rank{rank}.pt"))


def fsdp2_manual(out_dir):
    """``fully_shard`` on the decoder layers and the root; a plain loop of robust_loss + SGD."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from modkern.apps.tiny_models import tiny_llava
    from modkern.objective.robust import robust_loss

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    model, info = tiny_llava(seed=0)
    layers = model.model.language_model.layers
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    masks, losses = [], []
    with AttackWatch(layers[0].self_attn.q_proj, model, head=model.lm_head) as watch:
        for batches in rank_batches(info):
            out = robust_loss(model, batches[rank], CONFIG, **step_counts(batches))
            (out.loss * world).backward()  # FSDP averages the gradients over the ranks
            opt.step()
            opt.zero_grad(set_to_none=True)
            masks.append(int(out.mask.sum()))
            losses.append(float(out.loss))
    facts = dict(flags=watch.flags, head_flags=watch.head_flags, attack_grads=watch.grads_after_attack)
    _save(out_dir, rank, model, masks=masks, losses=losses, **facts)


def _rank_trainer(model, args, batches_of_rank, config=CONFIG, trainer_class=None):
    """A patched Trainer whose train dataloader yields this rank's prepared micro-batches as they are."""
    from transformers import Trainer

    from modkern.integrations.hf import patch_trainer

    class _RankData(trainer_class or Trainer):
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(batches_of_rank, batch_size=None, shuffle=False)

    return patch_trainer(_RankData(model=model, args=args, train_dataset=batches_of_rank), config)


def _trainer_args(out_dir, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=os.path.join(out_dir, "trainer"),
        per_device_train_batch_size=2,
        max_steps=2,
        optim="sgd",
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="nccl" if torch.cuda.is_available() else "gloo",
        ddp_timeout=60,
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _accelerate_fsdp_on_cpu():
    """accelerate drops the FSDP plugin on CPU: ``AcceleratorState.__init__`` switches to
    ``DistributedType.FSDP`` only for the accelerator types (MULTI_GPU, MULTI_NPU, MULTI_XPU, ...), not
    for MULTI_CPU, so the Trainer would silently fall back to DDP. Do what it does on a GPU."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = patched


def fsdp2_trainer(out_dir):
    """The Hugging Face Trainer's own FSDP2 (through accelerate), decoder layers wrapped."""
    from modkern.apps.tiny_models import tiny_llava

    if not torch.cuda.is_available():
        _accelerate_fsdp_on_cpu()

    args = _trainer_args(
        out_dir,
        fsdp="full_shard",
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
    )
    rank = args.process_index
    model, info = tiny_llava(seed=0)
    layers = model.model.language_model.layers
    trainer = _rank_trainer(model, args, [step[rank] for step in rank_batches(info)])
    with AttackWatch(layers[0].self_attn.q_proj, model, head=model.lm_head) as watch:
        trainer.train()
    wrapped = trainer.model_wrapped
    assert type(wrapped).__name__.startswith("FSDP"), type(wrapped)
    assert all(type(p).__name__ == "DTensor" for p in wrapped.parameters())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    facts = dict(flags=watch.flags, head_flags=watch.head_flags, attack_grads=watch.grads_after_attack)
    _save(out_dir, rank, wrapped, logs=logs, **facts)


ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,  # the Trainer's SGD
    "zero_optimization": {
        "stage": 3,
        # partition every parameter, however small (the tiny model's would all stay whole by default)
        "stage3_param_persistence_threshold": 0,
        "stage3_prefetch_bucket_size": 0,
    },
}


def _accelerate_deepspeed_on_cpu():
    """On a machine without an accelerator, the Trainer's PartialState (``use_cpu=False``, no backend
    given for DeepSpeed) gets ``backend=None``: accelerate then counts one process although DeepSpeed's
    CPU accelerator has initialized a 2-process gloo group, and DeepSpeed rejects the batch sizes
    (``train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 2 != 2 * 1 * 2``).
    Configure the state ourselves with the gloo backend; the Trainer then uses it (``use_configured_state``)."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo", timeout=timedelta(seconds=60))
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def zero3_trainer(out_dir):
    """DeepSpeed ZeRO-3 through the Trainer (accelerate's DeepSpeed plugin); on CPU DeepSpeed's CPU
    accelerator with gloo."""
    from modkern.apps.tiny_models import tiny_llava

    config = dict(ZERO3)
    # built before the arguments: deepspeed.initialize partitions it (with the ZeRO-3 arguments alive,
    # from_config would build it under deepspeed.zero.Init before the batch sizes are resolved)
    model, info = tiny_llava(seed=0)
    kw = {}
    if not torch.cuda.is_available():
        _accelerate_deepspeed_on_cpu()
        kw["accelerator_config"] = {"use_configured_state": True}
    args = _trainer_args(out_dir, deepspeed=config, use_cpu=False, **kw)
    rank = args.process_index
    layers = model.model.language_model.layers
    trainer = _rank_trainer(model, args, [step[rank] for step in rank_batches(info)])
    watch = AttackWatch(layers[0].self_attn.q_proj, model)
    with watch:
        trainer.train()
    assert trainer.is_deepspeed_enabled
    params = list(model.parameters())
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params), "ZeRO-3 did not partition every weight"
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        gathered = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    torch.save(
        dict(params=gathered, flags=watch.flags, attack_grads=watch.grads_after_attack, logs=logs),
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def zero3_bf16_engine(out_dir):
    """ZeRO-3 with bf16 weights (the paper's setting) through ``deepspeed.initialize`` and
    ``engine.backward`` / ``engine.step`` (the Trainer refuses bf16 on a machine without a GPU)."""
    import deepspeed

    from modkern.apps.tiny_models import tiny_llava
    from modkern.objective.robust import robust_loss

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
    model, info = tiny_llava(seed=0)
    layers = model.model.language_model.layers
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0
        "bf16": {"enabled": True},
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    device = engine.device
    watch = AttackWatch(layers[0].self_attn.q_proj, model)
    losses = []
    with watch:
        for batches in rank_batches(info):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batches[rank].items()}
            out = robust_loss(engine, batch, CONFIG, **step_counts(batches))
            engine.backward(out.loss * world)  # ZeRO averages the gradients over the ranks
            engine.step()
            losses.append(float(out.loss))
    params = list(model.parameters())
    assert all(p.dtype == torch.bfloat16 and p.numel() == 0 for p in params)
    with deepspeed.zero.GatheredParameters(params):
        gathered = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    torch.save(
        dict(params=gathered, flags=watch.flags, attack_grads=watch.grads_after_attack, losses=losses),
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def shutdown():
    """End a worker once its results are written: leave the process group in step with the other
    rank, then exit without the interpreter's teardown. Native threads that outlive the group (gloo's,
    DeepSpeed's CPU shared-memory communicator) can otherwise abort a finished rank at exit with
    "terminate called without an active exception" (seen about once in 20 runs), failing a run whose
    results are complete."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main():
    name, out_dir = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    globals()[name](out_dir)
    shutdown()


if __name__ == "__main__":
    main()
