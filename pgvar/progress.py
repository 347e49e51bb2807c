"""Progress lines for work that can take more than a few seconds.

``Progress(total, "monte carlo reference", unit="episodes")`` prints, at most every
``every_s`` seconds and once at the end, one line to stderr:

    monte carlo reference: 4096/10000 episodes (41%), 2730 episodes/s, ~2s left
    ...
    monte carlo reference: 10000 episodes in 4s, 2730 episodes/s

Lines are printed only when stderr is a terminal, so logs, pipes and tests stay quiet;
``PGVAR_PROGRESS=1`` forces them on (e.g. under a batch scheduler whose log you watch),
``PGVAR_PROGRESS=0`` off, and a call's ``progress=True/False`` argument wins over both.
Work that finishes within ``every_s`` prints nothing.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import TextIO

ENV_SWITCH = "PGVAR_PROGRESS"
DEFAULT_EVERY_S = 5.0


def progress_wanted(progress: bool | None = None, stream: TextIO | None = None) -> bool:
    """Whether to print progress: ``progress`` if given, else ``$PGVAR_PROGRESS`` if set
    ("0"/"1"), else whether ``stream`` (stderr) is a terminal."""
    if progress is not None:
        return bool(progress)
    switch = os.environ.get(ENV_SWITCH, "").strip()
    if switch:
        return switch not in ("0", "false", "no", "off")
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def format_duration(seconds: float) -> str:
    """``seconds`` as ``42s``, ``3m05s`` or ``1h02m``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def rate_and_remaining(done: float, total: float | None, elapsed: float, unit: str) -> str:
    """``"R unit/s, ~T left"`` from ``done`` units in ``elapsed`` seconds (no ``left``
    part when the total is unknown or nothing is done yet)."""
    if done <= 0 or elapsed <= 0:
        return f"0 {unit}/s"
    rate = done / elapsed
    text = f"{rate:.3g} {unit}/s" if rate >= 1 else f"{rate * 60:.3g} {unit}/min"
    if total is not None and math.isfinite(total):
        text += f", ~{format_duration(max(total - done, 0) / rate)} left"
    return text


class Progress:
    """Counts units of work done and prints a periodic line (see the module docstring)."""

    def __init__(self, total: float | None, what: str, unit: str = "items",
                 progress: bool | None = None, every_s: float = DEFAULT_EVERY_S,
                 stream: TextIO | None = None):
        self.total = None if total is None or not math.isfinite(total) else total
        self.what, self.unit, self.every_s = what, unit, every_s
        self.stream = sys.stderr if stream is None else stream
        self.enabled = progress_wanted(progress, self.stream)
        self.done = 0.0
        self.started = self._last = time.perf_counter()
        self.printed = False

    def line(self) -> str:
        """Where the work stands: done/total, percentage, rate, time left."""
        of = f"/{self.total:g} {self.unit} ({100 * self.done / self.total:.0f}%)" \
            if self.total else f" {self.unit}"
        elapsed = time.perf_counter() - self.started
        return f"{self.what}: {self.done:g}{of}, {rate_and_remaining(self.done, self.total, elapsed, self.unit)}"

    def update(self, n: float = 1) -> None:
        """Count ``n`` more units; print a line when ``every_s`` has passed since the last."""
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.every_s:
            self._print()
            self._last = now

    def close(self) -> None:
        """The final line (units done, time taken), only if a periodic one was printed:
        quick work stays silent."""
        if self.enabled and self.printed:
            elapsed = time.perf_counter() - self.started
            self._print(f"{self.what}: {self.done:g} {self.unit} in {format_duration(elapsed)}, "
                        f"{rate_and_remaining(self.done, None, elapsed, self.unit)}")

    def _print(self, text: str | None = None) -> None:
        print(self.line() if text is None else text, file=self.stream, flush=True)
        self.printed = True

    def __enter__(self) -> Progress:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
