"""Per-row stream keys for activation faults under lm-eval's batching.

lm-eval batches requests as it likes (by length, by `--batch_size`), pads scoring rows on the right
with token 0 and generation rows on the left. A request's activation faults must not depend on its
batch, so each row draws from a stream keyed by its own tokens (and, when generating, its decoding
step), on its real positions only. This module turns lm-eval's padded tensors into those `Rows`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch

from lm_eval_faults.core.random.streams import request_key, row_keys
from lm_eval_faults.core.sites.rows import Rows

Tokens = tuple[int, ...]


def scoring_inputs(requests: list, max_length: int) -> list[Tokens]:
    """The input lm-eval builds for each `_loglikelihood_tokens` request: (context + continuation),
    left-truncated to `max_length + 1`, last token dropped."""
    return [tuple((context + continuation)[-(max_length + 1) :][:-1]) for _, context, continuation in requests]


class ScoringRows:
    """Tells a scoring row's real tokens from lm-eval's right padding, by the inputs being scored.

    Token 0 may also be a real trailing token, so stripping zeros alone would cut real positions:
    the row's length is that of the shortest known input it starts with once zeros are stripped.
    """

    def __init__(self) -> None:
        self._known: set[Tokens] = set()

    @contextlib.contextmanager
    def scoring(self, inputs: list[Tokens]) -> Iterator[None]:
        """Know `inputs` for the scoring forwards inside the block (and forget them after)."""
        self._known = set(inputs)
        try:
            yield
        finally:
            self._known = set()

    def real_length(self, row: list[int]) -> int:
        """The row's length without lm-eval's right padding (rows of unknown inputs count as unpadded)."""
        length = len(row)
        while length and row[length - 1] == 0:
            length -= 1
        for candidate in range(length, len(row) + 1):
            if tuple(row[:candidate]) in self._known:
                return candidate
        return len(row)


def scoring_rows(rows: list[list[int]], lengths: list[int], width: int) -> Rows:
    """One scoring forward's rows: each keyed by its real tokens, real from position 0 to its length."""
    keys = np.array([request_key(row[:length]) for row, length in zip(rows, lengths, strict=True)], dtype=np.uint64)
    zeros = np.zeros(len(rows), dtype=np.int64)
    return Rows(keys, zeros, np.array(lengths, dtype=np.int64), width, requests=keys, pads=zeros)


def prompt_tokens(context: torch.Tensor, attention_mask: torch.Tensor | None) -> list[Tokens]:
    """Each generation row's prompt without its left padding (no mask: every position is real)."""
    mask = torch.ones_like(context) if attention_mask is None else attention_mask
    return [tuple(row[keep].tolist()) for row, keep in zip(context.cpu(), mask.cpu().bool(), strict=False)]


@contextlib.contextmanager
def generation_rows(
    model: torch.nn.Module, prompts: list[Tokens], next_forward: Callable[[Rows | None], None], width: int | None = None
) -> Iterator[None]:
    """Key each row's activation faults by its own prompt tokens and decoding step, on its real
    (not left-padding) positions: a hook hands `next_forward` the rows of every decoding forward.
    Its KV-cache entries are keyed by the prompt alone and their position after the left padding.

    The rows are left-padded to `width` (the longest prompt by default). Padding is read from the
    prompts, never from the attention mask the model is handed, which a static cache turns into
    a 4-D one: the forwards feed cache indices [past, past + length), and a row's real ones start
    at its padding."""
    base = np.array([request_key(prompt) for prompt in prompts], dtype=np.uint64)
    lengths = np.array([len(prompt) for prompt in prompts], dtype=np.int64)
    pads = (max(lengths, default=0) if width is None else width) - lengths
    fed = 0
    step = 0

    def before_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        nonlocal fed, step
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        length = ids.shape[1]
        starts = np.clip(pads - fed, 0, length)
        next_forward(Rows(row_keys(step, base), starts, np.full(len(base), length, dtype=np.int64), length, requests=base, pads=pads))
        fed += length
        step += 1

    handle = model.register_forward_pre_hook(before_forward, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        next_forward(None)
