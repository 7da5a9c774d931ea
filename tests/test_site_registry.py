"""A new site is one class and one `register_site` call: a toy site, faults on the model's
floating-point buffers, defined here and run end to end through `inject`, the report and
`restore` without editing core."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from lm_eval_faults import inject
from lm_eval_faults.core.faults.counts import count_by_site
from lm_eval_faults.core.faults.host import draw_faults
from lm_eval_faults.core.random.streams import site_key, spec_key
from lm_eval_faults.core.report import ReportPart, SiteStats
from lm_eval_faults.core.sites.registry import SiteKind, registered_site, site_names
from lm_eval_faults.core.spec import FaultSpec, FaultSpecError
from lm_eval_faults.core.storage.layouts import layout_of, resolve_bits
from lm_eval_faults.core.storage.words import WordAccess

from tiny import tiny_model


class _Words(WordAccess):
    def read_at_hits(self, hits) -> np.ndarray:
        return self.read(hits.position)


class BufferInjector:
    """Bit faults in every floating-point buffer (rotary frequencies, say), undone on restore."""

    def __init__(self, model: torch.nn.Module, spec: FaultSpec) -> None:
        self.spec = spec
        self.buffers = [(name, buffer) for name, buffer in model.named_buffers() if buffer.is_floating_point()]
        self.stats: list[SiteStats] = []
        self.undo: list[tuple[_Words, np.ndarray, np.ndarray]] = []

    @classmethod
    def build(cls, model: torch.nn.Module, spec: FaultSpec, replaying: bool) -> BufferInjector:
        return cls(model, spec)

    def attach(self, fault_map, progress: bool) -> None:
        key = spec_key(self.spec.seed, self.spec.sampling_key())
        for name, buffer in self.buffers:
            layout = layout_of(buffer.dtype)
            bits = resolve_bits(layout, self.spec.bits)
            words = _Words(buffer, layout)
            batch = draw_faults(
                np.array([buffer.numel()]),
                np.array([site_key(key, name)], dtype=np.uint64),
                words.read_at_hits,
                self.spec,
                layout,
                bits,
            )
            stats = SiteStats(
                name,
                "buffer",
                None,
                layout.name,
                buffer.numel(),
                buffer.numel() * len(bits),
                buffer.numel() * len(bits) * self.spec.p,
                buffer.numel() * len(bits) * self.spec.p,
                bit_histogram=[0] * layout.width,
            )
            if len(batch):
                self.undo.append((words, batch.hits.position, batch.old))
                words.write(batch.hits.position, batch.new)
            count_by_site(batch, 1, layout).add_to([stats])
            self.stats.append(stats)

    def restore(self) -> None:
        for words, positions, old in reversed(self.undo):
            words.write(positions, old)
        self.undo.clear()

    def part(self) -> ReportPart:
        return ReportPart(self.stats)

    def pause(self):
        return contextlib.nullcontext()

    def next_forward(self, rows) -> None:
        pass


BUFFERS = SiteKind("buffers", BufferInjector.build)


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in model.named_buffers() if buffer.is_floating_point()}


def test_a_toy_site_runs_through_inject_the_report_and_restore():
    model = tiny_model()
    clean_buffers, clean_weights = _buffers(model), {name: p.clone() for name, p in model.named_parameters()}
    assert clean_buffers, "the tiny model has a floating-point buffer to fault"
    with registered_site(BUFFERS):
        assert site_names()[-1] == "buffers"
        with inject(model, p=0.02, site="buffers", seed=3) as faults:
            data = json.loads(json.dumps(faults.report.to_dict()))
            assert data["buffers"]["totals"]["hit_elements"] > 0
            assert data["buffers"]["totals"]["changed_elements"] == sum(
                int((_buffers(model)[name] != clean).sum()) for name, clean in clean_buffers.items()
            )
            assert data["weights"]["totals"]["hit_elements"] == 0  # the original parts stay, empty
            assert "buffers" in faults.report.format_table()
            assert all(torch.equal(p, clean_weights[name]) for name, p in model.named_parameters())
        assert all(torch.equal(_buffers(model)[name], clean) for name, clean in clean_buffers.items())


def test_sites_join_with_plus_in_registration_order():
    with registered_site(BUFFERS):
        assert FaultSpec(site="buffers+weights").site == "weights+buffers"
        assert FaultSpec(site="weights+activations").sites == ("weights", "activations")
    assert FaultSpec(site="activations+weights").site == "weights+activations"  # fingerprints keep the old spelling


def test_an_unregistered_site_is_refused_naming_the_choices():
    with pytest.raises(
        FaultSpecError, match=r"site='buffers' is invalid: choose one of weights, activations, kv_cache, weights\+activations\+kv_cache"
    ):
        FaultSpec(site="buffers")
