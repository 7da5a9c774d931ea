"""The request rows of one forward call: what a site faulted per call keys its faults by.

A row's faults are drawn from its request's key, never from its place in the batch, so a map
does not depend on batch size or order (see `random.streams.row_keys`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rows:
    """The rows of one forward call: each row's request key and its real positions [start, end).

    Positions index the sequence dimension (dim 1) of batch-first outputs; everything outside
    [start, end) is padding and is never faulted.

    A KV cache outlives the forward call, so its entries are keyed by what stays fixed while a
    request is decoded: `requests`, each row's request key (the same at every decoding step;
    `keys` may mix in the step), and `pads`, the cache index of each row's first real token (its
    left padding), so that a cache index minus `pads` is the token's position in its own request.
    Left out (None), `keys` and no padding stand in.
    """

    keys: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    length: int
    requests: np.ndarray | None = None
    pads: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)
