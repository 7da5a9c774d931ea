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
    """

    keys: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    length: int

    def __len__(self) -> int:
        return len(self.keys)
