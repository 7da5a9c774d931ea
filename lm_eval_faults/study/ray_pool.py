"""Sweep points on Ray actors: one model per actor, each actor pulling the next point as it frees up.

    lm-eval-faults sweep ... --ray                 # a local Ray instance: one actor per GPU, else per CPU
    lm-eval-faults sweep ... --ray auto            # join the cluster `ray start --head` started

Why: once the clean baseline's samples are known, a sweep's points are independent, so N GPUs (or
CPU slots) evaluate N points at a time. Each actor loads the model once and walks its points with
the same O(k) restore as a single-process sweep (it runs `evaluation.LocalEvaluator`); fault maps are
pure functions of the spec, so every record is the one a single process would write. Actors
return records and never touch the run directory: the driver (`runner.run_sweep`) stays the only
writer, with its lock, fsync and resume, so a killed sweep resumes with or without Ray.

An actor that dies (killed, its node lost, out of memory) loses only its point: the point goes
back to the queue for the next free actor, a replacement actor starts loading, and the point's
record carries `"retries"`. A point that has killed `MAX_ATTEMPTS` actors stops the sweep rather
than taking the cluster down one actor at a time.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from lm_eval_faults.study.baseline import CleanSamples
from lm_eval_faults.study.evaluation import LocalEvaluator, PointResult
from lm_eval_faults.study.grid import SweepConfig, SweepConfigError, SweepPoint
from lm_eval_faults.study.progress import note
from lm_eval_faults.study.ray_watchdog import ray_dies_with_this_process

LOCAL = "local"
"""`RayOptions.address` that starts a new local Ray instance (Ray's own spelling)."""

MAX_ATTEMPTS = 3
"""Actors one point (or one model load) may take down before the sweep gives up on it."""

INSTALL_HINT = "pip install 'lm-eval-faults[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """How to run a sweep on Ray.

    `address` is Ray's: "local" starts a local instance (stopped again at the end), "auto", a
    host:port or a ray:// address joins a running cluster. `actors` defaults to one per GPU in the
    cluster, else one per `cpus_per_actor` CPUs; each actor reserves `cpus_per_actor` CPUs and runs
    that many torch threads. `on_start` is called with the pool once its actors are starting (the
    tests use it to kill an actor mid-sweep).
    """

    address: str = LOCAL
    actors: int | None = None
    cpus_per_actor: int = 1
    on_start: Callable[[RayPool], None] | None = None

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise SweepConfigError(f"--ray_actors {self.actors}: give at least 1 actor")
        if self.cpus_per_actor < 1:
            raise SweepConfigError(f"--ray_actor_cpus {self.cpus_per_actor}: each actor needs at least 1 CPU")


def import_ray() -> ModuleType:
    """Ray, or a one-line error that says how to install it: it is an optional extra."""
    try:
        import ray
    except ImportError:
        raise SweepConfigError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


class PointWorker:
    """The body of one Ray actor: a `LocalEvaluator` (one loaded model) fed one point at a time.

    Loading is a method, not the constructor, so that a model that cannot load (a wrong path)
    comes back as that error instead of looking like an actor that died and should be replaced."""

    def __init__(self) -> None:
        self.evaluator: LocalEvaluator | None = None
        self.clean: CleanSamples | None = None

    def load(self, config: SweepConfig, threads: int) -> None:
        """Load the model and index lm-eval's tasks, with `threads` torch threads (the actor's CPU share)."""
        import torch

        torch.set_num_threads(threads)
        self.evaluator = LocalEvaluator(config)
        _ = self.evaluator.task_manager  # built now, in parallel with the other actors, not on the first point

    def plan(self) -> list[SweepPoint]:
        return self._evaluator().plan()

    def set_clean(self, clean: CleanSamples) -> None:
        """The baseline's samples, sent once per actor, that every faulty point's drift is measured against."""
        self.clean = clean

    def clean_samples(self, baseline: SweepPoint) -> CleanSamples:
        return self._evaluator().clean_samples(baseline)

    def evaluate(self, point: SweepPoint) -> tuple[PointResult, list[tuple[type[Warning], str]]]:
        """One point's result, with the warnings this package raised on the way (the driver repeats
        them: an actor's output does not reach the terminal, and "NO FAULTS" must not go unseen)."""
        with warnings.catch_warnings(record=True) as caught:
            [result] = self._evaluator().evaluate([point], self.clean)
        return result, package_warnings(caught)

    def _evaluator(self) -> LocalEvaluator:
        if self.evaluator is None:
            raise RuntimeError("PointWorker: load() must run first")
        return self.evaluator


def package_warnings(caught: Sequence[warnings.WarningMessage]) -> list[tuple[type[Warning], str]]:
    """(category, message) of the warnings raised from this package's code; lm-eval's and
    transformers' own stay in the actor's log, as `quiet_lm_eval` keeps them off the terminal."""
    package = Path(__file__).resolve().parents[1]
    return [(w.category, str(w.message)) for w in caught if Path(w.filename).resolve().is_relative_to(package)]


@dataclass(frozen=True)
class Job:
    """One call to run on whichever actor is free: `key` names it for retry counting."""

    key: str
    method: str
    args: tuple[Any, ...] = ()


class RayPool:
    """Ray actors evaluating a sweep's points (an `evaluation.PointEvaluator`).

    The driver keeps at most one call in flight per actor and takes completions with `ray.wait`,
    so a fast actor is never held up by a slow one and a dead actor costs one point's work."""

    def __init__(self, config: SweepConfig, options: RayOptions) -> None:
        if config.device and config.device.startswith("cuda:"):
            raise SweepConfigError(f"--device {config.device}: with --ray each actor gets one GPU from Ray; write --device cuda")
        self.ray = import_ray()
        self.config = config
        self.options = options
        self._started = started = time.perf_counter()
        self._exit = contextlib.ExitStack()
        if options.address == LOCAL and not self.ray.is_initialized():
            self._exit.enter_context(ray_dies_with_this_process())  # a local Ray must not outlive a killed driver
        try:
            self._owns_ray = _connect(self.ray, options.address)
        except BaseException:
            self._exit.close()
            raise
        connected = time.perf_counter() - started
        count, resources = actor_shape(self.ray.cluster_resources(), config, options)
        self._worker_class = self.ray.remote(**resources)(PointWorker)
        self.actors: list[Any] = []
        """Live actor handles, loading or loaded."""
        self._idle: list[Any] = []
        self._loading: dict[Any, Any] = {}
        self._busy: dict[Any, tuple[Any, Job]] = {}
        self._clean: CleanSamples | None = None
        self._clean_ref: Any = None
        self._load_deaths = 0
        self._max_load_deaths = MAX_ATTEMPTS * count
        share = f"{options.cpus_per_actor} CPU" + (" and 1 GPU" if "num_gpus" in resources else "")
        where = "started a local Ray instance" if self._owns_ray and options.address == LOCAL else "connected to Ray"
        print(f"lm-eval-faults sweep: {where} in {connected:.1f} s; {count} actor(s), {share} each, loading the model", file=sys.stderr)
        try:
            for _ in range(count):
                self._start_actor()
            if options.on_start is not None:
                options.on_start(self)
        except BaseException:
            self.close()
            raise

    # -- the PointEvaluator interface --------------------------------------------------------

    def plan(self) -> list[SweepPoint]:
        [(_, points, _)] = self._run([Job("plan", "plan")])
        return list(points)

    def clean_samples(self, baseline: SweepPoint) -> CleanSamples:
        [(_, clean, _)] = self._run([Job(baseline.point_id, "clean_samples", (baseline,))])
        return clean

    def evaluate(self, points: Sequence[SweepPoint], clean: CleanSamples | None) -> Iterator[PointResult]:
        if clean is not None and clean is not self._clean:
            self._share_clean(clean)
        for _, (result, caught), retries in self._run([Job(point.point_id, "evaluate", (point,)) for point in points]):
            for category, message in caught:
                warnings.warn(message, category, stacklevel=2)
            if retries:
                result.record["retries"] = retries
            yield result

    def close(self) -> None:
        """Stop every actor; stop Ray too if this pool started it (a cluster's driver just disconnects)."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors.clear()
        if self._owns_ray:
            self.ray.shutdown()
        self._exit.close()

    @property
    def in_flight(self) -> dict[str, Any]:
        """The actor running each job now, by job key (a point's id): what a monitor, or a test
        that kills an actor mid-point, looks at. A job whose result is already in Ray's object
        store has stopped running, so it is left out: killing its actor would lose nothing."""
        if not self._busy:
            return {}
        finished, _ = self.ray.wait(list(self._busy), num_returns=len(self._busy), timeout=0)
        return {job.key: actor for ref, (actor, job) in self._busy.items() if ref not in finished}

    # -- actors -----------------------------------------------------------------------------

    def _start_actor(self) -> None:
        """Start an actor loading the model; it gets the clean samples too once they exist (an
        actor runs its calls in the order this driver sent them, so they arrive before any point)."""
        actor = self._worker_class.remote()
        self._loading[actor.load.remote(self.config, self.options.cpus_per_actor)] = actor
        if self._clean_ref is not None:
            actor.set_clean.remote(self._clean_ref)
        self.actors.append(actor)

    def _share_clean(self, clean: CleanSamples) -> None:
        """Put the samples in Ray's object store once and point every actor at them."""
        self._clean = clean
        self._clean_ref = self.ray.put(clean)
        for actor in self.actors:
            actor.set_clean.remote(self._clean_ref)

    def _replace(self, actor: Any) -> None:
        """Drop a dead actor and start loading another: the survivors carry on meanwhile. The
        actor is killed as well, in case it was only unreachable: it must not come back holding
        its GPU."""
        self.ray.kill(actor)
        if actor in self.actors:
            self.actors.remove(actor)
        if actor in self._idle:
            self._idle.remove(actor)
        self._start_actor()

    def _finish_loading(self, ref: Any) -> None:
        actor = self._loading.pop(ref)
        try:
            self._get(ref)
        except self.ray.exceptions.RayActorError:
            self._load_deaths += 1
            if self._load_deaths >= self._max_load_deaths:
                raise RuntimeError(f"Ray actors died {self._load_deaths} times while loading the model; see Ray's logs") from None
            self._replace(actor)
            return
        self._idle.append(actor)
        ready, elapsed = len(self.actors) - len(self._loading), time.perf_counter() - self._started
        note(f"lm-eval-faults sweep: Ray actor {ready}/{len(self.actors)} ready ({elapsed:.0f} s after starting Ray)")

    def _get(self, ref: Any) -> Any:
        """`ray.get`, raising an error the actor raised as itself, so a bad model path or grid reads
        as it would in one process (Ray's wrapper starts with the remote traceback)."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, (ValueError, TypeError, OSError)):
                raise cause from error
            raise

    # -- scheduling -------------------------------------------------------------------------

    def _run(self, jobs: Sequence[Job]) -> Iterator[tuple[Job, Any, int]]:
        """Run `jobs` on the actors, one in flight per actor, yielding (job, value, retries) as
        each finishes. A job whose actor died is queued again, first in line."""
        queue = deque(jobs)
        busy = self._busy
        retries: Counter[str] = Counter()

        def dispatch() -> None:
            while queue and self._idle:
                actor, job = self._idle.pop(), queue.popleft()
                busy[getattr(actor, job.method).remote(*job.args)] = (actor, job)

        while queue or busy:
            dispatch()
            if not busy and not self._loading:
                raise RuntimeError("no Ray actor is left to run the sweep")
            [ref], _ = self.ray.wait([*busy, *self._loading], num_returns=1)
            if ref in self._loading:
                self._finish_loading(ref)
                continue
            actor, job = busy.pop(ref)
            try:
                value = self._get(ref)
            except self.ray.exceptions.RayActorError:
                retries[job.key] += 1
                if retries[job.key] >= MAX_ATTEMPTS:
                    raise RuntimeError(f"{job.key}: {retries[job.key]} Ray actors died running it; giving up (see Ray's logs)") from None
                self._replace(actor)
                queue.appendleft(job)
                continue
            self._idle.append(actor)
            dispatch()  # before yielding: the actor works while the driver writes the record
            yield job, value, retries[job.key]


def _connect(ray: ModuleType, address: str) -> bool:
    """Start or join Ray unless this process already has (then it is the caller's to stop);
    whether this call did. The dashboard is not started, and the actors' own output (lm-eval's
    progress bars, once per point per actor) stays in Ray's log files."""
    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address == LOCAL:
        ray.init(address=LOCAL, include_dashboard=False, **quiet)
    else:
        ray.init(address=address, **quiet)
    return True


def actor_shape(resources: dict[str, float], config: SweepConfig, options: RayOptions) -> tuple[int, dict[str, Any]]:
    """How many actors, and what each reserves: one GPU each where the cluster has GPUs (unless
    the sweep is pinned to the CPU), else `cpus_per_actor` CPUs each, as many as the CPUs allow."""
    gpus = int(resources.get("GPU", 0))
    if gpus and config.device != "cpu":
        return options.actors or gpus, {"num_gpus": 1, "num_cpus": options.cpus_per_actor}
    slots = max(1, int(resources.get("CPU", 1)) // options.cpus_per_actor)
    return options.actors or slots, {"num_cpus": options.cpus_per_actor}
