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
