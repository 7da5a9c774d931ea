"""lm-eval's `--use_cache`, made safe for faulted models and countable.

lm-eval's CachingLM keys its sqlite cache on the request alone, in one table for every model, so
a cached answer of one model can be served to another (lm-eval's own `hf` has this flaw). For
`faulty_hf` the cache moves to a table named after the model's identity (path or hub id,
revision, dtype, adapter, GGUF file) and the fault spec, so an answer is only ever served to the
same model under the same faults.

Served answers bypass the model, so its request counters would miss them. Beside each answer we
store its task and its non-finite/degenerate flags (a side table), and count a served answer with
those flags: a rerun from the cache reports the same request figures, plus how many were cached.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from lm_eval.api.model import hash_args

RequestFlags = tuple[str, bool, bool]
"""(task, non-finite, degenerate) of one computed answer."""


def cache_table(model_identity: dict[str, Any], spec_fingerprint: str) -> str:
    """The sqlite table name for one (model, spec)."""
    text = json.dumps({"model": model_identity, "spec": spec_fingerprint}, sort_keys=True, default=str)
    return "faulty_hf_" + hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


class CountedCache:
    """Redirects a CachingLM's sqlite dict to our table and reports every answer it serves."""

    def __init__(self, dbdict: Any, table: str, on_served: Callable[[RequestFlags], None]) -> None:
        filename = dbdict.filename
        dbdict.close()
        type(dbdict).__init__(dbdict, filename, tablename=table, autocommit=True)
        self.flags = type(dbdict)(filename, tablename=f"{table}_flags", autocommit=True)
        served = self.flags
        original_class = type(dbdict)

        class _Counting(original_class):  # type: ignore[misc, valid-type]
            """The same dict; a lookup that serves an answer also reports its stored flags."""

            def __getitem__(self, key: str) -> Any:
                value = super().__getitem__(key)
                if key in served:
                    on_served(tuple(served[key]))
                return value

        dbdict.__class__ = _Counting

    def remember(self, attr: str, request_args: tuple, flags: RequestFlags) -> None:
        """Store the flags of a freshly computed answer under the key CachingLM stores it by."""
        self.flags[hash_args(attr, request_args)] = list(flags)
