"""A local Ray started by a command must not outlive it, even under `kill -9` (study/ray_watchdog.py).

The fast cases stand a `sleep` child in for Ray's agents: killed with the driver when it dies,
left alone when the driver leaves the block normally. The slow case kills a real driver that
started a local Ray through `RayPool` and checks that nothing it started survives."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from lm_eval_faults.study.ray_watchdog import descendants, kill_processes

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="the watchdog reads /proc (Linux)")

SLEEPER_DRIVER = """
import subprocess, sys, time
from lm_eval_faults.study.ray_watchdog import ray_dies_with_this_process
with ray_dies_with_this_process():
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)  # orphaned, like Ray's agents
    print(child.pid, flush=True)
    time.sleep(float(sys.argv[1]))
"""

RAY_DRIVER = """
from lm_eval_faults.study.grid import SweepConfig
from lm_eval_faults.study.ray_pool import RayOptions, RayPool
pool = RayPool(SweepConfig(model_args="", tasks="faults_demo", p="1e-5", device="cpu"), RayOptions(address="local", actors=1))
print("ready", flush=True)
import time
time.sleep(300)
"""


def _same(process: tuple[int, str]) -> bool:
    try:
        text = Path(f"/proc/{process[0]}/stat").read_text()
    except OSError:
        return False
    fields = text[text.rfind(")") + 2 :].split()
    return fields[19] == process[1] and fields[0] != "Z"


def _wait_until_gone(processes: set[tuple[int, str]], limit_s: float) -> set[tuple[int, str]]:
    deadline = time.monotonic() + limit_s
    while (left := {p for p in processes if _same(p)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _start(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize(("how", "survives"), [("kill -9", False), ("normal exit", True)])
def test_what_the_driver_started_dies_with_it_and_only_then(how, survives):
    driver = _start(SLEEPER_DRIVER, "300" if how == "kill -9" else "1.5")
    child = None
    try:
        assert driver.stdout is not None
        child_pid = int(driver.stdout.readline())
        time.sleep(1.0)  # the watchdog has refreshed its list at least once
        child = {p for p in descendants(driver.pid) if p[0] == child_pid}
        assert child, "the sleeper is not below the driver"
        if how == "kill -9":
            driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        left = _wait_until_gone(child, limit_s=5.0 if not survives else 2.0)
        assert bool(left) == survives
    finally:
        with contextlib.suppress(OSError):
            driver.kill()
        if child:
            kill_processes(child)


@pytest.mark.slow
def test_a_killed_ray_driver_leaves_no_ray_process_behind():
    pytest.importorskip("ray")
    driver = _start(RAY_DRIVER)
    started: set[tuple[int, str]] = set()
    try:
        assert driver.stdout is not None
        assert driver.stdout.readline().strip() == "ready"
        time.sleep(2.0)  # agents up, and the watchdog's list refreshed
        started = descendants(driver.pid)
        names = " ".join(Path(f"/proc/{pid}/cmdline").read_text() for pid, start in started if _same((pid, start)))
        assert "raylet" in names or "gcs_server" in names, "no local Ray was started"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        left = _wait_until_gone(started, limit_s=15.0)
        assert not left, f"{len(left)} process(es) of the killed driver's Ray still alive"
    finally:
        with contextlib.suppress(OSError):
            driver.kill()
        kill_processes(started)
