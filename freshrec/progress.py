"""A one-line progress display for long replays and evaluations (stderr; plain lines when piped)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self, total: int | None, label: str, stream: TextIO | None = None, lines: bool = False
    ) -> None:
        """``lines``: a line per update even on a terminal, for processes that share one."""
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        self.count = 0
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._tty = self.stream.isatty() and not lines

    def advance(self, n: int = 1, note: str = "") -> None:
        self.count += n
        now = time.monotonic()
        if now - self._last_draw >= (0.2 if self._tty else 5.0):
            self._last_draw = now
            self._draw(note)

    @property
    def rate(self) -> float:
        return self.count / max(time.monotonic() - self.started, 1e-9)

    def _draw(self, note: str = "", final: bool = False) -> None:
        if self.total:
            share = min(self.count / self.total, 1.0)
            bar = "#" * int(30 * share) + "-" * (30 - int(30 * share))
            text = f"{self.label} [{bar}] {self.count}/{self.total} {self.rate:,.0f}/s"
        else:
            text = f"{self.label} {self.count} {self.rate:,.0f}/s"
        if note:
            text += f"  {note}"
        if self._tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self, note: str = "") -> None:
        self._draw(note, final=True)


class Say:
    """Progress lines on stderr, so ``--json`` output on stdout stays clean."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)
