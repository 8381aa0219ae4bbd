"""The ``modkern`` console command.

``modkern`` / ``modkern train``  - the demo (:mod:`modkern.demo`): SFT vs SFT + heuristic
augmentation vs the modkern objective on a synthetic modality-interference task, on a tiny LLaVA.
``modkern selfcheck``           - every op on this machine's device against the reference, with
timings.
"""

from __future__ import annotations

import argparse
import sys
import time


def _add_train(sub):
    p = sub.add_parser("train", help="run the demo (the default command)")
    p.add_argument("--model", default=None, help="local Hugging Face LLaVA checkpoint (default: a tiny random LLaVA)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--quick", action="store_true", help="a reduced smoke run (seconds; for tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def cmd_train(args) -> int:
    from modkern.demo import DemoConfig, run_demo

    kwargs = dict(seed=args.seed, out=args.out, device=args.device, model=args.model, quick=args.quick)
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit("--steps must be >= 1")
        kwargs["steps"] = args.steps
    kwargs["progress"] = not args.no_progress
    run_demo(DemoConfig(**kwargs))
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
    import torch

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
    import modkern
    from modkern import reference

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
    import torch

    import modkern

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
    import torch

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
    import torch

    from modkern.backend import available_backends

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    backends = available_backends(device) if args.backend == "all" else [args.backend]
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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="modkern", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    _add_train(sub)
    sc = sub.add_parser("selfcheck", help="compare every op with the reference on this device, with timings")
    sc.add_argument("--device", default="auto")
    sc.add_argument("--backend", default="all", help="all (every backend available here), torch, triton, cuda")
    sc.add_argument("--repeat", type=int, default=10)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]  # `modkern` alone (or with train options) runs the demo
    args = parser.parse_args(argv)
    if args.command == "selfcheck":
        return cmd_selfcheck(args)
    return cmd_train(args)


if __name__ == "__main__":
    sys.exit(main())
