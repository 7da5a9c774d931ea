"""Sweep grids: parse the grid options, pin a sweep's configuration, and plan its points.

The grid is the product faults x sites x targets x layer groups x p x seeds, plus one clean
baseline (p=0). `SweepConfig` is everything that decides a sweep's results (stored as
`sweep.json` in the run directory); `plan_points` turns it into the ordered list of points.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm_eval_faults.core.sites.registry import parse_sites
from lm_eval_faults.core.spec import (
    FAULT_KEYS,
    FAULT_KINDS,
    PROTECTION_KEYS,
    FaultSpec,
    FaultSpecError,
    parse_arg_string,
    parse_fault_args,
    parse_layers,
    parse_targets,
    site_choices,
)

if TYPE_CHECKING:
    from lm_eval_faults.harness.model import FaultyHFLM

BASELINE_ID = "baseline"
MAX_RATES = 1_000
"""Most fault rates one sweep may hold: a typo such as 1e-9:1e-1:10000000 must fail, not run for years."""
MAX_SEEDS = 1_000
"""Most seeds one sweep may hold."""
MAX_POINTS = 10_000
"""Most grid points one sweep may hold (the baseline not counted)."""
GRID_KEYS = ("p", "p01", "p10", "fault", "site", "target", "layers", "seed", "fit")
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
        _check_limit("--p", value, len(values), MAX_RATES, "rates")
    if not values:
        raise SweepConfigError(f"--p {value!r} gives no fault rate; write e.g. 1e-9:1e-1 or 1e-5,1e-4")
    return tuple(sorted(values))


def _check_limit(option: str, value: Any, count: int, limit: int, what: str) -> None:
    """Refuse a grid dimension over `limit` before it is built, naming the option and value."""
    if count > limit:
        raise SweepConfigError(f"{option} {value!r} gives {count} {what}; at most {limit} are allowed")


def parse_fit_grid(value: str | tuple[float, ...] | list[float]) -> tuple[float, ...]:
    """FIT rates (per Mbit) as a sweep axis instead of `--p`: the syntax of `parse_p_grid`, any
    positive numbers; each point's p follows from `--fault_args hours=` (`patterns.fit`)."""
    items = [repr(float(x)) for x in value] if isinstance(value, (tuple, list)) else _items(str(value))
    values: set[float] = set()
    for item in items:
        values.update(_p_item(item, "--fit", math.inf))
        _check_limit("--fit", value, len(values), MAX_RATES, "rates")
    if not values:
        raise SweepConfigError(f"--fit {value!r} gives no FIT rate; write e.g. 1e2:1e6 or 500,5000")
    return tuple(sorted(values))


def _p_item(item: str, option: str = "--p", highest: float = 1.0) -> list[float]:
    parts = item.split(":")
    try:
        numbers = [float(part) for part in parts[:2]]
        count = int(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise SweepConfigError(f"{option} item {item!r} is not a number, lo:hi or lo:hi:N") from None
    if len(parts) > 3 or any(not (0 < x <= highest) for x in numbers):
        what = "rates in (0, 1] as p" if option == "--p" else "FIT per Mbit, numbers > 0"
        raise SweepConfigError(f"{option} item {item!r}: use {what}, lo:hi or lo:hi:N (the clean baseline always runs once)")
    if len(numbers) == 1:
        return [_round(numbers[0])]
    low, high = numbers
    if high < low:
        raise SweepConfigError(f"{option} range {item!r} runs backwards; write {parts[1]}:{parts[0]}")
    decades = math.log10(high / low)
    if count is None:
        if abs(decades - round(decades)) > 1e-9:
            raise SweepConfigError(f"{option} range {item!r} is not a whole number of decades; give a point count, e.g. {item}:5")
        count = round(decades) + 1
    if count < 1 or (count == 1 and high != low):
        raise SweepConfigError(f"{option} range {item!r} needs at least 2 points to span {parts[0]}..{parts[1]}")
    if count > MAX_RATES:
        raise SweepConfigError(f"{option} range {item!r} asks for {count} rates; at most {MAX_RATES} are allowed")
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
        _check_limit("--seeds", value, count, MAX_SEEDS, "seeds")
        seeds = set(range(count))
    else:
        seeds = set()
        for item in _items(str(value)):
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
            if not match or int(match[2] or match[1]) < int(match[1]):
                raise SweepConfigError(f"--seeds {value!r}: write a repeat count (3) or seeds and ranges (0,1,2 or 5-7)")
            first, last = int(match[1]), int(match[2] or match[1])
            _check_limit("--seeds", value, len(seeds) + last - first + 1, MAX_SEEDS, "seeds")
            seeds.update(range(first, last + 1))
    _check_limit("--seeds", value, len(seeds), MAX_SEEDS, "seeds")
    return tuple(sorted(seeds))


def _choices(option: str, value: str | tuple[str, ...] | list[str], valid: tuple[str, ...] | dict) -> tuple[str, ...]:
    """A comma list of names from `valid`, in the given order, duplicates dropped."""
    names = _split_commas(value)
    for name in names:
        if name not in valid:
            raise SweepConfigError(f"{option} {name!r} is invalid: choose from {', '.join(valid)}")
    return names


def _site_set(value: str) -> str:
    """One `--sites` entry (`weights`, `weights+activations`) as registered sites, in their order."""
    sites = parse_sites(value)
    if sites is None:
        raise SweepConfigError(f"--sites {value!r} is invalid: choose one of {site_choices()} (or any sites joined with +)")
    return "+".join(sites)


def _split_commas(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    items = value if isinstance(value, (tuple, list)) else str(value).split(",")
    return tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))


def parse_target_series(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """`embedding,attention+mlp` -> ("embedding", "attention+mlp"): one series per comma item."""
    try:
        return tuple(dict.fromkeys("+".join(parse_targets(item)) for item in _split_commas(value)))
    except FaultSpecError as err:
        raise SweepConfigError(f"--targets {value!r}: {err}") from None


NO_PROTECTION = "none"


def parse_protections(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Protection schemes of the grid, separated by `;`, each a set of protection keys:
    `none;protect_bits=exponent_msb;ecc=secded,ecc_policy=keep`. Each is checked on a spec."""
    items = [item.strip() for item in (value.split(";") if isinstance(value, str) else value) if item.strip()]
    schemes: list[str] = []
    for item in items or [NO_PROTECTION]:
        if item.lower() == NO_PROTECTION:
            scheme = NO_PROTECTION
        else:
            try:
                args = parse_arg_string(item)
                wrong = [key for key in args if key not in PROTECTION_KEYS]
                if wrong:
                    raise SweepConfigError(
                        f"--protections item {item!r}: {', '.join(wrong)} not protection keys (those are {', '.join(PROTECTION_KEYS)})"
                    )
                FaultSpec(**args)
            except FaultSpecError as err:
                raise SweepConfigError(f"--protections item {item!r}: {err}") from None
            scheme = ",".join(f"{key}={value}" for key, value in args.items())
        if scheme in schemes:
            raise SweepConfigError(f"--protections lists {scheme!r} twice")
        schemes.append(scheme)
    return tuple(schemes)


def protection_fields(scheme: str) -> dict[str, Any]:
    """The spec fields of one `--protections` item."""
    return {} if scheme == NO_PROTECTION else parse_arg_string(scheme)


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


def parse_limit(option: str, value: float | str | None) -> float | None:
    """lm-eval's `--limit`: a fraction of each task in (0, 1), or a whole number of documents.
    `-1` used to run into lm-eval and wedge; `2.5` would silently become 2."""
    if value is None:
        return None
    try:
        limit = float(value)
    except (TypeError, ValueError):
        raise SweepConfigError(f"{option} {value!r} is not a number: give a fraction in (0, 1) or a document count") from None
    if not (math.isfinite(limit) and limit > 0) or (limit > 1 and not limit.is_integer()):
        raise SweepConfigError(f"{option} {value!r} is invalid: give a fraction in (0, 1) or a whole number of documents >= 1")
    return limit


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
    protections: tuple[str, ...] = (NO_PROTECTION,)
    fault_args: str = ""
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: str = "32"
    max_batch_size: int | None = None
    device: str | None = None
    include_path: tuple[str, ...] = ()
    gen_kwargs: str | None = None
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = True
    system_instruction: str | None = None
    bootstrap_iters: int = 100000
    random_seed: int = 0
    fit: tuple[float, ...] = ()
    """FIT rates per Mbit as the rate axis instead of `p` (with `fault_args` hours=)."""

    def __post_init__(self) -> None:
        def set_(name: str, value: object) -> None:
            object.__setattr__(self, name, value)  # the dataclass is frozen

        set_("tasks", _split_commas(self.tasks))
        if not self.tasks:
            raise SweepConfigError("--tasks is empty; name at least one lm-eval task")
        if self.fit:
            set_("fit", parse_fit_grid(self.fit))
            if self.p:
                raise SweepConfigError("give --p or --fit as the rate axis, not both")
            if "hours" not in parse_arg_string(self.fault_args):
                raise SweepConfigError("--fit needs the deployment time: add --fault_args hours=H (e.g. hours=8760, a year)")
        else:
            set_("p", parse_p_grid(self.p))
        set_("faults", _choices("--faults", self.faults, FAULT_KINDS))
        set_("sites", tuple(_site_set(name) for name in _split_commas(self.sites)))
        set_("targets", parse_target_series(self.targets))
        set_("layers", parse_layer_groups(self.layers))
        set_("seeds", parse_seeds(self.seeds))
        set_("protections", parse_protections(self.protections))
        set_("include_path", _split_commas(self.include_path))
        set_("batch_size", str(self.batch_size))
        set_("limit", parse_limit("--limit", self.limit))
        self.hf_args()  # validate both argument strings before anything is loaded
        self.fixed_fault_fields()
        self.check_size(len(self.layers))

    def check_size(self, layer_groups: int) -> None:
        """Refuse a grid of more than `MAX_POINTS` points; `layer_groups` is the number of
        layer groups (known exactly only once `groups:N` meets a model)."""
        dims = [len(self.protections), len(self.faults), len(self.sites), len(self.targets), layer_groups, len(self.rates), len(self.seeds)]
        total = math.prod(dims)
        if total > MAX_POINTS:
            raise SweepConfigError(
                f"the grid --protections x --faults x --sites x --targets x --layers x --p x --seeds = {' x '.join(map(str, dims))} "
                f"= {total} points; at most {MAX_POINTS} are allowed"
            )

    @property
    def rates(self) -> tuple[float, ...]:
        """The rate axis: `p`, or `fit` (FIT per Mbit)."""
        return self.fit or self.p

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
            _, unknown = parse_fault_args({**args, **({"fit": self.fit[0]} if self.fit else {})})
        except FaultSpecError as err:
            raise SweepConfigError(f"--fault_args: {err}") from None
        if unknown:
            raise SweepConfigError(f"--fault_args: not fault keys: {', '.join(unknown)}")
        protection = [key for key in args if key in PROTECTION_KEYS]
        if protection and self.protections != (NO_PROTECTION,):
            raise SweepConfigError(f"--fault_args sets {', '.join(protection)} while --protections varies them; use one or the other")
        return args

    def to_dict(self) -> dict[str, Any]:
        data = {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}
        if self.protections == (NO_PROTECTION,):
            del data["protections"]  # run directories from before the protection axis still resume
        if not self.fit:
            del data["fit"]  # and those from before the FIT axis
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepConfig:
        fields: dict[str, Any] = {name: tuple(value) if isinstance(value, list) else value for name, value in data.items()}
        return cls(**fields)


# --------------------------------------------------------------------------- points


@dataclass(frozen=True)
class SweepPoint:
    """One evaluation of the sweep: a spec and the id that marks it done in `results.jsonl`."""

    point_id: str
    spec: FaultSpec
    baseline: bool = False
    protection: str = NO_PROTECTION

    def labels(self) -> dict[str, Any]:
        """The record fields that place this point in its series (see `series.series_key`)."""
        if self.baseline:
            return {"fault": "none", "site": "none", "target": "none", "layers": "all", "p": 0.0, "seed": 0}
        data = self.spec.to_dict()
        protection = {} if self.protection == NO_PROTECTION else {"protection": self.protection}
        return {
            **protection,
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
    save_map = fixed.pop("save_map", None)
    clean = {key: value for key, value in fixed.items() if key != "hours"}  # a time without a FIT rate is no rate
    points = [SweepPoint(BASELINE_ID, FaultSpec(**clean), baseline=True)]  # the clean baseline has no map to save
    layer_groups = resolve_layer_groups(config.layers, n_layers)
    config.check_size(len(layer_groups))
    grid = product(config.seeds, config.protections, config.faults, config.sites, config.targets, layer_groups, config.rates)
    for seed, protection, fault, site, target, layers, rate in grid:
        fields = {**fixed, **protection_fields(protection), **({"fit": rate} if config.fit else {"p": rate})}
        try:
            spec = FaultSpec(fault=fault, site=site, target=parse_targets(target), layers=layers, seed=seed, **fields)
        except FaultSpecError as err:
            raise SweepConfigError(f"grid point fault={fault}, site={site}, target={target}, protection={protection}: {err}") from None
        labels = SweepPoint("", spec, protection=protection).labels()
        parts = [
            labels["fault"],
            labels["site"],
            labels["target"],
            labels["layers"],
            f"fit={rate!r}" if config.fit else f"p={rate!r}",
            f"seed={seed}",
        ]
        if protection != NO_PROTECTION:  # unprotected ids stay as before, so older run directories resume
            parts.append(f"protection={protection}")
        point_id = "|".join(parts)
        if save_map is not None:
            spec = replace(spec, save_map=point_map_path(save_map, point_id))
        points.append(SweepPoint(point_id, spec, protection=protection))
    return points


def point_map_path(save_map: str, point_id: str) -> str:
    """`--fault_args save_map=m.npz` in a sweep: each point's own map, `m.<point id>.npz`, so no
    point overwrites another's (one shared path kept only the last point's faults)."""
    path = Path(save_map)
    slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", point_id)
    return str(path.with_name(f"{path.stem}.{slug}{path.suffix or '.npz'}"))


def preflight_sweep(config: SweepConfig) -> None:
    """What the input alone tells, before the model loads and before the run directory is
    claimed: unknown task names, and every grid point (the baseline's fixed keys included)
    against the model's config: `--layers 0-99` on a 4-layer model, `protect_bits=20` on float16.
    Found later, each would leave a pinned sweep.json that refuses the corrected command."""
    from lm_eval_faults.core.fault_map import FaultMapError, check_writable
    from lm_eval_faults.harness.package_data import demo_model_dir
    from lm_eval_faults.harness.preflight import check_against_config, check_tasks, layer_count, read_config

    try:
        check_tasks("--tasks", config.tasks, config.include_path)
    except FaultSpecError as err:
        raise SweepConfigError(str(err)) from None
    model_args = {"pretrained": str(demo_model_dir()), **config.hf_args()}
    model_config = read_config(model_args)
    n_layers = layer_count(model_config) if model_config is not None else None
    if n_layers is None and any(item.lower().startswith("groups:") for item in config.layers):
        return  # groups:N waits for the loaded model's decoder stack
    checked: set[FaultSpec] = set()
    points = plan_points(config, n_layers)
    save_map = parse_arg_string(config.fault_args).get("save_map")
    if save_map:  # every point's map goes beside this one (`point_map_path`)
        try:
            check_writable(str(save_map))
        except FaultMapError as err:
            raise SweepConfigError(f"--fault_args {err}") from None
    for point in points:
        if point.spec in checked:
            continue
        checked.add(point.spec)
        try:
            check_against_config(point.spec, model_args, model_config)
        except FaultSpecError as err:
            where = "the baseline (--fault_args)" if point.baseline else f"grid point {point.point_id}"
            raise SweepConfigError(f"{where}: {err}") from None


def check_selections(points: list[SweepPoint], lm: FaultyHFLM) -> None:
    """Fail before anything is written or evaluated if a grid point cannot run on this model:
    a (site, target, layers) that selects nothing (e.g. target=embedding with layers=0-3), or
    bit positions the selected tensors do not have (bits=40 on float16). Caught after the
    baseline, such a point would leave a pinned sweep.json that blocks the corrected rerun."""
    checked: set[tuple[Any, ...]] = set()
    messages: set[str] = set()
    for spec in (point.spec for point in points):
        key = (
            spec.site,
            spec.target,
            spec.layers,
            spec.modules,
            spec.fault,
            spec.bits,
            spec.active,
            spec.storage,
            spec.group_size,
            spec.fields,
        )
        if key in checked:
            continue
        checked.add(key)
        try:
            _check_spec(spec, lm)
        except (ValueError, TypeError) as err:
            messages.add(str(err))
    if messages:
        raise SweepConfigError("some grid points cannot run on this model:\n  " + "\n  ".join(sorted(messages)))


def _check_spec(spec: FaultSpec, lm: FaultyHFLM) -> None:
    """Raise ValueError/TypeError if `spec` selects nothing or names bits its tensors lack."""
    from lm_eval_faults.core.sites.targets import select_modules, select_params
    from lm_eval_faults.core.storage.layouts import layout_of, resolve_bits

    lm.prepare_storage(spec.storage)  # storage=file: the file's blocks are what a point selects
    layouts = set()
    if spec.on_weights:
        layouts |= {site.layout for site in select_params(lm.model, spec)}  # a stored field's own layout
    if spec.on_activations:
        select_modules(lm.model, spec)
        layouts.add(layout_of(lm.model.dtype))
    if spec.per_bit and spec.active:
        for layout in layouts:
            resolve_bits(layout, spec.bits)
