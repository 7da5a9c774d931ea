"""One progress line per command: items done, the total (or an estimate of it) and the time left.

A sweep or a bisection evaluates many times; lm-eval's own bars are silenced meanwhile
(`harness.lm_eval_silencing`), so this line is all the user sees. On a terminal it is redrawn in
place; in a log (not a TTY) an update is a line of its own, at most one per `LOG_EVERY` seconds
(and the last), so a log shows the progress instead of a carriage-return smear, and an analysis
of 700 stored fields in a minute does not write 700 lines.

The time left is measured from the first item done onwards: the first one also pays for
indexing tasks and loading data sets, and extrapolating from it (as a plain tqdm bar does)
shows a remaining time several times too long that stays frozen until the next item.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

LOG_EVERY = 10.0
"""Seconds between two lines in a log: a sweep of points that take longer logs every point."""

_active: ProgressLine | None = None
"""The line being drawn now, so a message printed meanwhile (`note`) does not break it."""


def format_duration(seconds: float) -> str:
    """`seconds` as 45s, 3m05s or 2h07m: short enough for a progress line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressLine:
    """`what: done/total unit, elapsed, time left (last item)`, updated once per item.

    `approximate` marks `total` as an estimate (a bisection cannot know its trial count in
    advance): it is shown as "of about N" and, when the work reaches it, raised by `regrow` (a
    bisection: one more culprit's worth of trials). `clock` is
    injectable so tests can check the arithmetic without waiting."""

    def __init__(
        self,
        what: str,
        total: int,
        *,
        done: int = 0,
        unit: str = "points",
        approximate: bool = False,
        regrow: int = 1,
        enabled: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.done, self.unit = what, total, done, unit
        self.approximate, self.regrow, self.enabled = approximate, max(1, regrow), enabled
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.started = clock()
        self._first_at: float | None = None
        self._timed = 0
        """Items done since the first one in this run: what the time left is measured over."""
        self._last = ""
        self._drawn = False
        self._logged_at: float | None = None
        self._unlogged = False
        """In a log: whether the latest update waits for its line (written at the next one due, or on close)."""
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())

    def __enter__(self) -> ProgressLine:
        global _active
        _active = self
        self._draw()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, last: str = "") -> None:
        """One more item done; `last` says which (shown in brackets)."""
        now = self.clock()
        if self._first_at is None:
            self._first_at = now
        else:
            self._timed += 1
        self.done += 1
        if self.approximate and self.done >= self.total:
            self.total = self.done + self.regrow  # the work outgrew the estimate, so it is not done yet
        self._last = last
        self._draw()

    def seconds_left(self) -> float | None:
        """The time left at the rate measured since the first item; None until two are done."""
        if self._first_at is None or self._timed == 0:
            return None
        rate = (self.clock() - self._first_at) / self._timed
        return rate * max(0, self.total - self.done)

    def text(self) -> str:
        of = " of about " if self.approximate else "/"
        parts = [f"{self.what}: {self.done}{of}{self.total} {self.unit}"]
        if self.done or self._first_at is not None:
            parts.append(f"{format_duration(self.clock() - self.started)} elapsed")
        left = self.seconds_left()
        if self.approximate or self.done < self.total:
            if left is not None:
                parts.append(f"about {format_duration(left)} left")
            elif self._first_at is not None:
                parts.append("time left known after the next one")
        line = ", ".join(parts)
        return f"{line} ({self._last})" if self._last else line

    def note(self, message: str) -> None:
        """Print `message` on its own line, above the progress line (redrawn on a terminal; a log
        has the line already)."""
        if self.interactive and self._drawn:
            self.stream.write("\r\x1b[K")
        self.stream.write(message + "\n")
        self._drawn = False
        if self.interactive:
            self._draw()

    def close(self) -> None:
        global _active
        if _active is self:
            _active = None
        if self.enabled and not self.interactive and self._unlogged:
            self._write_log_line()
        if self.enabled and self.interactive and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False

    def _draw(self) -> None:
        if not self.enabled:
            return
        if self.interactive:
            width = shutil.get_terminal_size().columns - 1  # a wrapped line cannot be redrawn with \r
            self.stream.write("\r" + self.text()[:width] + "\x1b[K")
            self.stream.flush()
        else:
            finished = not self.approximate and self.done >= self.total
            due = self._logged_at is None or self.clock() - self._logged_at >= LOG_EVERY
            self._unlogged = True
            if finished or due:
                self._write_log_line()
        self._drawn = True

    def _write_log_line(self) -> None:
        self.stream.write(self.text() + "\n")
        self.stream.flush()
        self._logged_at, self._unlogged = self.clock(), False


def note(message: str, stream: TextIO | None = None) -> None:
    """Print `message` to stderr, above the active progress line if there is one."""
    if _active is not None and _active.enabled:
        _active.note(message)
    else:
        print(message, file=stream if stream is not None else sys.stderr, flush=True)
