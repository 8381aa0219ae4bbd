"""modkern: fused kernels for modality-robust fine-tuning of multimodal LLMs - the console command.

  modkern train       the demo (modkern.apps.demo): SFT, + the paper's augmentation, + PGD and consistency,
                      and the two ablations, on a synthetic modality-interference task, 3 seeds;
                      with --model DIR --data FILE: robust fine-tuning of your checkpoint (modkern.apps.finetune)
  modkern selfcheck   every op on this machine's device against the float64 reference, with timings
  modkern diagnose    how much modality interference a checkpoint has (modkern.apps.diagnose): flip rate,
                      causal effect and JS per interference condition, attention share per modality

`modkern <command> --help` lists a command's options. A mistake in the options is answered with one
line and exit code 2; an error while running with one line and exit code 1 (the traceback with
--debug or the environment variable MODKERN_DEBUG=1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import torch

import modkern
from modkern import reference
from modkern.apps import av_demo, demo
from modkern.apps.diagnose import DiagnoseError, diagnose, diagnose_compare
from modkern.apps.finetune import FinetuneConfig, FinetuneError, run_finetune
from modkern.data import DataFileError, parse_mix
from modkern.objective.alignment import ALIGNMENT_COPIES, DEFAULT_COPIES, AlignmentConfig
from modkern.objective.config import PRESETS, RobustConfig
from modkern.ops import dispatch
from modkern.processing import ProcessorError

DEBUG_ENV = "MODKERN_DEBUG"


class CliError(Exception):
    """A mistake in the command line: reported as one line (what is wrong, what to do), exit code 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (raised as :class:`CliError`, not printed + exit)."""

    def error(self, message):
        raise CliError(f"{message} (see `{self.prog} --help`)")


# --- option types: each checks one option and says what to do instead -------------------------------


def positive_int(value: str) -> int:
    """``argparse`` type: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {n}")
    return n


def positive_float(value: str) -> float:
    """``argparse`` type: a finite number > 0."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return x


def seed_list(value: str) -> tuple:
    """``argparse`` type: comma-separated distinct integers, e.g. ``0,1,2``."""
    try:
        seeds = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, e.g. 0,1,2, got {value!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"must be one or more distinct integers, got {value!r}")
    return seeds


def device_name(value: str) -> str:
    """``argparse`` type: ``auto`` or a torch device that exists on this machine."""
    if value == "auto":
        return value
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build, but no GPU is visible"
            raise argparse.ArgumentTypeError(
                f"{value}: this machine has no usable CUDA GPU (torch {torch.__version__} is {build}); "
                "use --device cpu or --device auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{value}: this machine has {count} CUDA device(s) (cuda:0..{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{value}: MPS is not available here; use --device cpu or --device auto")
    return value


def checkpoint_dir(hint: str):
    """``argparse`` type: a local directory holding a Hugging Face checkpoint (``config.json``);
    ``hint`` says what to pass instead."""

    def check(value: str) -> str:
        if not os.path.isdir(value):
            raise argparse.ArgumentTypeError(f"{value}: no such directory; {hint}")
        if not os.path.isfile(os.path.join(value, "config.json")):
            raise argparse.ArgumentTypeError(f"{value} has no config.json, so it is not a checkpoint; {hint}")
        return value

    return check


def _add_debug(parser):
    # SUPPRESS: a subcommand's --debug must not reset one given before the command
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)",
    )


def _add_device(parser):
    parser.add_argument(
        "--device", default="auto", type=device_name, help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N"
    )


def _add_no_progress(parser):
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress output (a bar on a terminal, log lines otherwise)"
    )


# --- train ---------------------------------------------------------------------------------------


def _add_train(sub):
    p = sub.add_parser(
        "train",
        help="run the demo (SFT, + the paper's augmentation, + PGD and consistency, and the two ablations, on a "
        "synthetic task, 3 seeds, about 4.5 minutes on 2 CPU cores); with --model DIR --data FILE: the robust "
        "fine-tuning of your checkpoint on your data file",
        description="Without --data: train five models per seed on the synthetic modality-interference task and "
        "compare them (mean ± sd over the seeds). With --model DIR --data FILE --out DIR: robust fine-tuning of a "
        "local checkpoint (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, the Qwen2.5-Omni / Qwen3-Omni thinkers) "
        "through its own processor and a Hugging Face Trainer, with the paper's copies and objective.",
    )
    p.add_argument(
        "--model",
        default=None,
        type=checkpoint_dir(
            "give a local Hugging Face checkpoint directory, or leave out --model for the built-in tiny LLaVA"
        ),
        help="local Hugging Face checkpoint directory (demo default: a tiny LLaVA with random weights)",
    )
    p.add_argument(
        "--data", default=None, help="data file (JSON list or JSON Lines of samples): fine-tune --model on it"
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="demo: optimizer steps per method (default 160); with --data: the attack's PGD steps K",
    )
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seeds",
        type=seed_list,
        default=None,
        help="demo: comma-separated seeds of the data, the initial weights and the batches (default 0,1,2)",
    )
    seeds.add_argument("--seed", type=int, default=None, help="a single seed (demo: same as --seeds N)")
    p.add_argument("--out", default=None, help="output directory (default runs/demo, with --data runs/finetune)")
    _add_device(p)
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="demo: CPU threads (default: torch's, less the cores that other processes keep busy)",
    )
    p.add_argument("--quick", action="store_true", help="demo: a reduced smoke run (seconds; for tests)")
    p.add_argument(
        "--av",
        action="store_true",
        help="the three-modality demo instead: MMA-Bench's alignment tuning on a tiny Qwen2.5-Omni thinker and a "
        "synthetic audio-video task (SFT vs alignment tuning vs + the robust objective)",
    )
    _add_finetune_options(p.add_argument_group("with --data (robust fine-tuning of --model)"))
    _add_no_progress(p)
    _add_debug(p)
    p.set_defaults(func=cmd_train)
    return p


def _add_finetune_options(g):
    g.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--epochs", type=positive_float, default=1.0, help="epochs over the data (default 1)")
    g.add_argument("--lr", type=positive_float, default=2e-5, help="learning rate (default 2e-5, the official LLaVA)")
    g.add_argument("--batch-size", type=positive_int, default=8, help="samples per batch before the copies (default 8)")
    g.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps (default 1)")
    g.add_argument("--mix", default=None, help="image-heavy:text-heavy:VQA samples per batch (default 2:2:4 scaled)")
    g.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS), help="a published RobustConfig")
    g.add_argument("--epsilon", type=positive_float, default=None, help="perturbation radius (RobustConfig.epsilon)")
    g.add_argument("--alpha", type=positive_float, default=None, help="PGD step size (RobustConfig.alpha)")
    g.add_argument("--lam", type=float, default=None, help="consistency weight (RobustConfig.lam)")
    g.add_argument("--divergence", default=None, choices=("kl", "js"), help="consistency divergence")
    g.add_argument("--eval", default=None, dest="eval_data", help="data file evaluated (clean CE) after each epoch")
    g.add_argument(
        "--av-copies",
        default=None,
        help="audio-video data: the alignment copies, comma-separated, from "
        + ", ".join(ALIGNMENT_COPIES)
        + " (default: the first four)",
    )
    g.add_argument(
        "--no-audio-answer", default=None, help="audio-video data: the answer of a sound question without sound"
    )
    g.add_argument(
        "--no-video-answer", default=None, help="audio-video data: the answer of a video question without frames"
    )
    g.add_argument("--skip-bad", action="store_true", help="leave out bad samples of the data files (and say how many)")
    g.add_argument("--resume", default=None, help="resume from a Trainer checkpoint directory, or 'last'")
    g.add_argument("--save-steps", type=positive_int, default=500, help="a Trainer checkpoint every N steps")
    g.add_argument("--fsdp", default="", help="the Trainer's fsdp option, e.g. 'full_shard auto_wrap'")
    g.add_argument("--fsdp-config", default=None, help="the Trainer's fsdp_config: a JSON file (e.g. version 2)")
    g.add_argument("--deepspeed", default=None, help="a DeepSpeed config file (e.g. ZeRO-3)")


FINETUNE_ONLY = (
    "max_steps",
    "mix",
    "preset",
    "epsilon",
    "alpha",
    "lam",
    "divergence",
    "eval_data",
    "resume",
    "av_copies",
    "no_audio_answer",
    "no_video_answer",
)
DEMO_ONLY = ("seeds", "threads")


def cmd_train(args) -> int:
    if args.data is not None:
        if args.av:
            raise CliError("--av runs the built-in audio-video demo; leave out --data (or --av)")
        return _finetune(args)
    given = [name for name in FINETUNE_ONLY if getattr(args, name) not in (None, "")]
    if given or args.bf16 or args.skip_bad or args.fsdp or args.fsdp_config or args.deepspeed:
        names = ", ".join("--" + n.replace("_", "-").replace("eval-data", "eval") for n in given) or "these options"
        raise CliError(f"{names} need --data FILE (and --model DIR): the demo takes none of them")
    if args.av:
        return _av_demo(args)
    kwargs = dict(
        out=args.out or "runs/demo", device=args.device, model=args.model, quick=args.quick, threads=args.threads
    )
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.seeds is not None or args.seed is not None:
        kwargs["seeds"] = args.seeds if args.seeds is not None else (args.seed,)
    kwargs["progress"] = not args.no_progress
    demo.run_demo(demo.DemoConfig(**kwargs))
    return 0


def _av_demo(args) -> int:
    if args.model is not None or args.quick or args.threads is not None:
        raise CliError("--av trains its own tiny Omni thinker: it takes --seeds / --seed, --steps, --out, --device")
    cfg = av_demo.AVDemoConfig(out=args.out or "runs/av_demo", progress=not args.no_progress)
    if args.device != "auto":
        cfg.device = args.device
    if args.steps is not None:
        cfg.steps = args.steps
    if args.seeds is not None or args.seed is not None:
        cfg.seeds = args.seeds if args.seeds is not None else (args.seed,)
    av_demo.run_av_demo(cfg)
    return 0


def _robust_config(args) -> RobustConfig:
    overrides = {
        k: v
        for k, v in dict(
            epsilon=args.epsilon, alpha=args.alpha, lam=args.lam, divergence=args.divergence, steps=args.steps
        ).items()
        if v is not None
    }
    try:
        return RobustConfig.preset(args.preset, **overrides) if args.preset else RobustConfig(**overrides)
    except (TypeError, ValueError) as exc:
        raise CliError(f"robust objective: {exc}") from None


def _alignment_config(args) -> Optional[AlignmentConfig]:
    """The alignment copies the options ask for (None: none given, the default copies)."""
    if args.av_copies is None and args.no_audio_answer is None and args.no_video_answer is None:
        return None
    copies = (
        DEFAULT_COPIES if args.av_copies is None else tuple(c.strip() for c in args.av_copies.split(",") if c.strip())
    )
    try:
        return AlignmentConfig(copies, no_audio_answer=args.no_audio_answer, no_video_answer=args.no_video_answer)
    except ValueError as exc:
        raise CliError(f"--av-copies: {exc}") from None


def _finetune(args) -> int:
    if args.model is None:
        raise CliError("--data needs --model DIR: the checkpoint to fine-tune (with its processor)")
    demo_given = [n for n in DEMO_ONLY if getattr(args, n) is not None] + (["quick"] if args.quick else [])
    if demo_given:
        raise CliError(f"--{demo_given[0]} is a demo option; with --data use --seed, --max-steps or --epochs")
    try:
        mix = parse_mix(args.mix) if args.mix else None
    except ValueError as exc:
        raise CliError(f"--mix: {exc}") from None
    if mix is not None and sum(mix.values()) != args.batch_size:
        raise CliError(
            f"--mix {args.mix} makes batches of {sum(mix.values())} samples but --batch-size is {args.batch_size}"
        )
    cfg = FinetuneConfig(
        model=args.model,
        data=args.data,
        out=args.out or "runs/finetune",
        robust=_robust_config(args),
        max_steps=args.max_steps or -1,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        mix=mix,
        bf16=args.bf16,
        eval_data=args.eval_data,
        skip_bad=args.skip_bad,
        seed=args.seed if args.seed is not None else 0,
        resume=args.resume,
        save_steps=args.save_steps,
        device=args.device,
        fsdp=args.fsdp,
        fsdp_config=args.fsdp_config,
        deepspeed=args.deepspeed,
        progress=not args.no_progress,
    )
    alignment = _alignment_config(args)
    if alignment is not None:
        cfg.alignment = alignment
    try:
        run_finetune(cfg)
    except (FinetuneError, DataFileError, ProcessorError) as exc:
        raise CliError(str(exc)) from None
    return 0


# --- selfcheck -----------------------------------------------------------------------------------


def _time(fn, repeat: int, sync) -> float:
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t) / repeat * 1e3


def _inputs(device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    r, v, b, n, h = 64, 4096, 4, 128, 256
    ids = torch.randint(3, 100, (b, n), generator=g)
    ids[:, 5:40] = 100
    return dict(
        p=rand(r, v) * 3,
        q=rand(r, v) * 3,
        delta=rand(b, n, h) * 1e-3,
        grad=rand(b, n, h),
        mask=(torch.rand(b, n, generator=g) < 0.5).to(device),
        ids=ids.to(device),
    )


def _kernel_cases(x, backend):
    """(name, modkern call, float64 reference call) for the ops that have backends."""
    f64 = lambda t: t.double()
    p, q, delta, grad, mask = x["p"], x["q"], x["delta"], x["grad"], x["mask"]
    return [
        ("fused_js", lambda: modkern.fused_js(p, q, backend=backend), lambda: reference.js_divergence(f64(p), f64(q))),
        ("fused_kl", lambda: modkern.fused_kl(p, q, backend=backend), lambda: reference.kl_divergence(f64(p), f64(q))),
        (
            "masked_adv_step",
            lambda: modkern.masked_adv_step(
                delta.clone(), grad, mask, alpha=0.1, epsilon=1e-3, inplace=False, backend=backend
            ),
            lambda: reference.masked_adv_step(f64(delta), f64(grad), mask, alpha=0.1, epsilon=1e-3),
        ),
        (
            "perturb",
            lambda: modkern.perturb(grad, delta, mask, backend=backend),
            lambda: reference.perturb(f64(grad), f64(delta), mask),
        ),
    ]


def _plain_cases(x):
    """Ops without backends: compared with an obvious formulation / checked for their contract."""
    ids, delta, mask = x["ids"], x["delta"], x["mask"]

    def init_violation():  # |delta| <= eps inside the mask, exactly 0 outside
        d = modkern.init_delta(delta, mask, epsilon=1e-3)
        outside = d.masked_fill(mask[..., None], 0).abs().max()
        return torch.stack([(d.abs().max() - 1e-3).clamp_min(0), outside])

    return [
        (
            "modality_mask",
            lambda: modkern.modality_mask(ids, perturb="image", token_ids={"image": 100}),
            lambda: ids == 100,
        ),
        ("init_delta", init_violation, lambda: torch.zeros(2, dtype=torch.float64, device=ids.device)),
    ]


def _check(name, backend, fast, ref, repeat, sync) -> bool:
    try:
        a, b = fast(), ref()
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        # fp32 inputs, fp32 accumulation: a relative 1e-4 of the largest value is ample.
        tol = 0.0 if a.dtype == torch.bool else 1e-4 * max(1.0, float(b.double().abs().max()))
        ok = diff <= tol
        t_fast, t_ref = _time(fast, repeat, sync), _time(ref, repeat, sync)
        status = "ok" if ok else f"MISMATCH (tolerance {tol:.1e})"
        print(f"{name:<16} {backend:<8} {diff:>11.3e} {t_fast:>11.3f} {t_ref:>13.3f}  {status}")
        return ok
    except Exception as exc:  # report and go on: a selfcheck names every broken op
        print(f"{name:<16} {backend:<8} {'-':>11} {'-':>11} {'-':>13}  ERROR {type(exc).__name__}: {exc}")
        return False


def cmd_selfcheck(args) -> int:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    available = dispatch.available_backends(device)
    if args.backend != "all" and args.backend not in available:
        raise CliError(
            f"--backend {args.backend} cannot run on {device} here (available: {', '.join(available)}); "
            "use --backend all"
        )
    backends = available if args.backend == "all" else [args.backend]
    print(f"modkern selfcheck on {device}, fp32 inputs, float64 references; backends: {', '.join(backends)}")
    print(f"{'op':<16} {'backend':<8} {'max |diff|':>11} {'modkern ms':>11} {'reference ms':>13}  status")
    x = _inputs(device, torch.float32)
    results = []
    for backend in backends:
        for name, fast, ref in _kernel_cases(x, backend):
            results.append(_check(name, backend, fast, ref, args.repeat, sync))
    for name, fast, ref in _plain_cases(x):
        results.append(_check(name, "-", fast, ref, args.repeat, sync))
    failures = results.count(False)
    print("all ops agree with the reference" if not failures else f"{failures} check(s) failed")
    return 1 if failures else 0


def _add_selfcheck(sub):
    p = sub.add_parser(
        "selfcheck",
        help="compare every op with the float64 reference on this device, with timings",
        description="Run every op on this machine's device against the float64 reference and time both.",
    )
    _add_device(p)
    p.add_argument(
        "--backend",
        default="all",
        choices=("all", "torch", "triton", "cuda"),
        help="all (every backend available here, the default), torch, triton or cuda",
    )
    p.add_argument("--repeat", type=positive_int, default=10, help="timed calls per op (default 10)")
    _add_debug(p)
    p.set_defaults(func=cmd_selfcheck)
    return p


# --- diagnose ------------------------------------------------------------------------------------


def _add_diagnose(sub):
    p = sub.add_parser(
        "diagnose",
        help="measure a checkpoint's modality interference (flip rate, causal effect, JS, attention per modality)",
        description="Perturb the modality that should not matter (misleading / unrelated / long text, swapped / "
        "black / white / noise images, misaligned audio-video, removed audio, zeroed frames) on the built-in "
        "tasks and report, per condition, accuracy, flip rate, causal effect and JS; and the attention share of "
        "the answer positions per layer x modality. Writes OUT/diagnosis.json and OUT/diagnosis.png.",
    )
    p.add_argument(
        "--model",
        required=True,
        type=checkpoint_dir(
            "give a local Hugging Face checkpoint directory, e.g. runs/demo/checkpoints/sft after `modkern train`"
        ),
        help="local checkpoint directory: a `modkern train` checkpoint, LLaVA, Qwen2-VL or a Qwen2.5-Omni / Qwen3-Omni "
        "thinker (Qwen3-Omni: with --data)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="a data file (JSON list or JSON Lines of samples) diagnosed through the checkpoint's own processor "
        "(default: the built-in tasks)",
    )
    p.add_argument("--skip-bad", action="store_true", help="leave out bad samples of --data (and say how many)")
    p.add_argument(
        "--compare",
        default=None,
        type=checkpoint_dir("give a second local checkpoint directory, e.g. the fine-tuned one"),
        help="a second checkpoint diagnosed on the same items: both side by side (before = --model, after = this)",
    )
    p.add_argument("--out", default="runs/diagnose", help="output directory (default runs/diagnose)")
    p.add_argument("--max-items", type=positive_int, default=64, help="clean items per item kind (default 64)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="items per forward (default 16)")
    p.add_argument(
        "--conditions", default=None, help="comma-separated condition names (default: every one the model can take)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the items and the perturbations")
    _add_device(p)
    p.add_argument("--no-attention", action="store_true", help="skip the white-box attention analysis")
    _add_no_progress(p)
    _add_debug(p)
    p.set_defaults(func=cmd_diagnose)
    return p


def cmd_diagnose(args) -> int:
    if args.skip_bad and args.data is None:
        raise CliError("--skip-bad needs --data FILE")
    try:
        kwargs = dict(
            data=args.data,
            skip_bad=args.skip_bad,
            out=args.out,
            conditions=args.conditions,
            max_items=args.max_items,
            batch_size=args.batch_size,
            device=args.device,
            seed=args.seed,
            attention=not args.no_attention,
            progress=not args.no_progress,
        )
        if args.compare is not None:
            diagnose_compare(args.model, args.compare, **kwargs)
        else:
            diagnose(args.model, **kwargs)
    except DiagnoseError as exc:
        raise CliError(str(exc)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="modkern", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--debug", action="store_true", default=False, help=f"show the full traceback of an error (or {DEBUG_ENV}=1)"
    )
    sub = parser.add_subparsers(dest="command", title="commands", metavar="<command>")
    _add_train(sub)
    _add_selfcheck(sub)
    _add_diagnose(sub)
    parser.set_defaults(commands=tuple(sub.choices))
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with the errors pointing at the right ``--help``."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command is None:  # e.g. `modkern --quick`
            raise CliError(f"options go after a command, e.g. `modkern train {' '.join(argv)}` (see `modkern --help`)")
        raise CliError(f"unrecognized arguments: {' '.join(extra)} (see `modkern {args.command} --help`)")
    return args


def _fail(message: str, code: int) -> int:
    print(f"modkern: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except CliError as exc:
        return _fail(exc, 2)
    if args.command is None:  # bare `modkern`: what it can do, not a 200-step run
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get(DEBUG_ENV, "0").strip().lower() not in ("", "0", "false", "no", "off")
    try:
        return args.func(args)
    except CliError as exc:
        return _fail(exc, 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:
        if debug:
            raise
        return _fail(f"{type(exc).__name__}: {exc} (run again with --debug or {DEBUG_ENV}=1 for the traceback)", 1)


if __name__ == "__main__":
    sys.exit(main())
