"""Fault sweeps: a grid of fault specs evaluated on ONE loaded model, resumable point by point.

    lm-eval-faults sweep --model_args pretrained=...,dtype=float16 --tasks mmlu_faults \\
        --p 1e-9:1e-1 --targets embedding,attention,mlp,norm,lm_head --seeds 3 --run_dir runs/x

Why one process: loading a 7B model takes longer than evaluating a point on a small task, and
`FaultyHFLM.set_faults` restores the clean weights exactly in O(faults), so the grid is walked
with one load and one `TaskManager`. Why a run directory: a long sweep gets killed. Every
finished point is appended to `results.jsonl` and fsynced before the next one starts, and
running the same command again skips the points already there, so nothing is lost or repeated.
`sweep.json` pins the configuration the results belong to; resuming with a different one is
refused rather than silently mixing two experiments in one file.

The grid is the product faults x sites x targets x layer groups x p x seeds, plus one clean
baseline (p=0). Each record follows the schema documented in `lm_eval_faults.metrics`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from lm_eval_faults.metrics import RESULTS_FILE
from lm_eval_faults.spec import (
    FAULT_KEYS,
    FAULT_KINDS,
    SITES,
    FaultSpec,
    FaultSpecError,
    parse_arg_string,
    parse_fault_args,
    parse_layers,
    parse_targets,
)

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

    from lm_eval_faults.model import FaultyHFLM

"""Also named by `sweep_report`; kept here so a sweep without matplotlib (`--no_report`) imports nothing of plotting."""
CONFIG_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"
BASELINE_ID = "baseline"
GRID_KEYS = ("p", "p01", "p10", "fault", "site", "target", "layers", "seed")
"""Fault keys the grid owns: they vary per point, so `fault_args` may not fix them."""


class SweepConfigError(ValueError):
    """A sweep option is invalid, or does not match the run directory it should resume."""


# --------------------------------------------------------------------------- grid syntax


def _items(text: str) -> list[str]:
    """Split a list on commas and on `+` (lm-eval style), but not on the `+` of `1e+0`."""
    return [item.strip() for item in re.split(r",|(?<![eE])\+", text) if item.strip()]


def _round(x: float) -> float:
    """Six significant digits: stable, readable p values (and so stable point ids)."""
    return float(f"{x:.6g}")


def parse_p_grid(value: str | tuple[float, ...] | list[float]) -> tuple[float, ...]:
    """Fault rates, ascending and distinct, from `1e-9:1e-1`, `1e-9:1e-1:17`, `1e-5,1e-4` or numbers.

    `lo:hi` is one point per decade, so hi/lo must be a power of ten; `lo:hi:N` is N
    log-spaced points including both ends. List items (`,` or `+`) may themselves be ranges.
    p=0 is refused: the clean baseline always runs, once.
    """
    items = [repr(float(x)) for x in value] if isinstance(value, (tuple, list)) else _items(str(value))
    values: set[float] = set()
    for item in items:
        values.update(_p_item(item))
    if not values:
        raise SweepConfigError(f"--p {value!r} gives no fault rate; write e.g. 1e-9:1e-1 or 1e-5,1e-4")
    return tuple(sorted(values))


def _p_item(item: str) -> list[float]:
    parts = item.split(":")
    try:
        numbers = [float(part) for part in parts[:2]]
        count = int(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise SweepConfigError(f"--p item {item!r} is not a number, lo:hi or lo:hi:N") from None
    if len(parts) > 3 or any(not (0 < x <= 1) for x in numbers):
        raise SweepConfigError(
            f"--p item {item!r}: use rates in (0, 1] as p, lo:hi or lo:hi:N (the p=0 baseline always runs once)"
        )
    if len(numbers) == 1:
        return [_round(numbers[0])]
    low, high = numbers
    if high < low:
        raise SweepConfigError(f"--p range {item!r} runs backwards; write {parts[1]}:{parts[0]}")
    decades = math.log10(high / low)
    if count is None:
        if abs(decades - round(decades)) > 1e-9:
            raise SweepConfigError(
                f"--p range {item!r} is not a whole number of decades; give a point count, e.g. {item}:5"
            )
        count = round(decades) + 1
    if count < 1 or (count == 1 and high != low):
        raise SweepConfigError(f"--p range {item!r} needs at least 2 points to span {parts[0]}..{parts[1]}")
    if count == 1:
        return [_round(low)]
    return [_round(low * 10 ** (decades * i / (count - 1))) for i in range(count)]


def parse_seeds(value: int | str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """`3` -> (0, 1, 2) (that many repeats); `0,1,2`, `5-7` or `2+9` -> those seeds; `7-7` -> (7,)."""
    if isinstance(value, (tuple, list)):
        seeds = {int(seed) for seed in value}
    elif re.fullmatch(r"\s*\d+\s*", str(value)):
        count = int(value)
        if count < 1:
            raise SweepConfigError("--seeds 0 runs nothing; give a repeat count >= 1 or a list of seeds")
        seeds = set(range(count))
    else:
        seeds = set()
        for item in _items(str(value)):
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
            if not match or int(match[2] or match[1]) < int(match[1]):
                raise SweepConfigError(f"--seeds {value!r}: write a repeat count (3) or seeds and ranges (0,1,2 or 5-7)")
            seeds.update(range(int(match[1]), int(match[2] or match[1]) + 1))
    return tuple(sorted(seeds))


def _choices(option: str, value: str | tuple[str, ...] | list[str], valid: tuple[str, ...] | dict) -> tuple[str, ...]:
    """A comma list of names from `valid`, in the given order, duplicates dropped."""
    names = _split_commas(value)
    for name in names:
        if name not in valid:
            raise SweepConfigError(f"{option} {name!r} is invalid: choose from {', '.join(valid)}")
    return names


def _split_commas(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    items = value if isinstance(value, (tuple, list)) else str(value).split(",")
    return tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))


def parse_target_series(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """`embedding,attention+mlp` -> ("embedding", "attention+mlp"): one series per comma item."""
    try:
        return tuple(dict.fromkeys("+".join(parse_targets(item)) for item in _split_commas(value)))
    except FaultSpecError as err:
        raise SweepConfigError(f"--targets {value!r}: {err}") from None


def parse_layer_groups(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Check the syntax of `--layers` items (`all`, `groups:N`, `0-3`, `28-31+0`), keep them as text.

    `groups:N` can only be resolved against a model (`resolve_layer_groups`); the config
    stores what the user wrote so that resuming compares like with like.
    """
    items = _split_commas(value) or ("all",)
    for item in items:
        if item.lower().startswith("groups:"):
            size = item.partition(":")[2]
            if not size.isdigit() or int(size) < 1:
                raise SweepConfigError(f"--layers {item!r}: write groups:N with a group size N >= 1, e.g. groups:4")
        else:
            try:
                parse_layers(item)
            except FaultSpecError as err:
                raise SweepConfigError(f"--layers {item!r}: {err}") from None
    return items


def resolve_layer_groups(items: tuple[str, ...], n_layers: int | None) -> tuple[tuple[int, ...] | None, ...]:
    """Layer groups as index tuples (None = all layers); `groups:4` on 10 layers -> 0-3, 4-7, 8-9."""
    groups: list[tuple[int, ...] | None] = []
    for item in items:
        if item.lower().startswith("groups:"):
            if not n_layers:
                raise SweepConfigError(f"--layers {item}: this model has no stack of decoder layers to group")
            size = int(item.partition(":")[2])
            groups += [tuple(range(start, min(start + size, n_layers))) for start in range(0, n_layers, size)]
        else:
            groups.append(parse_layers(item))
    return tuple(dict.fromkeys(groups))


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SweepConfig:
    """Everything that decides a sweep's results; stored as `sweep.json` in the run directory.

    Grid fields accept the command-line text (`p="1e-9:1e-1"`, `seeds=3`, `targets="attention,mlp"`)
    or already-parsed tuples; `__post_init__` normalises both to the same tuples, so a
    config compares equal to itself however it was written.
    """

    model_args: str
    tasks: tuple[str, ...]
    p: tuple[float, ...]
    faults: tuple[str, ...] = ("bitflip",)
    sites: tuple[str, ...] = ("weights",)
    targets: tuple[str, ...] = ("all",)
    layers: tuple[str, ...] = ("all",)
    seeds: tuple[int, ...] = (0,)
    fault_args: str = ""
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: str = "1"
    max_batch_size: int | None = None
    device: str | None = None
    include_path: tuple[str, ...] = ()
    gen_kwargs: str | None = None
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = True
    system_instruction: str | None = None
    bootstrap_iters: int = 100000
    random_seed: int = 0

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("tasks", _split_commas(self.tasks))
        if not self.tasks:
            raise SweepConfigError("--tasks is empty; name at least one lm-eval task")
        set_("p", parse_p_grid(self.p))
        set_("faults", _choices("--faults", self.faults, FAULT_KINDS))
        set_("sites", _choices("--sites", self.sites, SITES))
        set_("targets", parse_target_series(self.targets))
        set_("layers", parse_layer_groups(self.layers))
        set_("seeds", parse_seeds(self.seeds))
        set_("include_path", _split_commas(self.include_path))
        set_("batch_size", str(self.batch_size))
        if self.limit is not None:
            set_("limit", float(self.limit))
        self.hf_args()  # validate both argument strings before anything is loaded
        self.fixed_fault_fields()

    def hf_args(self) -> dict[str, Any]:
        """`model_args` for the wrapped HF model; fault keys belong in the grid or `fault_args`."""
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(self.model_args)
        faults = [key for key in args if key in FAULT_KEYS]
        if faults:
            raise SweepConfigError(
                f"--model_args holds fault keys {', '.join(faults)}: use --p/--faults/--sites/--targets/"
                "--layers/--seeds for the grid, and --fault_args for keys fixed across it (bits, value_range, ...)"
            )
        return args

    def fixed_fault_fields(self) -> dict[str, Any]:
        """Fault keys shared by every point (e.g. bits=exponent), validated on a clean spec."""
        args = parse_arg_string(self.fault_args)
        grid = [key for key in args if key in GRID_KEYS]
        if grid:
            raise SweepConfigError(f"--fault_args may not set {', '.join(grid)}: the grid options set them per point")
        try:
            _, unknown = parse_fault_args(args)
        except FaultSpecError as err:
            raise SweepConfigError(f"--fault_args: {err}") from None
        if unknown:
            raise SweepConfigError(f"--fault_args: not fault keys: {', '.join(unknown)}")
        return args

    def to_dict(self) -> dict[str, Any]:
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepConfig:
        return cls(**{name: tuple(value) if isinstance(value, list) else value for name, value in data.items()})


# --------------------------------------------------------------------------- points


@dataclass(frozen=True)
class SweepPoint:
    """One evaluation of the sweep: a spec and the id that marks it done in `results.jsonl`."""

    point_id: str
    spec: FaultSpec
    baseline: bool = False

    def labels(self) -> dict[str, Any]:
        """The record fields that place this point in its series (see `metrics.series_key`)."""
        if self.baseline:
            return {"fault": "none", "site": "none", "target": "none", "layers": "all", "p": 0.0, "seed": 0}
        data = self.spec.to_dict()
        return {
            "fault": self.spec.fault,
            "site": self.spec.site,
            "target": data["target"],
            "layers": data["layers"] or "all",
            "p": self.spec.p,
            "seed": self.spec.seed,
        }


def plan_points(config: SweepConfig, n_layers: int | None) -> list[SweepPoint]:
    """The baseline, then every grid point; seeds outermost so an interrupted sweep already
    holds complete curves for its first seeds."""
    fixed = config.fixed_fault_fields()
    points = [SweepPoint(BASELINE_ID, FaultSpec(**fixed), baseline=True)]
    layer_groups = resolve_layer_groups(config.layers, n_layers)
    for seed, fault, site, target, layers, p in product(
        config.seeds, config.faults, config.sites, config.targets, layer_groups, config.p
    ):
        try:
            spec = FaultSpec(p=p, fault=fault, site=site, target=target, layers=layers, seed=seed, **fixed)
        except FaultSpecError as err:
            raise SweepConfigError(f"grid point fault={fault}, site={site}, target={target}: {err}") from None
        labels = SweepPoint("", spec).labels()
        point_id = "|".join([labels["fault"], labels["site"], labels["target"], labels["layers"], f"p={p!r}", f"seed={seed}"])
        points.append(SweepPoint(point_id, spec))
    return points


def check_selections(points: list[SweepPoint], lm: FaultyHFLM) -> None:
    """Fail before the first evaluation if a (site, target, layers) selects nothing in this model,
    e.g. target=embedding with layers=0-3: better now than after hours of sweeping."""
    from lm_eval_faults.targets import select_modules, select_params

    checked: set[tuple[Any, ...]] = set()
    messages: set[str] = set()
    for spec in (point.spec for point in points):
        key = (spec.site, spec.target, spec.layers, spec.modules)
        if key in checked:
            continue
        checked.add(key)
        try:
            if spec.on_weights:
                select_params(lm.model, spec)
            if spec.on_activations:
                select_modules(lm.model, spec)
        except ValueError as err:
            messages.add(str(err))
    if messages:
        raise SweepConfigError("some grid series select nothing in this model:\n  " + "\n  ".join(sorted(messages)))


# --------------------------------------------------------------------------- run directory


class RunDir:
    """The on-disk state of one sweep: its config, its results, and a lock against a second writer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.results = self.path / RESULTS_FILE
        self.config = self.path / CONFIG_FILE

    @contextlib.contextmanager
    def claim(self, config: SweepConfig) -> Iterator[None]:
        """Hold the run directory for this process, after checking it can belong to `config`."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_FILE, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SweepConfigError(f"{self.path} is in use by another running sweep") from None
            self._check_config(config)
            yield

    def save_config(self, config: SweepConfig) -> None:
        """Pin `config` to the directory (atomically); called once the grid has been validated,
        so that a rejected command leaves nothing behind that would block its corrected rerun."""
        if not self.config.exists():
            temporary = self.config.with_suffix(".json.tmp")
            temporary.write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
            os.replace(temporary, self.config)

    def _check_config(self, config: SweepConfig) -> None:
        wanted = config.to_dict()
        if not self.config.exists():
            if self.results.exists():
                raise SweepConfigError(f"{self.results} exists but {self.config} does not: not a sweep run directory")
            return
        stored = json.loads(self.config.read_text(encoding="utf-8"))
        if stored != wanted:
            differences = [
                f"  {key}: run directory has {stored.get(key)!r}, this command has {wanted.get(key)!r}"
                for key in sorted(set(stored) | set(wanted))
                if stored.get(key) != wanted.get(key)
            ]
            raise SweepConfigError(
                f"{self.path} holds a sweep with a different configuration, so its results would not be comparable:\n"
                + "\n".join(differences)
                + "\nRerun with the original options to resume, or choose a new --run_dir."
            )

    def finished(self) -> set[str]:
        """Point ids already in `results.jsonl`, after dropping a record a killed process left half-written."""
        from lm_eval_faults.metrics import load_records

        if not self.results.exists():
            return set()
        self._repair_tail()
        return {str(record["point_id"]) for record in load_records(self.results)}

    def _repair_tail(self) -> None:
        """Make the file end with a newline: end a complete last record, cut an incomplete one."""
        data = self.results.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])["point_id"]
        except (ValueError, TypeError, KeyError):
            warnings.warn(
                f"{self.results}: dropping an incomplete last record ({len(data) - start} bytes) "
                "left by an interrupted sweep; that point runs again",
                stacklevel=3,
            )
            with open(self.results, "r+b") as handle:
                handle.truncate(start)
                os.fsync(handle.fileno())
            return
        with open(self.results, "ab") as handle:
            _write_durably(handle, b"\n")

    def append(self, record: dict[str, Any]) -> None:
        append_line(self.results, json.dumps(record).encode("utf-8"))


def append_line(path: Path, line: bytes) -> None:
    """Append `line` as one line and fsync it, starting a fresh line if the file does not end with one."""
    with open(path, "a+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        prefix = b""
        if size:
            handle.seek(size - 1)
            prefix = b"" if handle.read(1) == b"\n" else b"\n"
        _write_durably(handle, prefix + line + b"\n")


def _write_durably(handle: BinaryIO, data: bytes) -> None:
    """Write and fsync: once this returns, a kill (or power loss) cannot take the data back."""
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())


# --------------------------------------------------------------------------- evaluation


def load_model(config: SweepConfig) -> FaultyHFLM:
    """The clean model (p=0), loaded once for the whole sweep."""
    from lm_eval_faults.model import FaultyHFLM

    extra = {"batch_size": config.batch_size, "max_batch_size": config.max_batch_size, "device": config.device}
    lm = FaultyHFLM.create_from_arg_obj(config.hf_args(), extra)
    lm.print_report = False  # one table per point would bury the progress bar; the report has them all
    return lm


def evaluate_point(lm: FaultyHFLM, point: SweepPoint, config: SweepConfig, task_manager: TaskManager) -> dict[str, Any]:
    """Inject `point`'s faults (restoring the previous point's first) and evaluate: one record."""
    import lm_eval

    started = time.perf_counter()
    lm.set_faults(point.spec)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(config.tasks),
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        task_manager=task_manager,
        gen_kwargs=config.gen_kwargs,
        apply_chat_template=config.apply_chat_template,
        fewshot_as_multiturn=config.fewshot_as_multiturn,
        system_instruction=config.system_instruction,
        bootstrap_iters=config.bootstrap_iters,
        random_seed=config.random_seed,
        log_samples=False,
    )
    return {
        "point_id": point.point_id,
        "baseline": point.baseline,
        **point.labels(),
        **fault_counts(lm, point.spec),
        "metrics": task_metrics(results["results"]),
        "elapsed_s": round(time.perf_counter() - started, 3),
    }


def fault_counts(lm: FaultyHFLM, spec: FaultSpec) -> dict[str, Any]:
    """Injected and expected faults (elements hit, bits faulted) over the spec's sites, and
    non-finite weights and requests, from the model's `FaultReport`."""
    report = lm.report
    parts = [part for part, on in (("weights", spec.on_weights), ("activations", spec.on_activations)) if on]
    totals = [report.totals(part) for part in parts]

    def total(name: str) -> float:
        return sum(t[name] for t in totals)

    return {
        "injected": {"elements": int(total("hit_elements")), "bits": int(total("fault_bits"))},
        "expected": {"elements": round(total("expected_elements"), 3), "bits": round(total("expected_bits"), 3)},
        "nonfinite": {
            "weights": int(report.totals("weights")["nonfinite_created"]),
            "activations": int(report.totals("activations")["nonfinite_created"]),
            "requests": dict(report.nonfinite_requests),
        },
    }


def task_metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's per-task metrics, with the default filter's `,none` suffix dropped.

    lm-eval names every metric `metric,filter`; keys without a comma (`alias`, `sample_len`)
    are bookkeeping and are left out, so they can never be mistaken for a score.
    """
    return {
        task: {metric.removesuffix(",none"): value for metric, value in values.items() if "," in metric}
        for task, values in results.items()
    }


@dataclass
class SweepRun:
    """What one call of `run_sweep` did."""

    run_dir: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    report: Path | None = None


def run_sweep(
    run_dir: str | Path,
    config: SweepConfig,
    *,
    lm: FaultyHFLM | None = None,
    task_manager: TaskManager | None = None,
    on_point: Callable[[dict[str, Any]], None] | None = None,
    report: bool = True,
    progress: bool = True,
) -> SweepRun:
    """Run (or resume) the sweep `config` in `run_dir`; returns which points ran and which were done.

    `lm` reuses an already loaded clean `FaultyHFLM` built from the same `model_args` (it is
    left clean afterwards); `task_manager` reuses an lm-eval `TaskManager`. `on_point` is
    called with each record once it is safely on disk.
    """
    from tqdm.auto import tqdm

    directory = RunDir(run_dir)
    outcome = SweepRun(directory.path)
    with directory.claim(config):
        done = directory.finished()
        lm = lm if lm is not None else load_model(config)
        if lm.world_size > 1:
            raise SweepConfigError("sweeps run in one process; data-parallel launches are not supported")
        stack = _decoder_stack_size(lm)
        points = plan_points(config, stack)
        check_selections(points, lm)
        directory.save_config(config)
        task_manager = task_manager or _task_manager(config)
        outcome.skipped = [point.point_id for point in points if point.point_id in done]
        pending = [point for point in points if point.point_id not in done]
        bar = tqdm(total=len(points), initial=len(outcome.skipped), desc="sweep points", unit="point", disable=not progress, file=sys.stderr)
        try:
            for point in pending:
                bar.set_postfix_str(point.point_id)
                record = evaluate_point(lm, point, config, task_manager)
                directory.append(record)
                outcome.ran.append(point.point_id)
                bar.update()
                if on_point is not None:
                    on_point(record)
        finally:
            bar.close()
            lm.set_faults(FaultSpec())
    if report:
        from lm_eval_faults.sweep_report import build_report

        outcome.report = build_report(directory.path)
    return outcome


def _decoder_stack_size(lm: FaultyHFLM) -> int | None:
    from lm_eval_faults.targets import decoder_layers

    stack = decoder_layers(lm.model)
    return len(stack[1]) if stack else None


def _task_manager(config: SweepConfig) -> TaskManager:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(config.include_path) or None)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lm-eval-faults sweep`; lm-eval's own options keep lm-eval's names."""
    parser.add_argument("--model_args", default="", help="HF model arguments as for `--model hf`, e.g. pretrained=mistralai/Mistral-7B-v0.1,dtype=float16 (default: the embedded demo model)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks")
    parser.add_argument("--run_dir", "--output_path", dest="run_dir", required=True, help="directory for sweep.json, results.jsonl and the report; rerun the same command to resume")
    grid = parser.add_argument_group("grid (one point per combination, plus one clean baseline)")
    grid.add_argument("--p", required=True, help="fault rates: 1e-9:1e-1 (one per decade), 1e-9:1e-1:17 (17 log-spaced), or a list 1e-5,1e-4")
    grid.add_argument("--faults", default="bitflip", help=f"comma list of fault kinds ({', '.join(FAULT_KINDS)})")
    grid.add_argument("--sites", default="weights", help=f"comma list of sites ({', '.join(SITES)})")
    grid.add_argument("--targets", default="all", help="comma list, one series each, e.g. embedding,attention,mlp,norm,lm_head (join with + to merge)")
    grid.add_argument("--layers", default="all", help="comma list of layer groups: all, groups:4 (consecutive groups of 4), or 0-3,4-7")
    grid.add_argument("--seeds", default="1", help="repeats (3 = seeds 0,1,2) or explicit seeds (0,1,2 or 5-7)")
    grid.add_argument("--fault_args", default="", help="fault keys fixed across the grid, e.g. bits=exponent or value_range=-1:1")
    evaluation = parser.add_argument_group("lm-eval options")
    evaluation.add_argument("--num_fewshot", type=int, default=None)
    evaluation.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    evaluation.add_argument("--batch_size", default="1")
    evaluation.add_argument("--max_batch_size", type=int, default=None)
    evaluation.add_argument("--device", default=None)
    evaluation.add_argument("--include_path", default="", help="comma list of extra task directories")
    evaluation.add_argument("--gen_kwargs", default=None)
    evaluation.add_argument("--apply_chat_template", action="store_true")
    evaluation.add_argument("--fewshot_as_multiturn", action=argparse.BooleanOptionalAction, default=True)
    evaluation.add_argument("--system_instruction", default=None)
    evaluation.add_argument("--bootstrap_iters", type=int, default=100000)
    evaluation.add_argument("--seed", dest="random_seed", type=int, default=0, help="lm-eval's random seed (few-shot sampling etc.), not the fault seed")
    parser.add_argument("--no_report", action="store_true", help="skip building report.md and figures at the end")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar over points")


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """The `SweepConfig` named by parsed command-line options."""
    names = {f.name for f in fields(SweepConfig)}
    return SweepConfig(**{name: value for name, value in vars(args).items() if name in names})


def main(args: argparse.Namespace) -> int:
    """`lm-eval-faults sweep`: 0 on success, 2 on a configuration error (message on stderr)."""
    try:
        config = config_from_args(args)
        outcome = run_sweep(args.run_dir, config, report=not args.no_report, progress=not args.no_progress)
    except (SweepConfigError, FaultSpecError) as err:  # FaultSpecError: a typo of a fault key in --model_args
        print(f"lm-eval-faults sweep: {err}", file=sys.stderr)
        return 2
    print(
        f"lm-eval-faults sweep: {len(outcome.ran)} points run, {len(outcome.skipped)} already done; "
        f"results in {outcome.run_dir / RESULTS_FILE}" + (f", report {outcome.report}" if outcome.report else ""),
        file=sys.stderr,
    )
    return 0
