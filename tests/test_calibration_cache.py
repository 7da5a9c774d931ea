"""The calibration cache can't break a run: bad entries are named and recomputed, an unusable
cache directory fails before the calibration pass, and concurrent saves never collide."""

from __future__ import annotations

import multiprocessing
import warnings
from pathlib import Path

import pytest
import torch
from lm_eval_faults.core.protection.clamping import ActivationBounds
from lm_eval_faults.core.spec import FaultSpecError
from lm_eval_faults.harness.calibration import CACHE_ENV, calibrated_bounds
from torch import nn

KEY = "k" * 32


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def _calibrate(model: nn.Module, calls: list[int]) -> ActivationBounds:
    def run_clean() -> None:
        calls.append(1)
        model(torch.randn(8, 4))

    return calibrated_bounds(model, KEY, run_clean)


def _entry(cache: Path) -> Path:
    return cache / "activation_bounds" / f"{KEY}.json"


BAD_ENTRIES = [
    ("truncated", lambda p: p.write_text('{"0": [-1.0, 2'), "invalid JSON"),
    ("list", lambda p: p.write_text("[1, 2]"), "not an object"),
    ("string", lambda p: p.write_text('"bounds"'), "not an object"),
    ("directory", lambda p: p.mkdir(), "unreadable"),
    ("not utf-8", lambda p: p.write_bytes(b"\xff\xfe\x00"), "unreadable"),
    ("empty object", lambda p: p.write_text("{}"), "no module bounds"),
    ("not a pair", lambda p: p.write_text('{"0": [1.0]}'), "not a \\[low, high\\] pair"),
    ("strings", lambda p: p.write_text('{"0": ["a", "b"]}'), "not a \\[low, high\\] pair"),
    ("nan", lambda p: p.write_text('{"0": [NaN, 1.0]}'), "non-finite"),
    ("infinite", lambda p: p.write_text('{"0": [-Infinity, 1.0]}'), "non-finite"),
    ("inverted", lambda p: p.write_text('{"0": [2.0, -2.0]}'), "inverted"),
    ("zero width", lambda p: p.write_text('{"0": [0.5, 0.5]}'), "zero-width"),
]


@pytest.mark.parametrize(("name", "plant", "why"), BAD_ENTRIES, ids=[case[0] for case in BAD_ENTRIES])
def test_a_bad_entry_is_named_ignored_and_recomputed(tmp_path, monkeypatch, name, plant, why):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    entry = _entry(tmp_path)
    entry.parent.mkdir(parents=True)
    plant(entry)
    calls: list[int] = []
    with pytest.warns(UserWarning, match=rf"{entry}.*{why}"):
        bounds = _calibrate(_model(), calls)
    assert calls == [1] and bounds.bounds
    if entry.is_file():  # replaced by the good bounds: the next run reads them without a warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _calibrate(_model(), calls).bounds == bounds.bounds
        assert calls == [1]


def _file(tmp: Path) -> Path:
    (tmp / "file").write_text("x")
    return tmp / "file"


BAD_DIRS = [
    ("a file", _file),
    ("under a file", lambda tmp: _file(tmp) / "sub"),
    ("under /proc", lambda tmp: Path("/proc/lm_eval_faults_cache")),
]


@pytest.mark.parametrize(("name", "where"), BAD_DIRS, ids=[case[0] for case in BAD_DIRS])
def test_an_unusable_cache_directory_fails_before_the_calibration_pass(tmp_path, monkeypatch, name, where):
    monkeypatch.setenv(CACHE_ENV, str(where(tmp_path)))
    calls: list[int] = []
    with pytest.raises(FaultSpecError, match=rf"^{CACHE_ENV}=.*cannot write the calibration cache"):
        _calibrate(_model(), calls)
    assert calls == []


def test_recorded_zero_width_bounds_are_used_but_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    model = nn.Sequential(nn.Linear(4, 4))
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    with pytest.warns(UserWarning, match="not cached.*zero-width"):
        bounds = _calibrate(model, [])
    assert bounds.bounds == {"0": (0.0, 0.0)}
    assert not _entry(tmp_path).exists()


def _save_many(path: str, worker: int) -> int:
    failures = 0
    for i in range(200):
        try:
            ActivationBounds({"m": (-1.0 - worker, float(i + 1))}).save(path)
        except OSError:
            failures += 1
    return failures


def test_concurrent_saves_never_collide_and_leave_no_temporary_files(tmp_path):
    path = tmp_path / "entry.json"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        failures = pool.starmap(_save_many, [(str(path), worker) for worker in range(4)])
    assert failures == [0, 0, 0, 0]
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json"]
    assert ActivationBounds.load(path).bounds["m"][1] == 200.0
