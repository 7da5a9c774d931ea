"""Storage as a sweep axis: one standard sweep per storage format, then one table and figure.

    lm-eval-faults sweep --model_args pretrained=... --tasks faults_facts --p 1e-9:1e-2 \\
        --storages "none;int8;int4,group_size=32;q4_1" --run_dir runs/storages

Why a sweep per storage rather than a grid column: a storage's baseline is that storage at p=0
(its own clean score, its quantization error included), and every metric of a sweep -- relative
change, thresholds, drift -- is measured against its one baseline. So each storage gets a normal
run directory, `RUN_DIR/<storage>/`, which resumes, reports and runs on Ray like any other, and
this module compares them: `RUN_DIR/storages.md` (table), `storages.png` (figure) and
`storages.json` (the curves). The float model (`none`) is always one of them, so its score
stands beside each storage's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lm_eval_faults.core.spec import FaultSpec, FaultSpecError, parse_arg_string
from lm_eval_faults.study.grid import SweepConfig, SweepConfigError, preflight_sweep
from lm_eval_faults.study.storage_table import StorageCurve, curve_of, write_comparison

if TYPE_CHECKING:
    from lm_eval_faults.study.ray_pool import RayOptions

STORAGE_KEYS = ("storage", "group_size")
"""What one `--storages` item may set; every other fault key is `--fault_args`, shared by all."""
FLOAT_MODEL = "none"


@dataclass(frozen=True)
class StorageItem:
    """One storage of the axis: its label in tables, its fault keys, its run directory's name."""

    label: str
    fault_args: str
    slug: str


def storage_item(text: str) -> StorageItem:
    """`int8`, `int4,group_size=32` or `storage=int4,group_size=32` -> its StorageItem (checked on a spec)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if parts and "=" not in parts[0]:
        parts[0] = f"storage={parts[0]}"
    try:
        args = parse_arg_string(",".join(parts))
    except FaultSpecError as err:
        raise SweepConfigError(f"--storages item {text!r}: {err}") from None
    wrong = [key for key in args if key not in STORAGE_KEYS]
    if wrong or "storage" not in args:
        raise SweepConfigError(
            f"--storages item {text!r}: each item is a storage name (none, int8, int4, q4_1, ...) with, for int4, "
            f"group_size=N; {', '.join(wrong) or 'no storage'} given (keys shared by every storage go in --fault_args)"
        )
    try:
        spec = FaultSpec(storage=args["storage"], group_size=args.get("group_size", 128))
    except FaultSpecError as err:
        raise SweepConfigError(f"--storages item {text!r}: {err}") from None
    if spec.storage == FLOAT_MODEL:
        return StorageItem("float (the model's own)", "", FLOAT_MODEL)
    if spec.storage == "int4":
        return StorageItem(f"int4 (groups of {spec.group_size})", f"storage=int4,group_size={spec.group_size}", f"int4_g{spec.group_size}")
    return StorageItem(spec.storage, f"storage={spec.storage}", spec.storage)


def parse_storages(value: str) -> tuple[StorageItem, ...]:
    """The `--storages` axis, items separated by `;`; the float model is put first when not listed."""
    items = [storage_item(text) for text in value.split(";") if text.strip()]
    if not items:
        raise SweepConfigError("--storages is empty; name storages separated by ';' (none;int8;int4,group_size=32;q4_1)")
    slugs = [item.slug for item in items]
    twice = sorted({slug for slug in slugs if slugs.count(slug) > 1})
    if twice:
        raise SweepConfigError(f"--storages lists {', '.join(twice)} twice")
    if FLOAT_MODEL not in slugs:
        items.insert(0, storage_item(FLOAT_MODEL))
    return tuple(items)


def storage_configs(config: SweepConfig, items: tuple[StorageItem, ...]) -> list[tuple[StorageItem, SweepConfig]]:
    """Each storage's sweep: `config` with the storage's keys added to its `--fault_args`."""
    shared = parse_arg_string(config.fault_args)
    clash = [key for key in shared if key in STORAGE_KEYS]
    if clash:
        raise SweepConfigError(f"--fault_args sets {', '.join(clash)} while --storages varies it; use one or the other")
    axes = {"--faults": config.faults, "--sites": config.sites, "--targets": config.targets, "--layers": config.layers}
    several = [option for option, values in axes.items() if len(values) > 1] + (["--protections"] if len(config.protections) > 1 else [])
    if several:
        raise SweepConfigError(
            f"--storages compares one curve (score against p) per storage; {', '.join(several)} would mix several curves "
            "in each: give them one value each, or run the storages' sweeps one by one"
        )
    return [(item, replace(config, fault_args=",".join(part for part in (config.fault_args, item.fault_args) if part))) for item in items]


def run_storage_sweeps(
    run_dir: str | Path,
    config: SweepConfig,
    storages: str,
    *,
    ray: RayOptions | None = None,
    report: bool = True,
    progress: bool = True,
) -> list[StorageCurve]:
    """Run (or resume) one sweep per storage under `run_dir`, then write the comparison there.

    Every storage's sweep is checked before the first runs (a typo in the last item must not
    surface after hours). In one process the model is loaded once and shared: each sweep leaves
    it clean, and a storage's encoding is kept with each weight, so it is not encoded again."""
    from lm_eval_faults.study.evaluation import load_clean_model
    from lm_eval_faults.study.run_dir import CONFIG_FILE
    from lm_eval_faults.study.runner import run_sweep

    root = Path(run_dir)
    if (root / CONFIG_FILE).exists():
        raise SweepConfigError(f"{root} is a single sweep's run directory; give --storages a directory of its own")
    sweeps = storage_configs(config, parse_storages(storages))
    for item, sub_config in sweeps:
        try:
            preflight_sweep(sub_config)
        except SweepConfigError as err:
            raise SweepConfigError(f"--storages item {item.slug}: {err}") from None
    lm = None if ray is not None else load_clean_model(config)
    float_bits = _run_dtype_bits(config) if lm is None else lm.model.dtype.itemsize * 8
    curves = []
    for item, sub_config in sweeps:
        print(f"lm-eval-faults sweep: storage {item.label} in {root / item.slug}", file=sys.stderr)
        run_sweep(root / item.slug, sub_config, lm=lm, ray=ray, report=report, progress=progress)
        curves.append(curve_of(item.label, root / item.slug, float_bits))
    write_comparison(root, curves, title=f"{', '.join(config.tasks)}; p per stored bit")
    return curves


def _run_dtype_bits(config: SweepConfig) -> int:
    """The width of the dtype the float model runs in, as the harness will resolve it (for Ray,
    whose actors hold the model)."""
    from lm_eval_faults.harness.package_data import demo_model_dir
    from lm_eval_faults.harness.preflight import read_config, run_dtype

    model_args = {"pretrained": str(demo_model_dir()), **config.hf_args()}
    return run_dtype(read_config(model_args), model_args).itemsize * 8
