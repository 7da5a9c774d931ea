"""Clean and faulted generations of the same prompts, side by side, with what tells them apart.

For each prompt the clean model generates greedily once; then, for each spec of a ladder, the
same model under `inject(spec)` generates again, its faults keyed by the prompt as `faulty_hf`
keys them (`generation_rows`), so every output is reproducible from (prompt, spec). Each faulted
text is compared with the clean one:

- `first_divergence`: the first generated token that differs (None when identical);
- `clean_gap`: at that position, the clean model's log-probability of its own token minus that
  of the faulted token (how unlikely the substitution was); `faulted_gap`: the faulted model's
  log-probability of the token it chose minus that of the clean token (how decisively it chose);
- `perplexity`: the clean model's perplexity of the faulted continuation (how unnatural it is),
  and `perplexity_ratio` to that of the clean continuation; `tail_perplexity_ratio` the same from
  the first divergence on, which `text_failures.failure_class` reads;
- the failure class and the fault report's counts.

The model is loaded once; a spec's faults are restored (O(faults)) before the next.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lm_eval_faults.core.injection import inject
from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.harness.request_accounting import NonFiniteLogitsGuard
from lm_eval_faults.harness.row_keying import generation_rows
from lm_eval_faults.study.text_failures import failure_class, first_divergence


@dataclass
class Generated:
    """One greedy generation: its new tokens, their text pieces, and whether any logits went non-finite."""

    tokens: list[int]
    pieces: list[str]
    nonfinite: bool = False
    flat: bool = False
    """Whether the logits were finite but all equal at some step (a collapsed model)."""

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass
class FaultedText:
    """One spec's generation for one prompt, compared with the clean one."""

    label: str
    spec: str
    generated: Generated
    failure: str
    first_divergence: int | None
    clean_gap: float | None
    faulted_gap: float | None
    perplexity: float
    perplexity_ratio: float
    tail_perplexity_ratio: float | None
    faults: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["text"] = self.generated.text
        return data


@dataclass
class PromptResult:
    """A prompt, its clean generation and clean perplexity, and every faulted one."""

    prompt: str
    clean: Generated
    clean_perplexity: float
    faulted: list[FaultedText] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "clean": {**asdict(self.clean), "text": self.clean.text},
            "clean_perplexity": self.clean_perplexity,
            "faulted": [item.to_dict() for item in self.faulted],
        }


def text_pieces(tokenizer: Any, tokens: Sequence[int]) -> list[str]:
    """Each token's piece of the decoded text, so that the pieces join to the text: a token that
    completes a character begun by earlier ones (byte-level BPE) takes over their pieces."""
    pieces: list[str] = []
    text = ""
    for end in range(1, len(tokens) + 1):
        decoded = tokenizer.decode(tokens[:end], skip_special_tokens=True)
        while pieces and not decoded.startswith(text):
            text = text[: len(text) - len(pieces.pop())]
        pieces.append(decoded[len(text) :])
        text = decoded
    return pieces


def stopped_at(pieces: Sequence[str], stop: Sequence[str]) -> int:
    """How many tokens a text keeps when it ends at its first stop string: those up to and
    including the one in which the stop begins (all of them when none appears)."""
    text = ""
    for index, piece in enumerate(pieces):
        text += piece
        if any(s and s in text for s in stop):
            return index + 1
    return len(pieces)


def cut_at_stop(pieces: Sequence[str], stop: Sequence[str]) -> str:
    """The last kept piece, cut before the first stop string (lm-eval drops the stop and what follows)."""
    text = "".join(pieces)
    cut = min((text.find(s) for s in stop if s and s in text), default=len(text))
    before = len(text) - len(pieces[-1])
    return pieces[-1][: max(cut - before, 0)]


class Generator:
    """Greedy generation on one loaded model and tokenizer, clean or under a spec."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int = 64, chat: bool = False, stop: Sequence[str] = ()) -> None:
        """`stop`: strings that end a text where they first appear (an lm-eval task's `until`)."""
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.chat = chat
        self.stop = tuple(stop)

    def encode(self, prompt: str) -> list[int]:
        if self.chat:
            messages = [{"role": "user", "content": prompt}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return list(self.tokenizer(prompt).input_ids)

    def generate(self, prompt_ids: list[int], spec: FaultSpec | None = None) -> tuple[Generated, torch.Tensor, dict[str, int]]:
        """New tokens (greedy), the raw logits of every step, and the fault report's totals."""
        ids = torch.tensor([prompt_ids])
        guard = NonFiniteLogitsGuard()
        kwargs: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            logits_processor=[guard],
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id,
            attention_mask=torch.ones_like(ids),
        )
        counts: dict[str, int] = {}
        with torch.no_grad():
            if spec is None or not spec.changes_model:
                out = self.model.generate(ids, **kwargs)
            else:
                with inject(self.model, spec) as faults, generation_rows(self.model, [tuple(prompt_ids)], faults.next_forward):
                    out = self.model.generate(ids, **kwargs)
                    counts = fault_totals(faults.report.to_dict())
        new = out.sequences[0, len(prompt_ids) :].tolist()
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        logits = torch.stack([step[0] for step in out.logits]).float() if out.logits else torch.empty(0)
        pieces = text_pieces(self.tokenizer, new)
        kept = stopped_at(pieces, self.stop)
        new, pieces, logits = new[:kept], pieces[:kept], logits[:kept]
        if kept and pieces[-1]:
            pieces[-1] = cut_at_stop(pieces, self.stop)
        nonfinite = bool((~torch.isfinite(logits)).any()) if len(logits) else False
        flat = bool((logits.amax(dim=-1) == logits.amin(dim=-1)).any()) if len(logits) else False
        return Generated(new, pieces, nonfinite, flat and not nonfinite), logits, counts

    def log_distributions(self, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
        """The clean model's next-token log-probabilities before each of `tokens` (one row each),
        from one forward over the prompt and the tokens."""
        if not tokens:
            return torch.empty(0, 0)
        ids = torch.tensor([prompt_ids + tokens])
        with torch.no_grad():
            logits = self.model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
        return torch.log_softmax(logits, dim=-1)


def token_logprobs(distributions: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Each token's log-probability in its row of `Generator.log_distributions`."""
    if not tokens:
        return torch.empty(0)
    return distributions.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def fault_totals(report: dict[str, Any]) -> dict[str, int]:
    """Per site with any elements: its faults (`SITE_hit`) and the values they wrote as NaN/Inf
    (`SITE_nonfinite`; logits can still overflow from finite faulted values)."""
    totals = {}
    for name, part in report.items():
        if isinstance(part, dict) and "totals" in part and part["totals"].get("elements"):
            totals[f"{name}_hit"] = int(part["totals"]["hit_elements"])
            totals[f"{name}_nonfinite"] = int(part["totals"]["nonfinite_created"])
    return totals


def perplexity(logprobs: torch.Tensor) -> float:
    """exp(mean NLL); 1.0 for no tokens (nothing was surprising); inf if any token has probability 0."""
    if not len(logprobs):
        return 1.0
    mean = float(-logprobs.mean())
    return math.exp(mean) if math.isfinite(mean) and mean < 700 else math.inf


def compare_prompt(
    generator: Generator, prompt: str, specs: Sequence[tuple[str, FaultSpec]], progress: Callable[[], None] | None = None
) -> PromptResult:
    """The clean generation of `prompt` and one `FaultedText` per (label, spec)."""
    prompt_ids = generator.encode(prompt)
    clean, _, _ = generator.generate(prompt_ids)
    clean_dist = generator.log_distributions(prompt_ids, clean.tokens)  # once per prompt: every rung's clean gap reads it
    result = PromptResult(prompt, clean, perplexity(token_logprobs(clean_dist, clean.tokens)))
    for label, spec in specs:
        faulted, logits, counts = generator.generate(prompt_ids, spec)
        result.faulted.append(_compared(generator, prompt_ids, clean, clean_dist, label, spec, faulted, logits, counts))
        if progress is not None:
            progress()
    return result


def _compared(
    generator: Generator,
    prompt_ids: list[int],
    clean: Generated,
    clean_dist: torch.Tensor,
    label: str,
    spec: FaultSpec,
    faulted: Generated,
    logits: torch.Tensor,
    counts: dict[str, int],
) -> FaultedText:
    position = first_divergence(clean.tokens, faulted.tokens)
    clean_lp = token_logprobs(clean_dist, clean.tokens)
    faulted_lp = token_logprobs(generator.log_distributions(prompt_ids, faulted.tokens), faulted.tokens)
    clean_gap = faulted_gap = None
    tail_ratio = None
    if position is not None:
        if position < len(clean.tokens) and position < len(faulted.tokens):
            before = clean_dist[position]  # the clean model after the prefix both texts share
            clean_gap = float(before[clean.tokens[position]] - before[faulted.tokens[position]])
            if position < len(logits) and torch.isfinite(logits[position]).all():
                faulted_dist = torch.log_softmax(logits[position], dim=-1)
                faulted_gap = float(faulted_dist[faulted.tokens[position]] - faulted_dist[clean.tokens[position]])
        tail_ratio = _ratio(perplexity(faulted_lp[position:]), perplexity(clean_lp[position:]))
    ppl = perplexity(faulted_lp)
    failure = failure_class(clean.tokens, faulted.tokens, faulted.text, clean.text, faulted.nonfinite, tail_ratio, faulted.flat)
    return FaultedText(
        label,
        spec.describe(),
        faulted,
        failure,
        position,
        clean_gap,
        faulted_gap,
        ppl,
        _ratio(ppl, perplexity(clean_lp)),
        tail_ratio,
        counts,
    )


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(b) else math.inf
