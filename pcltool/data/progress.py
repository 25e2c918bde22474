"""Progress of long loops (decoding, training epochs): a bar on a terminal, a plain line every N seconds otherwise
(logs, CI, ``nohup``), so a long decode is never silent."""

from __future__ import annotations

import sys
import time

LINE_EVERY_S = 10.0
QUIET_BELOW = 1000  # smaller jobs announce nothing up front (they end within seconds)


class ProgressLine:
    """``update(done)`` as work advances, ``close()`` at the end. Writes to stderr (stdout stays for results)."""

    def __init__(self, what: str, total: int, every_s: float = LINE_EVERY_S, stream=None, enabled: bool = True):
        self.what, self.total, self.every_s = what, max(int(total), 1), every_s
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.start = self.last = time.perf_counter()
        self.done = 0
        self.shown = False
        if enabled and not self.tty and total >= QUIET_BELOW:
            self.stream.write(f"{what}: {total} items\n")
            self.stream.flush()

    def update(self, done: int) -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self.last >= 0.2 or done >= self.total:
                width = 30
                filled = int(width * done / self.total)
                self.stream.write(f"\r{self.what}: [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                                  f"{self._rate(now)}")
                self.stream.flush()
                self.last, self.shown = now, True
        elif now - self.last >= self.every_s:
            self._line(now)

    def _rate(self, now: float) -> str:
        elapsed = now - self.start
        return f"{self.done / elapsed:.0f}/s" if elapsed > 0 else ""

    def _line(self, now: float) -> None:
        self.stream.write(f"{self.what}: {self.done}/{self.total} ({100 * self.done / self.total:.0f} %) "
                          f"{now - self.start:.0f}s {self._rate(now)}\n")
        self.stream.flush()
        self.last, self.shown = now, True

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()
        elif not self.tty and self.shown:
            self._line(time.perf_counter())
