"""Clean activation bounds for `clamp=activations`, calibrated on the requests being evaluated.

Range restriction needs each module's output range on clean data. `faulty_hf` takes it from the
clean model on the first requests it is asked to score (the task's own data, as Ranger profiles
its inputs), once per model and request set: the bounds are cached on disk, keyed by the model's
identity and the requests, so a sweep or a rerun calibrates only once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lm_eval.api.instance import Instance
from torch import nn

from lm_eval_faults.core.range_restriction import ActivationBounds, record_bounds

CACHE_ENV = "LM_EVAL_FAULTS_CACHE"
"""Where calibrated bounds are kept (default: ~/.cache/lm_eval_faults)."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lm_eval_faults")


def bounds_key(identity: dict[str, Any], request_type: str, requests: list[Instance]) -> str:
    """The cache key of a calibration: the model's identity and the exact requests scored."""
    text = json.dumps([identity, request_type, [list(map(str, request.args)) for request in requests]], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def calibrated_bounds(model: nn.Module, key: str, run_clean: Callable[[], object]) -> ActivationBounds:
    """Bounds from the disk cache, or recorded while `run_clean` scores the requests on the clean model."""
    path = cache_dir() / "activation_bounds" / f"{key}.json"
    if path.exists():
        return ActivationBounds.load(path)
    with record_bounds(model) as bounds:
        run_clean()
    bounds.save(path)
    return bounds


@contextlib.contextmanager
def swapped(obj: object, name: str, value: object) -> Iterator[None]:
    """Temporarily replace an attribute (the calibration pass must not write lm-eval's cache)."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)
