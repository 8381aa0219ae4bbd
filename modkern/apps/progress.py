"""The progress display of the long-running applications (training, diagnosis).

On a terminal or in a notebook a tqdm bar; anywhere else (a log file, a pipe, CI output) one plain
line per tenth of the work and at the end, so that a log never fills with a redrawn
carriage-return bar; nothing when disabled.
"""

from __future__ import annotations

import sys
import time


def interactive(stream) -> bool:
    """A terminal, or a Jupyter kernel (tqdm draws a widget there)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


class Progress:
    """``total`` units of work named ``desc``.

    ``update(n, **stats)`` marks ``n`` more units done; ``stats`` (e.g. ``loss=``) are shown on the
    bar and in the plain lines. The bar is drawn on ``stream`` (default ``sys.stderr``) when it is
    interactive; otherwise the plain lines go to ``log`` (default: printed to ``stream``), at every
    ``1 / lines`` of the total and at the end: ``"{desc}: {done}/{total} {unit}s ({pct}%), loss 0.1234, 3.2 s"``.
    """

    def __init__(self, total: int, desc: str, *, enabled=True, unit="step", stream=None, log=None, lines=10):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.stream = sys.stderr if stream is None else stream
        self.log = log if log is not None else (lambda line: print(line, file=self.stream, flush=True))
        self.step_pct = max(1, 100 // max(1, lines))
        self.next_pct = self.step_pct
        self.done = 0
        self.start = time.perf_counter()
        self.bar = None
        if enabled and interactive(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1, **stats) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if stats:
                self.bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()})
            return
        if not self.enabled:
            return
        pct = 100 * self.done // max(self.total, 1)
        if pct >= self.next_pct or self.done >= self.total:
            parts = [f"{self.desc}: {self.done}/{self.total} {self.unit}s ({pct}%)"]
            parts += [f"{k} {v:.4f}" for k, v in stats.items()]
            parts.append(f"{time.perf_counter() - self.start:.1f} s")
            self.log(", ".join(parts))
            self.next_pct = (pct // self.step_pct + 1) * self.step_pct

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
