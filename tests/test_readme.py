"""The README's op example runs as written (the Trainer example needs a user's model and data;
tests/test_hf.py runs the same calls on tiny models)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_op_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    ops = [b for b in blocks if "loss = fused_kl(" in b]
    assert len(ops) == 1, "the README should have exactly one op example"
    scope: dict = {}
    exec(compile(ops[0], str(README), "exec"), scope)
    # it ran the ops: a finite loss with a gradient, and a step that stayed in the masked eps-ball
    assert scope["adv"].grad is not None and bool(scope["loss"].isfinite())
    delta, mask = scope["delta"], scope["mask"]
    assert float(delta[~mask].abs().max()) == 0.0
    assert 0 < float(delta[mask].abs().max()) <= 1e-3 * (1 + 1e-6)


BENCH_README = README.parent / "benchmarks" / "README.md"
# Words of this project's tooling that a user with a GPU machine cannot act on.
INSIDER_TERMS = ("device tool", "one call", "device time", "10-minute call")


def test_benchmarks_readme_describes_the_gpu_run_in_plain_terms():
    text = BENCH_README.read_text()
    how = text[text.index("## How to run") :]
    how = how[: how.index("\n## ", 1)]
    assert "bash benchmarks/gpu_check.sh" in how and "NVIDIA GPU" in how
    assert "cp OUT/gpu-*.json benchmarks/results/ && python benchmarks/report.py" in how
    found = [t for t in INSIDER_TERMS if t in how.lower()]
    assert not found, f"benchmarks/README.md speaks of {found}: describe the GPU run for any user"
    # the file is generated: the same text is in report.py
    generator = (README.parent / "benchmarks" / "report.py").read_text()
    assert "on any Linux machine with an NVIDIA GPU" in generator
