"""Fault maps: the exact words one weight injection changed, saved, loaded and replayed.

A map holds one row per changed stored word: which parameter, its flat element index, the word
before and after (so the flipped bits are `old ^ new`). That is O(number of faults), whatever the
model size, and it is everything needed to reproduce the faulted weights bit for bit, on this
model, without the sampler: replaying a map is how a fault can be bisected to its culprits, or
a damaging map shared between teams.

On disk a map is one `.npz` file readable with numpy alone (`np.load(path)`, no pickle):

| array | dtype | one entry per | meaning |
|---|---|---|---|
| `param` | int32 | fault | index into `meta.params` |
| `index` | int64 | fault | flat element index in that parameter |
| `old`, `new` | uint32 | fault | the stored word before and after (the low `width` bits) |
| `meta` | uint8 | - | UTF-8 JSON: `format`, `version`, `spec`, and `params`: a list of {name, dtype, numel} |

Replay refuses a map whose parameters, dtypes or sizes differ from the model's, and a map whose
`old` words differ from what the model holds (another model, or a model already faulted): it
names the first mismatch. Any subset of a map replays too (`FaultMap.subset`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lm_eval_faults.core.files import output_path_problem, write_atomically
from lm_eval_faults.core.storage.layouts import layout_named

FORMAT = "lm-eval-faults/fault-map/1"


class FaultMapError(ValueError):
    """A map that can't be replayed on this model, or a file that is not a fault map."""


@dataclass(frozen=True)
class ParamInfo:
    """A faulted parameter as the map knows it: enough to refuse a map made for another model."""

    name: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class FaultMap:
    """Every changed word of one injection (see the module docstring for the file format)."""

    params: tuple[ParamInfo, ...]
    param: np.ndarray
    index: np.ndarray
    old: np.ndarray
    new: np.ndarray
    spec: dict[str, Any] = field(default_factory=dict)
    version: str = ""

    def __len__(self) -> int:
        return len(self.param)

    @property
    def flipped(self) -> np.ndarray:
        """Bit masks of the flipped bits, one per fault."""
        return self.old ^ self.new

    @classmethod
    def merged(cls, maps: list[FaultMap], spec: dict[str, Any], version: str) -> FaultMap:
        """One map of several injectors' maps (their parameters renumbered in order); none is the empty map."""
        params = tuple(info for fault_map in maps for info in fault_map.params)
        offsets = np.cumsum([0, *(len(fault_map.params) for fault_map in maps)])

        def column(name: str) -> np.ndarray:
            shift = {"param": offsets}.get(name, np.zeros(len(maps), dtype=np.int64))
            parts = [getattr(fault_map, name) + int(add) for fault_map, add in zip(maps, shift, strict=False)]
            return np.concatenate([np.empty(0, dtype=np.int64), *parts]).astype(np.int64)

        return cls(params, column("param"), column("index"), column("old"), column("new"), spec, version)

    def subset(self, faults: np.ndarray | list[int]) -> FaultMap:
        """The map restricted to faults at positions `faults` (indices or a boolean mask)."""
        keep = np.asarray(faults)
        return FaultMap(self.params, self.param[keep], self.index[keep], self.old[keep], self.new[keep], self.spec, self.version)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per fault: parameter name, index, old and new word, flipped bit positions."""
        return [
            {
                "param": self.params[p].name,
                "index": int(i),
                "old": int(o),
                "new": int(n),
                "bits": [b for b in range(32) if (int(o) ^ int(n)) >> b & 1],
            }
            for p, i, o, n in zip(self.param, self.index, self.old, self.new, strict=True)
        ]

    def save(self, path: str | Path) -> Path:
        """Write the map as one `.npz` (numpy only, no pickle); returns the path written."""
        meta = {
            "format": FORMAT,
            "version": self.version,
            "spec": self.spec,
            "params": [vars(info) for info in self.params],
        }
        check_writable(path)

        def write(handle: BinaryIO) -> None:  # a file handle: numpy would otherwise append `.npz`
            np.savez_compressed(
                handle,
                param=self.param.astype(np.int32),
                index=self.index.astype(np.int64),
                old=self.old.astype(np.uint32),
                new=self.new.astype(np.uint32),
                meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            )

        return write_atomically(path, write)  # every rank may save

    def check(self, source: object = "fault map") -> None:
        """Refuse an inconsistent map in one line naming `source`: replaying one would drop,
        truncate or double-count rows silently (a row outside `params`, arrays of unequal length,
        a row given twice, a word that changes nothing or has bits beyond its dtype's width)."""
        count = len(self.param)
        lengths = {name: len(getattr(self, name)) for name in ("param", "index", "old", "new")}
        if len(set(lengths.values())) > 1:
            raise FaultMapError(f"{source}: its arrays differ in length ({_listing(lengths)}); each needs one entry per fault")
        if not self.params or not count:
            raise FaultMapError(f"{source}: the map holds no faults ({len(self.params)} parameters, {count} rows): nothing to replay")
        names = [info.name for info in self.params]
        if len(set(names)) < len(names):
            raise FaultMapError(f"{source}: a parameter is listed twice in meta.params")
        widths = []
        for info in self.params:
            layout = layout_named(info.dtype)
            if layout is None or not isinstance(info.numel, int) or info.numel < 1:
                raise FaultMapError(f"{source}: meta.params entry {vars(info)} needs a known dtype and a positive numel")
            widths.append(layout.width)
        param = self.param
        if param.min() < 0 or param.max() >= len(self.params):
            bad = int(param[(param < 0) | (param >= len(self.params))][0])
            raise FaultMapError(f"{source}: row parameter number {bad} is outside meta.params (0-{len(self.params) - 1})")
        numels = np.array([info.numel for info in self.params], dtype=np.int64)[param]
        outside = np.flatnonzero((self.index < 0) | (self.index >= numels))
        if len(outside):
            row = outside[0]
            raise FaultMapError(f"{source}: index {int(self.index[row])} is outside {names[param[row]]} ({numels[row]} elements)")
        limits = np.array([1 << width for width in widths], dtype=np.int64)[param]
        wide = np.flatnonzero((self.old < 0) | (self.new < 0) | (self.old >= limits) | (self.new >= limits))
        if len(wide):
            row = wide[0]
            raise FaultMapError(f"{source}: row {row} has a word wider than {names[param[row]]}'s {widths[param[row]]} bits")
        keys = param.astype(np.int64) * (int(numels.max()) + 1) + self.index
        if len(np.unique(keys)) < count:
            raise FaultMapError(f"{source}: {count - len(np.unique(keys))} rows repeat a word another row already faults")

    @classmethod
    def load(cls, path: str | Path) -> FaultMap:
        """Read and check a map file: anything but a consistent, non-empty map is one FaultMapError
        naming the file (numpy and zipfile raise half a dozen exception types for damaged files)."""
        if not os.path.exists(path):
            raise FaultMapError(f"fault map {path} does not exist")
        if not os.path.isfile(path):
            raise FaultMapError(f"fault map {path} is not a file")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                arrays = {name: data[name] for name in ("param", "index", "old", "new")}
        except Exception as error:  # BadZipFile, EOFError, bad CRC, a missing array, not JSON...
            raise FaultMapError(f"{path} is not a fault map ({type(error).__name__}: {error})") from None
        if not isinstance(meta, dict):
            raise FaultMapError(f"{path} is not a fault map (its meta is {type(meta).__name__}, not an object)")
        if meta.get("format") != FORMAT:
            raise FaultMapError(f"{path} has format {meta.get('format')!r}; this package reads {FORMAT!r}")
        infos = meta.get("params")
        if not isinstance(infos, list) or not all(isinstance(info, dict) and set(info) == {"name", "dtype", "numel"} for info in infos):
            raise FaultMapError(f"{path}: meta.params must be a list of {{name, dtype, numel}}")
        for name, array in arrays.items():
            if array.ndim != 1 or array.dtype.kind not in "iu":
                raise FaultMapError(f"{path}: array {name!r} is {array.dtype} of shape {array.shape}; it must be 1-D integers")
        fault_map = cls(
            tuple(ParamInfo(**info) for info in infos),
            arrays["param"].astype(np.int64),
            arrays["index"].astype(np.int64),
            arrays["old"].astype(np.int64),
            arrays["new"].astype(np.int64),
            meta.get("spec", {}),
            meta.get("version", ""),
        )
        fault_map.check(path)
        same = np.flatnonzero(fault_map.old == fault_map.new)  # a saved map logs only changed words
        if len(same):
            raise FaultMapError(f"{path}: {len(same)} rows change nothing (old == new), e.g. row {same[0]}")
        return fault_map


def check_writable(path: str | Path, key: str = "save_map") -> None:
    """Refuse an output path that can't be written, before the work it would record."""
    problem = output_path_problem(path)
    if problem is not None:
        raise FaultMapError(f"{key}={path} can't be written: {problem}")


def _listing(values: dict[str, int]) -> str:
    return ", ".join(f"{name} {value}" for name, value in values.items())
