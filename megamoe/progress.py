"""A progress bar with rate and ETA for long tool runs (one line on stderr, redrawn in place
on a terminal and printed every ``log_every_s`` seconds otherwise); safe to update from
several threads."""

from __future__ import annotations

import sys
import threading
import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """``total`` bytes of work; :meth:`advance` as pieces finish, :meth:`close` at the end."""

    def __init__(self, total: int, label: str, stream=None, width: int = 30, log_every_s: float = 10.0,
                 quiet: bool = False):
        self.total, self.label, self.width = max(total, 1), label, width
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet  # count, print nothing
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.done, self.start = 0, time.perf_counter()
        self.log_every_s, self._last = log_every_s, 0.0
        self._lock = threading.Lock()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = _clock(eta) if eta == eta else "?"
        return (f"{self.label} [{bar}] {frac:4.0%} {human_bytes(self.done)}/{human_bytes(self.total)} "
                f"{human_bytes(rate)}/s ETA {eta_text}")

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            now = time.perf_counter()
            if self.quiet:
                return
            if self.tty:
                self.stream.write("\r" + self.line())
                self.stream.flush()
            elif now - self._last >= self.log_every_s:
                self._last = now
                self.stream.write(self.line() + "\n")

    def close(self) -> None:
        if self.quiet:
            return
        with self._lock:
            elapsed = time.perf_counter() - self.start
            self.stream.write(("\r" if self.tty else "") + self.line() + f" done in {_clock(elapsed)}\n")
            self.stream.flush()
