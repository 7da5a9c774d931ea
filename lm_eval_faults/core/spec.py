"""`FaultSpec`: the validated description of which faults to inject, parsed from `model_args`.

lm-eval hands `model_args` over as a flat dict of strings, ints and floats; lists inside a value
are joined with `+` because lm-eval splits on commas. Every error names the key, the value it
got and what would have been valid, and is raised before any model is loaded.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from lm_eval_faults.core.faults.kinds import FAULT_KIND_TABLE, FaultKind
from lm_eval_faults.core.patterns import IID, Pattern, PatternError, parse_pattern
from lm_eval_faults.core.patterns.fit import fit_to_probability
from lm_eval_faults.core.protection.codes import ECC_CODES
from lm_eval_faults.core.sites.registry import parse_sites, site_names
from lm_eval_faults.core.storage.codecs import FILE, codec, codec_fields, codec_names
from lm_eval_faults.core.storage.layouts import resolve_bits

FAULT_KINDS = {name: kind.description for name, kind in FAULT_KIND_TABLE.items()}
BIT_FAULTS = tuple(name for name, kind in FAULT_KIND_TABLE.items() if kind.per_bit)
COMPONENTS = ("embedding", "attention", "mlp", "norm", "lm_head", "lora", "other")
TARGET_ALIASES = {
    "feed_forward": "mlp",
    "ffn": "mlp",
    "normalization": "norm",
    "embed": "embedding",
    "head": "lm_head",
}
ACT_SCOPES = ("leaf", "all")
ECC_SCHEMES = {"none": "no error-correcting code", **{name: code.description for name, code in ECC_CODES.items()}}
ECC_POLICIES = ("zero", "keep")
"""What a SECDED word that is detected but uncorrectable reads as: all zeros, or its corrupted data."""
CLAMP_SITES = ("none", "weights", "activations", "weights+activations")
KV_FAULTS = {
    "write": "each key/value entry is faulted once, as it is written; later steps read it corrupted",
    "retention": "as write, and every stored bit is also hit at rate p per decoding step while it stays cached",
}
KV_PARTS = ("both", "keys", "values")


class FaultSpecError(ValueError):
    """A fault key of `model_args` has a bad value, or is a typo of one."""


def _error(key: str, value: Any, valid: str) -> FaultSpecError:
    return FaultSpecError(f"model_args {key}={value!r} is invalid: {valid}")


MAX_LAYER_INDEX = 100_000
"""No model has this many decoder layers; a larger index is a typo, not a request for a huge set."""

MAX_INTERLEAVE = 64
"""Bit-interleaved SECDED spreads a burst of up to `interleave` bits over that many codewords;
64 deep already spreads a 64-bit burst."""

MAX_BIT_POSITION = 31
"""The widest supported word is 32 bits (float32)."""


def _probability(key: str, value: Any) -> float:
    if isinstance(value, bool):  # lm-eval turns "true" into True, and float(True) is 1.0
        raise _error(key, value, "expected a probability, a number in [0, 1] such as 1e-5")
    try:
        prob = float(value)
    except (TypeError, ValueError):
        raise _error(key, value, "expected a probability, a number in [0, 1] such as 1e-5") from None
    if not 0.0 <= prob <= 1.0 or math.isnan(prob):
        raise _error(key, value, "a probability must lie in [0, 1]")
    if prob == 0.0 and re.search(r"[1-9]", str(value).lower().partition("e")[0]):
        raise _error(key, value, "underflows to 0 in float64 (smallest positive: 5e-324); write 0 for a clean run")
    return prob


def _integer(key: str, value: Any) -> int:
    """An integer, given as one: `1.5`, `true` and `1e3` are refused, not rounded."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise _error(key, value, "expected an integer")
    if isinstance(value, float):
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise _error(key, value, "expected an integer") from None


def site_choices() -> str:
    """The registered sites, and all of them joined: `weights, activations, weights+activations`."""
    names = site_names()
    return ", ".join((*names, "+".join(names)) if len(names) > 1 else names)


def parse_layers(value: Any) -> tuple[int, ...] | None:
    """`"0-3"`, `"28-31+0"`, `5` or `"all"` -> sorted layer indices (None means every layer)."""
    if value is None or str(value).strip().lower() in ("", "all"):
        return None
    indices: set[int] = set()
    for part in str(value).split("+"):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise _error("layers", value, "use layer indices and ranges joined by '+', e.g. 0-3 or 28-31+0")
        first, last = int(match[1]), int(match[2] or match[1])
        if last > MAX_LAYER_INDEX:
            raise _error("layers", value, f"layer indices above {MAX_LAYER_INDEX} are not a model's layers")
        if last < first:
            raise _error("layers", value, f"range {part!r} runs backwards; write {last}-{first}")
        indices.update(range(first, last + 1))
    return tuple(sorted(indices))


def parse_targets(value: Any, key: str = "target") -> tuple[str, ...]:
    """`"attention+mlp"` -> ("attention", "mlp"); "all" stays ("all",)."""
    names = [TARGET_ALIASES.get(n.strip().lower(), n.strip().lower()) for n in str(value).split("+")]
    if "all" in names:
        return ("all",)
    for name in names:
        if name not in COMPONENTS:
            raise _error(key, value, f"components are all, {', '.join(COMPONENTS)} (join several with '+')")
    return tuple(sorted(set(names)))


def parse_value_range(value: Any) -> tuple[float, float]:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        low, high = value
    else:
        low, sep, high = str(value).partition(":")
        if not sep:
            raise _error("value_range", value, "write low:high, e.g. 0:1 or -1:1")
    try:
        low, high = float(low), float(high)
    except ValueError:
        raise _error("value_range", value, "write low:high with two numbers, e.g. 0:1") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise _error("value_range", value, "need finite low < high")
    return (low, high)


@dataclass(frozen=True)
class FaultSpec:
    """What to corrupt, where, and how often. See the README's vocabulary table.

    `p` is per *bit* for bit faults (bitflip, stuck0, stuck1) and per *element* for element
    faults (value, zero). The fault map drawn from a spec is a pure function of
    (`seed`, parameter or module name, `sampling_key()`), so narrowing `target` or `layers`
    never changes the faults that land on the parameters still selected.
    """

    p: float = 0.0
    fault: str = "bitflip"
    p01: float | None = None
    p10: float | None = None
    site: str = "weights"
    target: tuple[str, ...] = ("all",)
    layers: tuple[int, ...] | None = None
    modules: str | None = None
    bits: str = "all"
    value_range: tuple[float, float] = (0.0, 1.0)
    seed: int = 0
    act_scope: str = "leaf"
    replay: str | None = None
    save_map: str | None = None
    protect: tuple[str, ...] = ()
    protect_bits: str = "none"
    ecc: str = "none"
    ecc_policy: str = "zero"
    clamp: str = "none"
    storage: str = "none"
    group_size: int = 128
    fields: tuple[str, ...] = ()
    protect_fields: tuple[str, ...] = ()
    kv_fault: str = "write"
    kv_layers: tuple[int, ...] | None = None
    kv_part: str = "both"
    pattern: str = IID
    p_sa0: float | None = None
    p_sa1: float | None = None
    fit: float | None = None
    hours: float | None = None
    interleave: int = 1

    def __post_init__(self) -> None:
        def set_(name: str, value: object) -> None:
            object.__setattr__(self, name, value)  # the dataclass is frozen

        set_("p", _probability("p", self.p))
        self._validate_rate_units()
        if self.fault not in FAULT_KINDS:
            raise _error("fault", self.fault, "choose one of " + ", ".join(FAULT_KINDS))
        for key in ("p01", "p10"):
            if getattr(self, key) is not None:
                set_(key, _probability(key, getattr(self, key)))
        if self.asymmetric:
            if self.fault != "bitflip":
                raise _error("fault", self.fault, "p01/p10 describe asymmetric bit flips; use fault=bitflip")
            if self.p:
                raise _error("p", self.p, "give either p (symmetric) or p01/p10 (asymmetric), not both")
        sites = parse_sites(str(self.site))
        if sites is None:
            raise _error("site", self.site, f"choose one of {site_choices()} (or any sites joined with +)")
        set_("site", "+".join(sites))
        set_("target", parse_targets("+".join(self.target) if isinstance(self.target, tuple) else self.target))
        if not isinstance(self.layers, tuple):
            set_("layers", parse_layers(self.layers))
        if self.modules is not None:
            try:
                re.compile(self.modules)
            except re.error as err:
                raise _error("modules", self.modules, f"not a valid regular expression ({err})") from None
        set_("bits", str(self.bits).strip().lower())
        if not self.per_bit and self.bits != "all":
            raise _error("bits", self.bits, f"fault={self.fault} replaces whole elements; bits applies to bitflip, stuck0, stuck1")
        _validate_bits_syntax(self.bits)
        set_("value_range", parse_value_range(self.value_range))
        set_("seed", _integer("seed", self.seed))
        if self.replay is not None:
            if self.p or self.asymmetric:
                raise _error("replay", self.replay, "a replay applies a saved map's faults; give p=0 (or leave p out)")
            if self.site != "weights" or self.target != ("all",) or self.layers is not None or self.modules is not None:
                raise _error("replay", self.replay, "a map replays weight faults as saved; leave site, target, layers and modules unset")
        if self.save_map is not None and not self.on_weights:
            raise _error("save_map", self.save_map, "maps hold weight faults; use site=weights or weights+activations")
        if self.act_scope not in ACT_SCOPES:
            raise _error("act_scope", self.act_scope, "choose leaf (module outputs of leaf modules) or all (every module, nested)")
        self._validate_protection()
        self._validate_storage()
        self._validate_kv_cache()
        self._validate_pattern()

    def _validate_rate_units(self) -> None:
        """`fit=` and `hours=` (FIT per Mbit over a deployment time) in place of p: the conversion
        (`patterns.fit`) sets p, and the report records both. The pattern decides the bits one
        event slot stands for, so it is parsed here first."""
        set_ = object.__setattr__
        if self.fit is None and self.hours is None:
            return
        if self.fit is None or self.hours is None:
            given, missing = ("fit", "hours") if self.hours is None else ("hours", "fit")
            raise _error(
                given, getattr(self, given), f"FIT rates need both fit= (FIT per Mbit) and hours= (deployment time); add {missing}="
            )
        for key in ("fit", "hours"):
            value = getattr(self, key)
            try:
                number = float(value) if not isinstance(value, bool) else math.nan
            except (TypeError, ValueError):
                number = math.nan
            if not (math.isfinite(number) and number >= 0) or (key == "hours" and number == 0):
                valid = "FIT per Mbit: failures per 2^20 bits per 10^9 hours, a number >= 0" if key == "fit" else "hours of operation, > 0"
                raise _error(key, value, valid)
            set_(self, key, number)
        if self.p_sa0 is not None or self.p_sa1 is not None:
            raise _error("fit", self.fit, "stuck-at clusters take p_sa0= and p_sa1=; leave fit= and hours= out")
        shape = self.pattern_shape
        p = fit_to_probability(self.fit, self.hours, shape.bits_per_slot() if shape else 1)
        # A spec rebuilt from its own fields (dataclasses.replace, a record) carries the p it converted to.
        if (self.p and self.p != p) or self.p01 is not None or self.p10 is not None:
            raise _error("fit", self.fit, "fit= and hours= set the rate; leave p (and p01/p10) out")
        if self.fit and not p:
            raise _error("fit", self.fit, f"gives p=0 over hours={self.hours:g} (below float64's smallest rate); raise fit or hours")
        set_(self, "p", p)

    def _validate_pattern(self) -> None:
        """`pattern=`: how the faults of one event cluster (bursts, rows, ...), and its own keys."""
        set_ = object.__setattr__
        shape = self.pattern_shape
        set_(self, "pattern", IID if shape is None else shape.label())
        for key in ("p_sa0", "p_sa1"):
            if getattr(self, key) is not None:
                set_(self, key, _probability(key, getattr(self, key)))
                if shape is None or not shape.stuck_at:
                    raise _error(key, getattr(self, key), "the stuck-at rates of pattern=clustered:C; add pattern=clustered:C")
        if shape is None:
            return
        if self.replay is not None:
            raise _error("pattern", self.pattern, "a map replays the words it saved; drop pattern=")
        if self.asymmetric:
            raise _error("pattern", self.pattern, "p01/p10 are independent flips (pattern=iid); give p, the event rate")
        if shape.stuck_at:
            if self.fault != "bitflip" or self.p:
                raise _error(
                    "pattern",
                    self.pattern,
                    "clustered cells are stuck at 0 or 1 by their own rates: give p_sa0= and p_sa1=, not p= or fault=",
                )
        elif not self.per_bit and not shape.whole_words:
            raise _error(
                "pattern", self.pattern, f"strikes bits within a word; fault={self.fault} replaces whole words: use row, mcu or column"
            )

    @cached_property
    def pattern_shape(self) -> Pattern | None:
        """The parsed `pattern=` (None for iid, the independent draw), parsed once per spec: the
        label `_validate_pattern` writes back parses to the same pattern."""
        try:
            return parse_pattern(self.pattern)
        except PatternError as error:
            raise _error("pattern", self.pattern, str(error)) from None

    def _validate_kv_cache(self) -> None:
        """The KV-cache keys: which faults the cache's entries take, in which layers and parts."""
        set_ = object.__setattr__
        set_(self, "kv_fault", str(self.kv_fault).strip().lower())
        if self.kv_fault not in KV_FAULTS:
            raise _error("kv_fault", self.kv_fault, "choose " + " or ".join(f"{name} ({text})" for name, text in KV_FAULTS.items()))
        set_(self, "kv_part", str(self.kv_part).strip().lower())
        if self.kv_part not in KV_PARTS:
            raise _error("kv_part", self.kv_part, "choose keys, values or both (the cache's stored keys, its values, or both)")
        if not isinstance(self.kv_layers, tuple):
            try:
                set_(self, "kv_layers", parse_layers(self.kv_layers))
            except FaultSpecError as error:
                raise FaultSpecError(str(error).replace("model_args layers=", "model_args kv_layers=", 1)) from None
        if self.sites == ("kv_cache",):
            selectors: tuple[tuple[str, str | None, str | None], ...] = (
                ("target", "+".join(self.target), "all"),
                ("layers", None if self.layers is None else layers_label(self.layers), None),
                ("modules", self.modules, None),
            )
            for key, shown, unset in selectors:
                if shown != unset:
                    raise _error(
                        key,
                        shown,
                        "selects weights and module outputs, not the KV cache; choose its layers with kv_layers= and its "
                        "parts with kv_part=",
                    )
        if not self.on_kv_cache:
            for key, default in (("kv_fault", "write"), ("kv_layers", None), ("kv_part", "both")):
                if getattr(self, key) != default:
                    value = getattr(self, key)
                    value = layers_label(value) if key == "kv_layers" else value
                    raise _error(key, value, f"applies to the KV cache; add site=kv_cache (site={self.site})")

    def _validate_storage(self) -> None:
        """`storage=`: the format the selected weights are encoded into and faulted in."""
        set_ = object.__setattr__
        set_(self, "storage", str(self.storage).strip().lower())
        if self.storage not in ("none", FILE, *codec_names()):
            raise _error(
                "storage",
                self.storage,
                "choose none, file (a GGUF file's own blocks) or one of "
                + ", ".join(codec_names())
                + " (the README's vocabulary gives each format's layout)",
            )
        set_(self, "group_size", _integer("group_size", self.group_size))
        if self.group_size < 2 or self.group_size % 2:
            raise _error("group_size", self.group_size, "a positive even number of weights per group (two 4-bit codes share a byte)")
        for key in ("fields", "protect_fields"):
            value = getattr(self, key)
            text = value if isinstance(value, str) else "+".join(value)
            names = tuple(
                dict.fromkeys(
                    part.strip().lower() for part in text.split("+") if part.strip() and part.strip().lower() not in ("all", "none")
                )
            )
            set_(self, key, names)
            if names and self.storage == "none":
                raise _error(key, text, "names fields of a simulated storage; add storage= (int8, int4, q4_1, ...)")
            known = codec_fields(self.storage) if self.storage != "none" else ()
            unknown = [name for name in names if name not in known]
            if unknown:
                raise _error(key, text, f"storage={self.storage} stores the fields {', '.join(known)}")
        if self.storage != "none":
            if not self.on_weights:
                raise _error("storage", self.storage, "storage encodes stored weights; use site=weights or weights+activations")
            if self.replay is not None:
                raise _error("replay", self.replay, "a map replays in the storage it was saved in (its spec says which); drop storage=")
            if self.ecc == "parity" or (self.ecc in ("secded", "chipkill") and self.ecc_policy == "zero"):
                raise _error(
                    "ecc",
                    self.ecc,
                    "with storage=, a detected word would be zeroed in its stored form, which is not a zero weight "
                    "(a zero 4-bit code decodes to the block's minimum); use ecc=secded,ecc_policy=keep",
                )
        if self.group_size != 128 and self.storage != "int4":
            raise _error("group_size", self.group_size, "sets the groups of storage=int4 only (the other storages' blocks are fixed)")
        if self.storage not in ("none", FILE):
            self._check_field_bits()

    def _check_field_bits(self) -> None:
        """`bits=` and `protect_bits=` name positions in every selected field's own words (a
        file's fields are checked as each tensor is faulted, its type known only then)."""
        layouts = codec(self.storage).field_layouts
        named = [("bits", self.bits)] if self.per_bit else []
        named += [("protect_bits", self.protect_bits)] if self.protect_bits != "none" else []
        for name in self.fields or tuple(layouts):
            for key, bits in named:
                try:
                    resolve_bits(layouts[name], bits)
                except ValueError as error:
                    reason = str(error).removeprefix(f"bits={bits!r}").lstrip(": ")
                    raise _error(key, bits, f"{reason} (field {name!r} of storage={self.storage}; fields= can leave it out)") from None

    def _validate_protection(self) -> None:
        """The protection keys: checked here so that a typo fails before any model loads."""

        def set_(name: str, value: object) -> None:
            object.__setattr__(self, name, value)  # the dataclass is frozen

        protect = self.protect if isinstance(self.protect, str) else "+".join(self.protect)
        set_("protect", () if protect.strip().lower() in ("", "none") else parse_targets(protect, key="protect"))
        set_("protect_bits", str(self.protect_bits).strip().lower())
        if self.protect_bits != "none":
            _validate_bits_syntax(self.protect_bits, key="protect_bits")
        if self.ecc not in ECC_SCHEMES:
            raise _error("ecc", self.ecc, "choose one of " + ", ".join(ECC_SCHEMES))
        if self.ecc_policy not in ECC_POLICIES:
            raise _error("ecc_policy", self.ecc_policy, "a detected, uncorrectable SECDED word reads as zero or keep (its corrupted data)")
        if self.clamp not in CLAMP_SITES:
            raise _error("clamp", self.clamp, "range restriction applies to " + ", ".join(CLAMP_SITES))
        if self.ecc_policy != "zero" and self.ecc not in ("secded", "chipkill"):
            raise _error(
                "ecc_policy", self.ecc_policy, f"applies to ecc=secded and ecc=chipkill (ecc={self.ecc}); add one or drop ecc_policy"
            )
        set_("interleave", _integer("interleave", self.interleave))
        if self.interleave < 1 or self.interleave > MAX_INTERLEAVE:
            raise _error("interleave", self.interleave, f"SECDED codewords interleaved bit by bit: a depth from 1 to {MAX_INTERLEAVE}")
        if self.interleave > 1 and self.ecc != "secded":
            raise _error("interleave", self.interleave, f"interleaves SECDED codewords; add ecc=secded (ecc={self.ecc})")
        if "activations" in self.clamp and self.act_scope != "leaf":
            raise _error(
                "clamp", self.clamp, "activation bounds are calibrated on leaf modules' outputs; use act_scope=leaf, or clamp=weights"
            )
        if self.replay is not None and self.protected:
            raise _error("replay", self.replay, "a map holds the words as written, after any protection; replay it without protection keys")

    @property
    def protected(self) -> bool:
        """Whether any protection scheme is chosen (faults are drawn the same either way)."""
        return bool(self.protect or self.protect_fields) or self.protect_bits != "none" or self.ecc != "none" or self.clamp != "none"

    @property
    def asymmetric(self) -> bool:
        return self.p01 is not None or self.p10 is not None

    @property
    def kind(self) -> FaultKind:
        """What `fault` does (see `faults.kinds`)."""
        return FAULT_KIND_TABLE[self.fault]

    @property
    def per_bit(self) -> bool:
        """True when probabilities are per bit (bit faults), False when per element."""
        return self.kind.per_bit

    @property
    def rate(self) -> float:
        """The probability positions are sampled at, per bit or per element: the larger of p01
        and p10 for asymmetric flips (the sampler thins each hit to its bit's own rate)."""
        if self.p_sa0 is not None or self.p_sa1 is not None:
            return max(self.p_sa0 or 0.0, self.p_sa1 or 0.0)
        return max(self.p01 or 0.0, self.p10 or 0.0) if self.asymmetric else self.p

    def bit_rates(self) -> tuple[float, float]:
        """(probability an eligible bit holding 0 changes, same for a bit holding 1)."""
        return self.kind.bit_rates(self.p, self.p01, self.p10)

    @property
    def active(self) -> bool:
        """Whether this spec can inject anything at all (p=0 is the clean model)."""
        return bool(self.p or self.p01 or self.p10 or self.p_sa0 or self.p_sa1 or self.replay)

    @property
    def sites(self) -> tuple[str, ...]:
        """The registered sites `site=` selects, in registration order."""
        return tuple(self.site.split("+"))

    @property
    def on_weights(self) -> bool:
        return "weights" in self.sites

    @property
    def on_activations(self) -> bool:
        return "activations" in self.sites

    @property
    def on_kv_cache(self) -> bool:
        return "kv_cache" in self.sites

    def sampling_key(self) -> dict[str, Any]:
        """The fields that shape a fault map at one site (target/layers/modules only choose sites)."""
        key = {
            "fault": self.fault,
            "p": self.p,
            "p01": self.p01,
            "p10": self.p10,
            "bits": self.bits,
            "value_range": list(self.value_range),
        }
        if self.pattern != IID:  # iid keys (and so iid maps) are as they were before patterns
            key.update(pattern=self.pattern, p_sa0=self.p_sa0, p_sa1=self.p_sa1)
        return key

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"] = "+".join(self.target)
        data["layers"] = None if self.layers is None else layers_label(self.layers)
        data["value_range"] = list(self.value_range)
        data["protect"] = "+".join(self.protect) or "none"
        data["fields"] = "+".join(self.fields) or "all"
        data["protect_fields"] = "+".join(self.protect_fields) or "none"
        if not self.protected:  # unprotected specs keep the fingerprints and records they had before protection existed
            for key in PROTECTION_KEYS:
                data.pop(key)
        if self.storage == "none":  # so do specs of the model's own storage
            for key in STORAGE_KEYS:
                data.pop(key)
        if self.interleave == 1:
            data.pop("interleave", None)  # plain SECDED, as before interleaving existed
        if self.pattern == IID and self.fit is None:  # and so do iid specs
            for key in PATTERN_KEYS:
                data.pop(key)
        if self.on_kv_cache:
            data["kv_layers"] = None if self.kv_layers is None else layers_label(self.kv_layers)
        else:  # and specs that leave the KV cache alone
            for key in KV_KEYS:
                data.pop(key)
        return data

    def fingerprint(self) -> str:
        """A short stable hash of the whole spec: cache keys and file names use it. A replayed map
        counts by its content, so a file rewritten in place is never mistaken for the old one."""
        data = self.to_dict()
        if self.replay is not None and os.path.exists(self.replay):
            data["replay"] = hashlib.sha256(Path(self.replay).read_bytes()).hexdigest()
        data.pop("save_map")  # where a map is written does not change the faults
        text = json.dumps(data, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def describe(self) -> str:
        if self.replay is not None:
            return f"replay of the fault map {self.replay} (weights)"
        rate = f"p01={self.p01 or 0:g},p10={self.p10 or 0:g}" if self.asymmetric else f"p={self.p:g}"
        unit = "bit" if self.per_bit else "element"
        if self.fit is not None:
            rate += f" (fit={self.fit:g} FIT/Mbit over {self.hours:g} h)"
        if self.pattern_shape is not None:
            rate = f"p_sa0={self.p_sa0 or 0:g},p_sa1={self.p_sa1 or 0:g}" if self.pattern_shape.stuck_at else rate
            unit = f"event slot of pattern {self.pattern}"
        layers = "all layers" if self.layers is None else f"layers {layers_label(self.layers)}"
        if self.sites == ("kv_cache",):
            kv_layers = "all layers" if self.kv_layers is None else f"layers {layers_label(self.kv_layers)}"
            return f"{self.fault} {rate} per {unit} on the KV cache: {self.kv_fault} faults on {self.kv_part} ({kv_layers}, bits={self.bits}, seed={self.seed})"
        text = f"{self.fault} {rate} per {unit} on {self.site} of {'+'.join(self.target)} ({layers}, bits={self.bits}, seed={self.seed})"
        if self.on_kv_cache:
            kv_layers = "all layers" if self.kv_layers is None else f"layers {layers_label(self.kv_layers)}"
            text += f"; KV cache: {self.kv_fault} faults on {self.kv_part} ({kv_layers})"
        if self.storage != "none":
            text += f"; stored as {self.storage}" + (f" (groups of {self.group_size})" if self.storage == "int4" else "")
            text += f", faults in its {'+'.join(self.fields)}" if self.fields else ""
        return f"{text}; protection: {self.describe_protection()}" if self.protected else text

    @property
    def changes_model(self) -> bool:
        """Whether injecting changes the model even without faults: a storage's decoded form is
        what the model computes with, at p=0 too (its quantization error is the clean baseline)."""
        return self.active or self.storage != "none"

    def describe_protection(self) -> str:
        """The chosen protection schemes in words ("none" when there are none)."""
        parts = []
        if self.protect:
            parts.append(f"backed-up {'+'.join(self.protect)}")
        if self.protect_fields:
            parts.append(f"backed-up {'+'.join(self.protect_fields)} of the stored weights")
        if self.protect_bits != "none":
            parts.append(f"protected bits {self.protect_bits}")
        if self.ecc in ("secded", "chipkill"):
            code = "SECDED(72,64)" if self.ecc == "secded" else "chipkill RS(18,16) over bytes"
            code += f" interleaved {self.interleave} deep" if self.interleave > 1 else ""
            parts.append(f"{code}, detected words {'zeroed' if self.ecc_policy == 'zero' else 'kept'}")
        elif self.ecc == "parity":
            parts.append("parity per element, detected elements zeroed")
        if self.clamp != "none":
            parts.append(f"range restriction on {self.clamp}")
        return ", ".join(parts) or "none"


def layers_label(layers: Iterable[int]) -> str:
    """(0,1,2,3,7) -> "0-3+7": the same syntax `layers=` accepts."""
    parts: list[list[int]] = []
    run: list[int] = []
    for index in sorted(layers):
        if run and index != run[-1] + 1:
            parts.append(run)
            run = []
        run.append(index)
    if run:
        parts.append(run)
    return "+".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in parts)


def _validate_bits_syntax(bits: str, key: str = "bits") -> None:
    for part in bits.split("+"):
        part = part.strip()
        if not re.fullmatch(r"all|sign|exponent_msb|exponent|mantissa|\d+(-\d+)?", part):
            raise _error(
                key, bits, "use all, sign, exponent, mantissa, exponent_msb, or bit positions like 0-6+15 (bit 0 = least significant)"
            )
        if any(int(n) > MAX_BIT_POSITION for n in re.findall(r"\d+", part)):
            raise _error(key, bits, f"bit positions run 0-{MAX_BIT_POSITION} at most (float32; 0-15 for 16-bit dtypes)")


FAULT_KEYS: tuple[str, ...] = tuple(f.name for f in fields(FaultSpec))
PROTECTION_KEYS = ("protect", "protect_bits", "ecc", "ecc_policy", "clamp", "protect_fields", "interleave")
PATTERN_KEYS = ("pattern", "p_sa0", "p_sa1", "fit", "hours")
STORAGE_KEYS = ("storage", "group_size", "fields")
KV_KEYS = ("kv_fault", "kv_layers", "kv_part")
"""The keys that choose protection schemes rather than faults: a sweep's protection axis sets them."""


def parse_fault_args(model_args: Mapping[str, Any], passthrough: Iterable[str] = ()) -> tuple[FaultSpec, dict[str, Any]]:
    """Split `model_args` into a `FaultSpec` and the keys meant for the wrapped model.

    A key that is not a fault key but is one typo away from one (`traget`) is an error with a
    suggestion, unless it is a known argument of the wrapped model (`passthrough`): passing a
    misspelt fault key on to `from_pretrained` would silently run the clean model.
    """
    ours = {key: value for key, value in model_args.items() if key in FAULT_KEYS}
    rest = {key: value for key, value in model_args.items() if key not in FAULT_KEYS}
    known = set(passthrough)
    for key in rest:
        if key in known:
            continue
        close = difflib.get_close_matches(key, [k for k in FAULT_KEYS if len(k) > 1], n=1, cutoff=0.75)
        if close:
            raise FaultSpecError(
                f"model_args key {key!r} is not a fault key; did you mean {close[0]!r}? Fault keys: {', '.join(FAULT_KEYS)}"
            )
    return FaultSpec(**ours), rest


def parse_arg_string(text: str) -> dict[str, Any]:
    """`"p=1e-5,target=attention"` -> {"p": "1e-5", "target": "attention"} (values stay strings).

    A key given twice is an error: silently keeping the last value hides a typo.
    """
    args: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise FaultSpecError(f"model_args item {item!r} is not of the form key=value")
        key = key.strip()
        if key in args:
            raise FaultSpecError(f"model_args key {key!r} is given twice ({args[key]!r} and {value.strip()!r}); give it once")
        args[key] = value.strip()
    return args


def to_spec(spec: FaultSpec | str | Mapping[str, Any] | None = None, **fields: Any) -> FaultSpec:
    """A FaultSpec from a FaultSpec, a `model_args`-style string, a dict, or keyword fields."""
    if isinstance(spec, FaultSpec):
        if fields:
            raise TypeError("give either a FaultSpec or keyword fields, not both")
        return spec
    args = parse_arg_string(spec) if isinstance(spec, str) else dict(spec or {})
    args.update(fields)
    parsed, unknown = parse_fault_args(args)
    if unknown:
        raise TypeError(f"not fault keys: {', '.join(unknown)}")
    return parsed
