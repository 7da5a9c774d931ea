"""Persistent faults on parameters, with an undo log so that restoring is exact and O(k).

The undo log holds only the touched words (positions and original bits), so a sweep can inject,
evaluate and restore thousands of times on one loaded model without ever reloading weights and
without keeping a copy of the model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lm_eval_faults.core.fault_map import FaultMap, FaultMapError, ParamInfo
from lm_eval_faults.core.faults.counts import count_by_site, expected_counts
from lm_eval_faults.core.faults.device import device_path_wanted, fault_tensors
from lm_eval_faults.core.faults.host import FaultBatch, draw_faults
from lm_eval_faults.core.protection.schemes import WeightProtection, protection_bits
from lm_eval_faults.core.random.streams import site_key, spec_key
from lm_eval_faults.core.report import ReportPart, SiteStats
from lm_eval_faults.core.sampling.host import Hits
from lm_eval_faults.core.sites.registry import SiteKind, register_site
from lm_eval_faults.core.sites.targets import ParamSite, all_param_sites, encoded_sites, select_params
from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.core.storage.codecs import Encoding
from lm_eval_faults.core.storage.layouts import BitLayout, resolve_bits
from lm_eval_faults.core.storage.words import WordAccess


@dataclass(frozen=True)
class UndoEntry:
    """The words one injection changed in one tensor: before (to restore) and after (for its map)."""

    site: int
    words: WordAccess
    positions: np.ndarray
    original: np.ndarray
    new: np.ndarray


MAX_BATCH_HITS = 1 << 20
"""Expected hits per batch of sites drawn together: bounds temporary memory at large p, while at
small p every site of the model goes into one vectorised draw."""


class WeightInjector:
    """Injects one spec's faults into a list of parameter sites, and undoes them (the `weights`
    site's `Injector`)."""

    def __init__(self, spec: FaultSpec, sites: list[ParamSite]) -> None:
        self.spec = spec
        self.sites = sites
        self.selected = sites
        """What the spec selected; all of it is faulted (backed-up weights are masked per word)."""
        self.stats: list[SiteStats] = []
        self._spec_key = spec_key(spec.seed, spec.sampling_key())
        self._protection = WeightProtection(spec, self._spec_key) if spec.protected else None
        self._undo: list[UndoEntry] = []
        self._installed: list[Encoding] = []

    @classmethod
    def build(cls, model: torch.nn.Module, spec: FaultSpec, replaying: bool) -> WeightInjector:
        """The injector of `spec`'s parameters; a replay may name any parameter of the model (its
        map, not the selectors, says which)."""
        return cls(spec, all_param_sites(model) if replaying else select_params(model, spec))

    def attach(self, fault_map: FaultMap | None, progress: bool = False) -> None:
        """Write the faults: the map's words when replaying, else freshly drawn ones."""
        self.stats = self.apply_map(fault_map) if fault_map is not None else self.apply(progress=progress)

    def part(self) -> ReportPart:
        """The report of what `attach` did; a storage summary is taken now, while the faults are
        in (it reads the faulted weights, which `restore` gives back)."""
        if not self._installed:
            return ReportPart(self.stats)
        summary = self._storage_summary()
        return ReportPart(self.stats, storage=lambda: summary)

    def _storage_summary(self) -> dict[str, dict[str, Any]]:
        """Per component, the stored form of its weights, and per stored field what its faults
        did (see `ReportPart.storage`)."""
        by_component: dict[str, dict[int, Encoding]] = {}
        fields: dict[str, dict[str, list[tuple[ParamSite, SiteStats]]]] = {}
        counted = {stats.name: stats for stats in self.stats}  # a replay counts only the tensors its map names
        for site in self.sites:
            if site.encoding is not None:
                stats = counted.get(site.name) or self._site_stats(site)
                by_component.setdefault(site.component, {})[id(site.encoding)] = site.encoding
                fields.setdefault(site.component, {}).setdefault(site.field_name, []).append((site, stats))
        rows: dict[str, dict[str, Any]] = {}
        for name, chosen in sorted(by_component.items()):
            encodings = list(chosen.values())
            weights, stored = sum(e.weight.numel() for e in encodings), sum(e.stored_bits() for e in encodings)
            norm = sum(e.original_norm for e in encodings)
            largest, created = _damage(encodings, None)
            hit = sum(stats.fault_bits for members in fields[name].values() for _, stats in members)
            rows[name] = {
                "storage": self.spec.storage,
                "weights": weights,
                "stored_bits": stored,
                "bits_per_weight": stored / weights,
                "faults_per_weight": hit / weights,
                "weights_affected": sum(e.weights_affected() for e in encodings),
                "largest_relative_change": largest,
                "nonfinite_created": created,
                "clean_relative_rms": (sum(e.clean_error for e in encodings) / norm) ** 0.5 if norm else 0.0,
                "fields": {field: _field_row(members) for field, members in fields[name].items()},
            }
        return rows

    def pause(self) -> contextlib.AbstractContextManager[None]:
        """Weight faults stay while activation faults pause: they are the model's stored state."""
        return contextlib.nullcontext()

    def next_forward(self, rows: Any) -> None:
        """Nothing to do per forward call: the faults are already in the weights."""

    def apply(self, progress: bool = False) -> list[SiteStats]:
        """Fault every site once; returns per-site counts. Calling twice without restore is an error.

        Exception-safe: if any tensor can't be read or written, every word already written is
        restored before the error propagates, so a failed injection leaves the model clean.
        """
        if self._undo:
            raise RuntimeError("faults are already applied; call restore() first")
        stats = [self._site_stats(site) for site in self.sites]
        try:
            self._install()
            with (
                torch.no_grad(),
                tqdm(total=len(self.sites), desc="injecting faults", unit="tensor", disable=not progress or not self.sites) as bar,
            ):
                for batch in self._batches(stats):
                    self._fault_batch(batch, stats)
                    bar.update(len(batch))
        except BaseException:
            self.restore()
            raise
        return stats

    def _site_stats(self, site: ParamSite) -> SiteStats:
        layout = site.layout
        eligible = self._eligible(layout)
        numel = site.param.numel()
        expected_elements, expected_bits = expected_counts(self.spec, numel, eligible, layout.width)
        return SiteStats(
            name=site.name,
            component=site.component,
            layer=site.layer,
            dtype=layout.name,
            elements=numel,
            eligible_bits=numel * len(eligible),
            expected_elements=expected_elements,
            expected_bits=expected_bits,
            bit_histogram=[0] * layout.width,
            shared_with=list(site.names[1:]),
            stored_bits=numel * layout.width,
            protection_bits=protection_bits(self.spec, site, layout) if self.spec.protected else 0,
        )

    def _eligible(self, layout: BitLayout) -> tuple[int, ...]:
        return resolve_bits(layout, self.spec.bits) if self.spec.per_bit else layout.all_bits

    def _batches(self, stats: list[SiteStats]) -> list[list[int]]:
        """Site indices in batches of one dtype and at most MAX_BATCH_HITS expected hits (or one site)."""
        batches: list[list[int]] = []
        for dtype in dict.fromkeys(s.dtype for s in stats):
            current: list[int] = []
            expected = 0.0
            for index, site_stats in enumerate(stats):
                if site_stats.dtype != dtype:
                    continue
                if current and expected + site_stats.expected_elements > MAX_BATCH_HITS:
                    batches.append(current)
                    current, expected = [], 0.0
                current.append(index)
                expected += site_stats.expected_elements
            batches.append(current)
        return batches

    def _fault_batch(self, members: list[int], stats: list[SiteStats]) -> None:
        """Draw and apply the faults of sites `members` (one dtype) in one vectorised pass."""
        sites = [self.sites[i] for i in members]
        layout = sites[0].layout
        keys = np.array([site_key(self._spec_key, site.name) for site in sites], dtype=np.uint64)
        numels = np.array([stats[i].elements for i in members], dtype=np.int64)
        access: dict[int, WordAccess] = {}

        def words_of(site: int) -> WordAccess:
            if site not in access:
                access[site] = WordAccess(sites[site].param, layout)
            return access[site]

        def read_words(hits: Hits) -> np.ndarray:
            old = np.empty(len(hits), dtype=np.int64)
            for site, where in hits.by_site():
                old[where] = words_of(site).read(hits.position[where])
            return old

        tensors = [site.param for site in sites]
        # Protection rewrites batches on the host, and patterns are drawn there (O(events) either way).
        wanted = self._protection is None and self.spec.pattern_shape is None and device_path_wanted(tensors)
        on_device = fault_tensors(numels, keys, tensors, self.spec, layout, self._eligible(layout)) if wanted else None
        batch = draw_faults(numels, keys, read_words, self.spec, layout, self._eligible(layout)) if on_device is None else on_device.batch
        read = batch
        if self._protection is not None:
            protected = self._protection.apply(batch, sites, layout, words_of)
            read = protected.batch
            for name, column in protected.counts.items():
                for site, count in zip(members, column.tolist(), strict=True):
                    setattr(stats[site], name, getattr(stats[site], name) + count)
        if not len(batch) and not len(read):
            return
        changed = read.only_changed()
        for site, where in changed.hits.by_site():
            positions = changed.hits.position[where]
            self._undo.append(
                UndoEntry(members[site], words_of(site), positions, changed.old[where], changed.new[where])
            )  # logged before written
            if on_device is None:
                access[site].write(positions, changed.new[where])
        if on_device is not None:
            on_device.write()
        for site, where in changed.hits.by_site():
            encoding = sites[site].encoding
            if encoding is not None:  # simulated storage: decode the changed blocks into the weight
                encoding.refresh(sites[site].field_name, changed.hits.position[where])
        count_by_site(batch, len(members), layout, read=read).add_to([stats[i] for i in members])

    def fault_map(self, spec: dict[str, Any], version: str) -> FaultMap:
        """The changed words of this injection, as a map that replays them exactly."""
        used = sorted({entry.site for entry in self._undo})
        number = {site: n for n, site in enumerate(used)}
        params = tuple(ParamInfo(self.sites[site].name, self.sites[site].layout.name, self.sites[site].param.numel()) for site in used)
        entries = sorted(self._undo, key=lambda entry: entry.site)
        return FaultMap(
            params,
            _concatenate([np.full(len(e.positions), number[e.site], dtype=np.int64) for e in entries]),
            _concatenate([e.positions for e in entries]),
            _concatenate([e.original for e in entries]),
            _concatenate([e.new for e in entries]),
            spec,
            version,
        )

    def apply_map(self, fault_map: FaultMap) -> list[SiteStats]:
        """Write a saved map's new words instead of sampling. Every parameter, dtype, size and old
        word is checked before anything is written, so a foreign or stale map changes nothing."""
        if self._undo:
            raise RuntimeError("faults are already applied; call restore() first")
        self.sites = self.sites + self._stored_fields(fault_map)
        by_name = {name: index for index, site in enumerate(self.sites) for name in site.names}
        plan = []
        for number, info in enumerate(fault_map.params):
            if info.name not in by_name:
                raise FaultMapError(f"fault map parameter {info.name!r} is not a parameter of this model")
            site = by_name[info.name]
            param = self.sites[site].param
            layout = self.sites[site].layout
            if (layout.name, param.numel()) != (info.dtype, info.numel):
                raise FaultMapError(
                    f"fault map parameter {info.name!r} is {info.dtype} x {info.numel}; this model has {layout.name} x {param.numel()}"
                )
            rows = np.flatnonzero(fault_map.param == number)
            access = WordAccess(param, layout)
            held = access.read(fault_map.index[rows])
            stale = np.flatnonzero(held != fault_map.old[rows])
            if len(stale):
                first = rows[stale[0]]
                raise FaultMapError(
                    f"fault map does not match this model: {info.name}[{int(fault_map.index[first])}] holds "
                    f"{int(held[stale[0]]):#x}, the map expects {int(fault_map.old[first]):#x} ({len(stale)} of {len(rows)} words differ)"
                )
            plan.append((site, layout, access, rows))
        stats = []
        self._install()
        with torch.no_grad():
            for site, layout, access, rows in plan:
                positions, old, new = fault_map.index[rows], fault_map.old[rows], fault_map.new[rows]
                self._undo.append(UndoEntry(site, access, positions, old, new))
                access.write(positions, new)
                encoding = self.sites[site].encoding
                if encoding is not None:
                    encoding.refresh(self.sites[site].field_name, positions)
                site_stats = self._site_stats(self.sites[site])
                site_stats.expected_elements = float(len(rows))  # a replay is deterministic: it expects what it holds
                site_stats.expected_bits = float(np.bitwise_count(old ^ new).sum())
                hits = Hits(np.zeros(len(rows), dtype=np.int64), positions, np.arange(len(rows), dtype=np.int64))
                count_by_site(FaultBatch(hits, old ^ new, old, new), 1, layout).add_to([site_stats])
                stats.append(site_stats)
        return stats

    def _stored_fields(self, fault_map: FaultMap) -> list[ParamSite]:
        """With a map saved under `storage=`, the stored fields its rows name ("<weight>.<field>"),
        encoded as the map's spec says: only the weights the map touches are encoded."""
        storage = str(fault_map.spec.get("storage", "none"))
        if storage == "none":
            return []
        spec = FaultSpec(storage=storage, group_size=int(fault_map.spec.get("group_size", 128)))
        plain = {name: site for site in self.sites for name in site.names}
        wanted = {info.name.rpartition(".")[0] for info in fault_map.params}
        missing = sorted(name for name in wanted if name not in plain)
        if missing:
            raise FaultMapError(f"fault map parameter {missing[0]!r} (stored as {storage}) is not a weight of this model")
        chosen = {id(plain[name]): plain[name] for name in wanted}.values()
        return [field for site in chosen for field in encoded_sites(site, spec)]

    def restore(self) -> None:
        """Write the original words back: the model is bit-identical to before `apply` (a simulated
        storage's fields hold its clean form again, and the weights their float values)."""
        for entry in reversed(self._undo):
            entry.words.write(entry.positions, entry.original)
        self._undo.clear()
        for encoding in self._installed:
            encoding.uninstall()
        self._installed = []

    def _install(self) -> None:
        """With `storage=`, the model computes with the decoded stored form from here on."""
        self._installed = list({id(site.encoding): site.encoding for site in self.sites if site.encoding is not None}.values())
        for encoding in self._installed:
            encoding.install()


def _damage(encodings: list[Encoding], field: str | None) -> tuple[float, int]:
    """The largest relative weight change and the non-finite weights created, over encodings."""
    damage = [encoding.damage(field) for encoding in encodings]
    return max((largest for largest, _ in damage), default=0.0), sum(created for _, created in damage)


def _field_row(members: list[tuple[ParamSite, SiteStats]]) -> dict[str, Any]:
    """One stored field of one component: its bits, faults, changed words, and the weights they moved."""
    encodings = list({id(site.encoding): site.encoding for site, _ in members if site.encoding is not None}.values())
    field = members[0][0].field_name
    largest, created = _damage(encodings, field)
    return {
        "layout": members[0][0].layout.name,
        "eligible_bits": sum(stats.eligible_bits for _, stats in members),
        "bits_hit": sum(stats.fault_bits for _, stats in members),
        "words_changed": sum(stats.changed_elements for _, stats in members),
        "weights_affected": sum(encoding.weights_affected(field) for encoding in encodings),
        "largest_relative_change": largest,
        "nonfinite_created": created,
    }


def _concatenate(parts: list[np.ndarray]) -> np.ndarray:
    """One int64 column from per-tensor parts (empty when no word changed)."""
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)


register_site(SiteKind("weights", WeightInjector.build, always_reported=True))
