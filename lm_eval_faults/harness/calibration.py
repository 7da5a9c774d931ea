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
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lm_eval.api.instance import Instance
from torch import nn

from lm_eval_faults.core.protection.clamping import ActivationBounds, record_bounds
from lm_eval_faults.core.spec import FaultSpecError

CACHE_ENV = "LM_EVAL_FAULTS_CACHE"
"""Where calibrated bounds are kept (default: ~/.cache/lm_eval_faults)."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lm_eval_faults")


def bounds_dir() -> Path:
    """The cache's directory of bounds, created and checked writable: a cache that cannot be
    written must fail before the calibration pass it would have stored, not after it."""
    directory = cache_dir() / "activation_bounds"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".probe.", dir=directory)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise FaultSpecError(
            f"{CACHE_ENV}={os.environ.get(CACHE_ENV, '')!r}: cannot write the calibration cache {directory} "
            f"({err.strerror or err}); point it at a writable directory"
        ) from None
    return directory


def bounds_key(identity: dict[str, Any], request_type: str, requests: list[Instance]) -> str:
    """The cache key of a calibration: the model's identity and the exact requests scored."""
    text = json.dumps([identity, request_type, [list(map(str, request.args)) for request in requests]], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def calibrated_bounds(model: nn.Module, key: str, run_clean: Callable[[], object]) -> ActivationBounds:
    """Bounds from the disk cache, or recorded while `run_clean` scores the requests on the clean model.

    The cache is a convenience and must never break a run: an entry that cannot be read or holds
    unusable bounds is named in a warning and recomputed (and replaced)."""
    path = bounds_dir() / f"{key}.json"
    if path.exists() or path.is_symlink():
        cached, problem = read_bounds(path)
        if cached is not None:
            return cached
        warnings.warn(f"calibration cache entry {path} is unusable ({problem}); ignoring it and calibrating again", stacklevel=2)
    with record_bounds(model) as bounds:
        run_clean()
    recorded_problem = bounds_problem(bounds.bounds)
    if recorded_problem is not None:
        warnings.warn(f"calibrated bounds not cached ({recorded_problem}): a later run calibrates again", stacklevel=2)
        return bounds
    try:
        bounds.save(path)
    except OSError as err:
        warnings.warn(
            f"could not write the calibration cache entry {path} ({err.strerror or err}); using the bounds uncached", stacklevel=2
        )
    return bounds


def read_bounds(path: Path) -> tuple[ActivationBounds | None, str]:
    """A cache entry's bounds, or None and why not (unreadable, not JSON, wrong shape, bad values)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        return None, f"unreadable: {getattr(err, 'strerror', None) or err}"
    except json.JSONDecodeError as err:
        return None, f"invalid JSON: {err.msg}"
    if not isinstance(data, dict):
        return None, f"a JSON {type(data).__name__}, not an object of module bounds"
    pairs: dict[str, tuple[float, float]] = {}
    for name, pair in data.items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in pair)):
            return None, f"{name!r}: {pair!r} is not a [low, high] pair of numbers"
        pairs[name] = (float(pair[0]), float(pair[1]))
    problem = bounds_problem(pairs)
    return (None, problem) if problem is not None else (ActivationBounds(pairs), "")


def bounds_problem(bounds: dict[str, tuple[float, float]]) -> str | None:
    """Why bounds cannot be used for clamping, or None. NaN bounds make every clamped output NaN,
    inverted ones are meaningless, and a zero-width range pins a module to one value."""
    if not bounds:
        return "no module bounds"
    for name, (low, high) in bounds.items():
        if not (math.isfinite(low) and math.isfinite(high)):
            return f"{name!r}: non-finite bounds [{low}, {high}]"
        if low >= high:
            return f"{name!r}: {'zero-width' if low == high else 'inverted'} bounds [{low}, {high}]"
    return None


@contextlib.contextmanager
def swapped(obj: object, name: str, value: object) -> Iterator[None]:
    """Temporarily replace an attribute (the calibration pass must not write lm-eval's cache)."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)
