"""A fault map is checked, never trusted; save_map= paths are checked before the work."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from lm_eval_faults import inject
from lm_eval_faults.core import FaultMap, FaultMapError

from tiny import tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("maps") / "map.npz"
    with inject(tiny_model(), f"p=1e-3,seed=3,save_map={path}"):
        pass
    return path.read_bytes()


def rewrite(raw: bytes, **changes) -> bytes:
    """The saved map with some arrays replaced (meta given as a Python object)."""
    with np.load(io.BytesIO(raw)) as data:
        arrays = {name: data[name] for name in data.files}
    for name, value in changes.items():
        if name == "meta":
            meta = json.loads(bytes(arrays["meta"]).decode())
            value = value(meta) if callable(value) else value
            arrays["meta"] = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
        elif value is None:
            del arrays[name]
        else:
            arrays[name] = value(arrays) if callable(value) else value
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def flip_byte(raw: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        info = archive.getinfo("index.npy")
    at = info.header_offset + 30 + len(info.filename) + info.compress_size // 2 + 20
    return raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :]


CASES = [
    ("truncated", lambda raw: raw[: len(raw) // 2], "is not a fault map"),
    ("zero bytes", lambda raw: b"", "is not a fault map"),
    ("flipped byte", flip_byte, "is not a fault map"),
    ("meta a list", lambda raw: rewrite(raw, meta=[1]), "meta is list"),
    ("meta null", lambda raw: rewrite(raw, meta=None), "meta is NoneType"),
    ("no params", lambda raw: rewrite(raw, meta=lambda m: {k: v for k, v in m.items() if k != "params"}), "meta.params must be"),
    ("params empty", lambda raw: rewrite(raw, meta=lambda m: {**m, "params": []}), "holds no faults"),
    ("zero rows", lambda raw: rewrite(raw, **{k: (lambda a, k=k: a[k][:0]) for k in ("param", "index", "old", "new")}), "holds no faults"),
    ("missing array", lambda raw: rewrite(raw, old=None), "is not a fault map"),
    (
        "param outside list",
        lambda raw: rewrite(raw, param=lambda a: np.where(np.arange(len(a["param"])) == 0, 99, a["param"])),
        "outside meta.params",
    ),
    ("shorter param", lambda raw: rewrite(raw, param=lambda a: a["param"][:-5]), "differ in length"),
    ("index 1e12", lambda raw: rewrite(raw, index=lambda a: np.where(np.arange(len(a["index"])) == 0, 10**12, a["index"])), "is outside"),
    (
        "duplicate rows",
        lambda raw: rewrite(raw, **{k: (lambda a, k=k: np.concatenate([a[k], a[k][:3]])) for k in ("param", "index", "old", "new")}),
        "repeat a word",
    ),
    (
        "word too wide",
        lambda raw: rewrite(raw, meta=lambda m: {**m, "params": [{**p, "dtype": "float16"} for p in m["params"]]}),
        "wider than",
    ),
    ("change nothing", lambda raw: rewrite(raw, new=lambda a: a["old"]), "change nothing"),
    ("float array", lambda raw: rewrite(raw, index=lambda a: a["index"].astype(np.float64)), "1-D integers"),
]


@pytest.mark.parametrize(("name", "damage", "message"), CASES, ids=[case[0] for case in CASES])
def test_a_damaged_map_is_one_error_naming_the_file(saved, tmp_path, name, damage, message):
    path = tmp_path / "bad.npz"
    path.write_bytes(damage(saved))
    with pytest.raises(FaultMapError, match=message) as caught:
        FaultMap.load(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_missing_and_directory_maps_are_named(tmp_path):
    with pytest.raises(FaultMapError, match="does not exist"):
        FaultMap.load(tmp_path / "nope.npz")
    with pytest.raises(FaultMapError, match="is not a file"):
        FaultMap.load(tmp_path)


def test_a_renamed_npy_is_not_a_map(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(3))
    (tmp_path / "x.npy").rename(tmp_path / "x.npz")
    with pytest.raises(FaultMapError, match="is not a fault map"):
        FaultMap.load(tmp_path / "x.npz")


def words(model: torch.nn.Module) -> list[bytes]:
    return [t.detach().clone().view(-1).view(torch.uint8).numpy().tobytes() for t in model.state_dict().values()]


@pytest.mark.parametrize("target", ["dir", "file_parent"])
def test_an_unwritable_save_map_is_refused_before_injecting_and_leaves_nothing(tmp_path, target):
    model = tiny_model()
    clean = words(model)
    (tmp_path / "afile").write_text("x")
    path = tmp_path if target == "dir" else tmp_path / "afile" / "map.npz"
    with pytest.raises(FaultMapError, match="save_map="):
        inject(model, f"p=1e-3,seed=1,save_map={path}")
    assert words(model) == clean
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_save_that_fails_after_injecting_restores_the_model(tmp_path, monkeypatch):
    model = tiny_model()
    clean = words(model)

    def broken(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(FaultMap, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        inject(model, f"p=1e-3,seed=1,save_map={tmp_path / 'm.npz'}")
    assert words(model) == clean
