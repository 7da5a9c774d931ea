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
from typing import Any

import numpy as np

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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # atomic: every rank may save
        with open(temporary, "wb") as handle:  # a file handle: numpy would otherwise append `.npz`
            np.savez_compressed(
                handle,
                param=self.param.astype(np.int32),
                index=self.index.astype(np.int64),
                old=self.old.astype(np.uint32),
                new=self.new.astype(np.uint32),
                meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            )
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FaultMap:
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                arrays = {name: data[name] for name in ("param", "index", "old", "new")}
        except (OSError, KeyError, ValueError) as error:
            raise FaultMapError(f"{path} is not a fault map ({error})") from None
        if meta.get("format") != FORMAT:
            raise FaultMapError(f"{path} has format {meta.get('format')!r}; this package reads {FORMAT!r}")
        params = tuple(ParamInfo(**info) for info in meta["params"])
        return cls(
            params,
            arrays["param"].astype(np.int64),
            arrays["index"].astype(np.int64),
            arrays["old"].astype(np.int64),
            arrays["new"].astype(np.int64),
            meta.get("spec", {}),
            meta.get("version", ""),
        )
