"""Make a local Ray instance die with the command that started it, even under `kill -9`.

Why: `ray.init()` on one machine starts a head node (GCS, raylet) and agents beside it
(`ray::DashboardAgent`, `ray::RuntimeEnvAgent`). Ray stops them at `ray.shutdown()`, but a driver
killed with SIGKILL never gets there, and the agents were seen alive, reparented to init and
holding ~200 MB, for over a minute. This watchdog is a small process in a session of its own
that the driver starts before Ray: it keeps the list of the driver's descendants fresh while
the driver lives, and when the driver's end of its pipe closes without the word that all went
well (the driver died), it kills every process on that list that is still the same process
(pid and start time), and then itself. Linux only: it reads /proc.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

PROC = Path("/proc")
REFRESH_S = 0.5
"""How often the list of the driver's descendants is refreshed while the driver lives."""
ALL_WELL = b"shutdown\n"
"""What the driver writes before closing the pipe when it stopped Ray itself."""

Process = tuple[int, str]
"""A process as pid and start time (field 22 of /proc/PID/stat): a recycled pid is not the same process."""


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of `pid`, or None if it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), fields[19]


def descendants(root: int) -> set[Process]:
    """Every live process below `root`, with its start time."""
    parent_of: dict[int, tuple[int, str]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parent_of[int(entry.name)] = stat
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in parent_of.items():
        children.setdefault(parent, []).append(pid)
    found: set[Process] = set()
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found.add((pid, parent_of[pid][1]))
        stack.extend(children.get(pid, []))
    return found


def kill_processes(processes: set[Process]) -> None:
    """SIGKILL each process that is still the one recorded (same pid, same start time)."""
    for pid, started in processes:
        stat = _stat(pid)
        if stat is not None and stat[1] == started:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def watch(driver: int) -> None:
    """The watchdog's loop: refresh the driver's descendants until its pipe (stdin) closes."""
    known: set[Process] = set()
    me = os.getpid()
    while True:
        ready, _, _ = select.select([sys.stdin.buffer], [], [], REFRESH_S)
        if ready:
            message = sys.stdin.buffer.readline()
            if message == ALL_WELL:
                return
            if not message:  # the pipe closed without the word: the driver died
                kill_processes({process for process in known if process[0] != me})
                return
        if _stat(driver) is not None:
            known |= descendants(driver)


@contextlib.contextmanager
def ray_dies_with_this_process() -> Iterator[None]:
    """Inside: a watchdog kills what this process started (a local Ray) if this process is
    killed; leaving the block normally (after `ray.shutdown()`) tells it all went well."""
    if not PROC.is_dir():
        yield
        return
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "lm_eval_faults.study.ray_watchdog", str(os.getpid())],
        stdin=subprocess.PIPE,
        start_new_session=True,  # outlives this process, and no Ctrl-C of the terminal reaches it
        env={**os.environ, "LM_EVAL_FAULTS_NO_AUTOLOAD": "1"},
    )
    assert watchdog.stdin is not None  # stdin=PIPE
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            watchdog.stdin.write(ALL_WELL)
            watchdog.stdin.close()
        watchdog.wait()


if __name__ == "__main__":
    watch(int(sys.argv[1]))
