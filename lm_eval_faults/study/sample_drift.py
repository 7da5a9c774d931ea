"""One task's drift, sample by sample: a clean and a faulted run's per-sample outputs compared.

Why: a task's accuracy hides how a fault acts. Two runs can score the same while half their
answers changed, and a model whose logits collapsed scores chance level by lm-eval's first-index
tie-break rather than by guessing. Comparing the per-sample outputs of a clean and a faulted run
shows the flips, the size of the log-likelihood changes, the ties, and where generated text
starts to differ.

`compare_samples` takes in-memory sample lists, e.g. the `samples` lm-eval's `evaluate()`
returns; `drift.drift` reads them from two lm-eval output directories.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

LOGLIKELIHOOD_TYPES = ("multiple_choice", "loglikelihood")
ROLLING = "loglikelihood_rolling"
GENERATIVE = "generate_until"
PERPLEXITY_UNITS = (("word_perplexity", "word"), ("byte_perplexity", "byte"))
"""Per-sample metrics of rolling tasks whose value is the pair (log-likelihood, count of units)."""

TOKEN_RE = re.compile(r"\w+|[^\w\s]")


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class SampleDrift:
    """One matched (clean, faulted) sample pair; fields that do not apply to its output type stay None."""

    doc_id: Any
    filter: str
    index: int = 0
    """Occurrence of this (filter, doc_id) in its run: repeated requests are matched in order."""
    finite: bool = True
    clean_choice: int | None = None
    faulty_choice: int | None = None
    flipped: bool | None = None
    tied: bool | None = None
    agrees: bool | None = None
    """The faulted run's top choices (every choice holding the maximum) are the clean run's, all finite."""
    abs_delta_ll: float | None = None
    kl: float | None = None
    greedy_changed: bool | None = None
    identical: bool | None = None
    first_divergent_token: int | None = None
    prompt: str | None = None
    clean_text: str | None = None
    faulty_text: str | None = None
    """A generative sample's prompt and both outputs, for the side-by-side page (`drift --html`)."""
    perplexity_ratio: float | None = None
    metric_deltas: dict[str, float] = field(default_factory=dict)


@dataclass
class TaskDrift:
    """Aggregate drift of one task (one filter of it), with its per-sample records."""

    task: str
    output_type: str
    filter: str = "none"
    matched: int = 0
    only_clean: int = 0
    only_faulty: int = 0
    mismatched: int = 0
    """Matched pairs that cannot be compared (different numbers of choices): left out of every figure."""
    doc_hash_differs: int = 0
    nonfinite: int = 0
    """Matched samples with a NaN or infinite log-likelihood in either run (left out of |Δ|, KL, ratios)."""
    flips: int | None = None
    agreement: float | None = None
    ties: int | None = None
    tie_kept: int | None = None
    """Finite unchanged answers whose top choices differ between the runs (a tie on one side only):
    the same answer only through lm-eval's first-index tie-break. agree + tie_kept = unchanged finite samples."""
    mean_abs_delta_ll: float | None = None
    mean_kl: float | None = None
    greedy_changes: int | None = None
    exact_agreement: float | None = None
    diverged: int | None = None
    mean_first_divergence: float | None = None
    perplexity_ratio: float | None = None
    perplexity_unit: str | None = None
    metric_deltas: dict[str, float] = field(default_factory=dict)
    requests: int | None = None
    degenerate_requests: int | None = None
    nonfinite_requests: int | None = None
    notes: list[str] = field(default_factory=list)
    samples: list[SampleDrift] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The task's name, with the filter when it is not lm-eval's default one."""
        return self.task if self.filter == "none" else f"{self.task}/{self.filter}"

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        """Everything as JSON-ready values (non-finite floats stay NaN/Infinity, as in lm-eval's files)."""
        data = asdict(self)
        if not samples:
            data.pop("samples")
        return data


# ---------------------------------------------------------------------------------------------
# Per-sample arithmetic
# ---------------------------------------------------------------------------------------------


def tokens(text: str) -> list[str]:
    """Words and single punctuation marks (`\\w+|[^\\w\\s]`).

    A tokenizer-independent token: the two runs may come from models with different tokenizers,
    and the position must mean the same thing for any model, so it is not the model's own token."""
    return TOKEN_RE.findall(text)


def first_divergent_token(clean: str, faulty: str) -> int | None:
    """Index of the first differing token (see `tokens`); None when the token lists are identical,
    the shorter length when one is a prefix of the other."""
    a, b = tokens(clean), tokens(faulty)
    for position, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return position
    return None if len(a) == len(b) else min(len(a), len(b))


def log_softmax(values: Sequence[float]) -> list[float]:
    """log p over the choices, through the log-sum-exp so large log-likelihoods do not overflow."""
    top = max(values)
    total = top + math.log(sum(math.exp(value - top) for value in values))
    return [value - total for value in values]


def kl_divergence(clean: Sequence[float], faulty: Sequence[float]) -> float:
    """KL(clean ‖ faulty) of the softmax over the choices' log-likelihoods (finite inputs only):
    how much the faulted model's choice distribution departs from the clean one, in nats."""
    p, q = log_softmax(clean), log_softmax(faulty)
    return max(0.0, sum(math.exp(lp) * (lp - lq) for lp, lq in zip(p, q, strict=True)))


def lm_eval_argmax(values: Sequence[float]) -> int:
    """The choice lm-eval scores (`np.argmax`): the first maximum, and the first NaN if any, so that
    a flip here is a changed answer in lm-eval's own accuracy."""
    for index, value in enumerate(values):
        if math.isnan(value):
            return index
    return max(range(len(values)), key=lambda index: (values[index], -index))


def top_choices(values: Sequence[float]) -> frozenset[int]:
    """The choices holding the largest log-likelihood (several when tied), by exact equality."""
    top = max(values)
    return frozenset(index for index, value in enumerate(values) if value == top)


def is_tied(values: Sequence[float]) -> bool:
    """Whether the largest non-NaN log-likelihood is shared by two or more choices (exact equality:
    a collapsed model returns bit-identical values, and lm-eval then silently picks the first)."""
    ordered = [value for value in values if not math.isnan(value)]
    return len(ordered) > 1 and ordered.count(max(ordered)) > 1


def safe_exp(value: float) -> float:
    """exp that returns inf instead of raising on overflow (a faulted perplexity can be astronomical)."""
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def _mean(values: Iterable[float]) -> float | None:
    """Mean of the finite values, None when there are none."""
    kept = [value for value in values if math.isfinite(value)]
    return sum(kept) / len(kept) if kept else None


# ---------------------------------------------------------------------------------------------
# Reading samples (files written by lm-eval are stringified; in-memory samples are not)
# ---------------------------------------------------------------------------------------------


def _as_bool(value: Any) -> bool:
    """lm-eval writes `is_greedy` as the string "True"/"False" in its files, a bool in memory."""
    return value is True or value == "True"


def _pairs(sample: Mapping[str, Any]) -> list[tuple[float, bool]]:
    """The (log-likelihood, is_greedy) pair of each choice; float() reads "nan", "-inf", "-Infinity"."""
    return [(float(pair[0]), _as_bool(pair[1])) for pair in _filtered(sample)]


def _filtered(sample: Mapping[str, Any]) -> list[Any]:
    """The sample's filtered responses, one per request."""
    responses = sample.get("filtered_resps")
    if not isinstance(responses, (list, tuple)):
        raise ValueError(f"sample doc_id={sample.get('doc_id')!r} has no filtered_resps list (was the run made with --log_samples?)")
    return list(responses)


def _text(sample: Mapping[str, Any]) -> str:
    """A generative sample's output: the first filtered response (the first of several if a filter kept a list)."""
    responses = _filtered(sample)
    value: Any = responses[0] if responses else ""
    while isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return str(value)


def _prompt(sample: Mapping[str, Any]) -> str | None:
    """The context a generative request was given (lm-eval logs it as `arguments.gen_args_0.arg_0`)."""
    arguments = sample.get("arguments")
    first = next(iter(arguments.values()), None) if isinstance(arguments, Mapping) else None
    if isinstance(arguments, (list, tuple)) and arguments:
        first = arguments[0]
    if isinstance(first, Mapping):
        first = first.get("arg_0")
    elif isinstance(first, (list, tuple)) and first:
        first = first[0]
    return first if isinstance(first, str) else None


def _rolling(sample: Mapping[str, Any]) -> tuple[float, float | None, str | None]:
    """A rolling sample's summed log-likelihood and its (units, unit name) when a metric carries them."""
    loglikelihood = float(_text(sample))
    for metric, unit in PERPLEXITY_UNITS:
        value = sample.get(metric)
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return loglikelihood, float(value[1]), unit
    return loglikelihood, None, None


def _numeric_metrics(sample: Mapping[str, Any]) -> dict[str, float]:
    """The sample's per-sample metric values that are plain numbers (pairs such as perplexity's are not)."""
    names = sample.get("metrics") or []
    return {name: float(sample[name]) for name in names if isinstance(sample.get(name), (int, float))}


def infer_output_type(samples: Sequence[Mapping[str, Any]]) -> str:
    """The output type from the samples' shape, for runs whose results JSON is missing."""
    if not samples:
        return GENERATIVE
    sample = samples[0]
    responses = _filtered(sample)
    if responses and isinstance(responses[0], (list, tuple)) and len(responses[0]) == 2:
        return "multiple_choice" if len(responses) > 1 else "loglikelihood"
    if any(metric in (sample.get("metrics") or []) for metric, _ in PERPLEXITY_UNITS):
        return ROLLING
    return GENERATIVE


# ---------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------


def _keyed(samples: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, int], Mapping[str, Any]]:
    """Samples by (filter, doc_id, occurrence): repeated requests of a document match in order."""
    keyed: dict[tuple[str, str, int], Mapping[str, Any]] = {}
    seen: dict[tuple[str, str], int] = {}
    for sample in samples:
        base = (str(sample.get("filter", "none")), json.dumps(sample.get("doc_id"), sort_keys=True))
        keyed[(base[0], base[1], seen.get(base, 0))] = sample
        seen[base] = seen.get(base, 0) + 1
    return keyed


def _compare_loglikelihood(record: SampleDrift, clean: Mapping[str, Any], faulty: Mapping[str, Any]) -> bool:
    """Fill the choice figures; False when the pair has different numbers of choices."""
    clean_pairs, faulty_pairs = _pairs(clean), _pairs(faulty)
    if len(clean_pairs) != len(faulty_pairs) or not clean_pairs:
        return False
    lc, lf = [pair[0] for pair in clean_pairs], [pair[0] for pair in faulty_pairs]
    record.clean_choice, record.faulty_choice = lm_eval_argmax(lc), lm_eval_argmax(lf)
    record.flipped = record.clean_choice != record.faulty_choice
    record.tied = is_tied(lf)
    record.greedy_changed = any(c[1] != f[1] for c, f in zip(clean_pairs, faulty_pairs, strict=True))
    record.finite = all(math.isfinite(value) for value in lc + lf)
    record.agrees = record.finite and top_choices(lc) == top_choices(lf)
    if record.finite:
        record.abs_delta_ll = sum(abs(f - c) for c, f in zip(lc, lf, strict=True)) / len(lc)
        record.kl = kl_divergence(lc, lf)
    return True


def _compare_generative(record: SampleDrift, clean: Mapping[str, Any], faulty: Mapping[str, Any]) -> None:
    """Fill exact agreement and the first divergent token of the generated text."""
    clean_text, faulty_text = _text(clean), _text(faulty)
    record.identical = clean_text == faulty_text
    record.first_divergent_token = None if record.identical else first_divergent_token(clean_text, faulty_text)
    record.prompt, record.clean_text, record.faulty_text = _prompt(clean) or _prompt(faulty), clean_text, faulty_text


def _compare_rolling(
    record: SampleDrift, clean: Mapping[str, Any], faulty: Mapping[str, Any]
) -> tuple[float, float, float | None, str | None]:
    """Fill the sample's perplexity ratio; return (ll clean, ll faulted, units, unit) for the aggregate."""
    ll_clean, units, unit = _rolling(clean)
    ll_faulty, _, _ = _rolling(faulty)
    record.finite = math.isfinite(ll_clean) and math.isfinite(ll_faulty)
    if record.finite and units:
        record.perplexity_ratio = safe_exp((ll_clean - ll_faulty) / units)
    return ll_clean, ll_faulty, units, unit


def _metric_deltas(clean: Mapping[str, Any], faulty: Mapping[str, Any]) -> dict[str, float]:
    """faulted − clean for each numeric per-sample metric both samples carry."""
    a, b = _numeric_metrics(clean), _numeric_metrics(faulty)
    return {name: b[name] - a[name] for name in a if name in b}


def _rolling_ratio(rows: list[tuple[float, float, float | None, str | None]]) -> tuple[float | None, str | None]:
    """Perplexity(faulted) / perplexity(clean) over the finite samples.

    With units (words, bytes) this is exp((Σ ll_clean − Σ ll_faulted) / Σ units), the ratio of
    lm-eval's own word (or byte) perplexities. Without them it is exp(mean ll_clean − mean ll_faulted),
    the ratio of per-document exp(−mean log-likelihood), labelled "document"."""
    finite = [row for row in rows if math.isfinite(row[0]) and math.isfinite(row[1])]
    if not finite:
        return None, None
    if all(row[2] for row in finite):
        units = sum(row[2] or 0.0 for row in finite)
        return safe_exp(sum(row[0] - row[1] for row in finite) / units), finite[0][3]
    return safe_exp(sum(row[0] - row[1] for row in finite) / len(finite)), "document"


def compare_samples(
    clean_samples: Sequence[Mapping[str, Any]],
    faulty_samples: Sequence[Mapping[str, Any]],
    output_type: str | None = None,
    task: str = "",
) -> TaskDrift:
    """Drift of `faulty_samples` against `clean_samples` of one task (lm-eval sample dicts, as read
    from `samples_*.jsonl` or as returned in memory). `output_type` is lm-eval's
    (multiple_choice, loglikelihood, loglikelihood_rolling, generate_until); None infers it."""
    output_type = output_type or infer_output_type(clean_samples or faulty_samples)
    clean, faulty = _keyed(clean_samples), _keyed(faulty_samples)
    filters = sorted({key[0] for key in (*clean, *faulty)})
    result = TaskDrift(task=task, output_type=output_type, filter=filters[0] if len(filters) == 1 else "+".join(filters))
    result.only_clean = sum(key not in faulty for key in clean)
    result.only_faulty = sum(key not in clean for key in faulty)
    rolling_rows: list[tuple[float, float, float | None, str | None]] = []
    for key in (key for key in clean if key in faulty):
        pair = clean[key], faulty[key]
        record = SampleDrift(doc_id=pair[0].get("doc_id"), filter=key[0], index=key[2])
        if output_type in LOGLIKELIHOOD_TYPES:
            if not _compare_loglikelihood(record, *pair):
                result.mismatched += 1
                continue
        elif output_type == ROLLING:
            rolling_rows.append(_compare_rolling(record, *pair))
        else:
            _compare_generative(record, *pair)
        record.metric_deltas = _metric_deltas(*pair)
        result.doc_hash_differs += pair[0].get("doc_hash") != pair[1].get("doc_hash")
        result.samples.append(record)
    _aggregate(result, rolling_rows)
    return result


def _aggregate(result: TaskDrift, rolling_rows: list[tuple[float, float, float | None, str | None]]) -> None:
    """The task's figures from its per-sample records."""
    samples = result.samples
    result.matched = len(samples)
    result.nonfinite = sum(not sample.finite for sample in samples)
    names = sorted({name for sample in samples for name in sample.metric_deltas})
    result.metric_deltas = {
        name: mean
        for name in names
        if (mean := _mean(sample.metric_deltas[name] for sample in samples if name in sample.metric_deltas)) is not None
    }
    if result.output_type in LOGLIKELIHOOD_TYPES:
        _aggregate_loglikelihood(result)
    elif result.output_type == ROLLING:
        result.perplexity_ratio, result.perplexity_unit = _rolling_ratio(rolling_rows)
    else:
        result.exact_agreement = sum(bool(sample.identical) for sample in samples) / len(samples) if samples else None
        divergences = [sample.first_divergent_token for sample in samples if sample.first_divergent_token is not None]
        result.diverged = sum(sample.identical is False for sample in samples)
        result.mean_first_divergence = sum(divergences) / len(divergences) if divergences else None
    _add_notes(result)


def _aggregate_loglikelihood(result: TaskDrift) -> None:
    """Flips, agreement (same top choices), ties, tie-kept answers, and the means over finite samples."""
    samples = result.samples
    result.flips = sum(bool(sample.flipped) for sample in samples)
    result.ties = sum(bool(sample.tied) for sample in samples)
    result.greedy_changes = sum(bool(sample.greedy_changed) for sample in samples)
    result.tie_kept = sum(sample.finite and not sample.flipped and not sample.agrees for sample in samples)
    result.agreement = sum(bool(sample.agrees) for sample in samples) / len(samples) if samples else None
    result.mean_abs_delta_ll = _mean(sample.abs_delta_ll for sample in samples if sample.abs_delta_ll is not None)
    result.mean_kl = _mean(sample.kl for sample in samples if sample.kl is not None)


def _add_notes(result: TaskDrift) -> None:
    """Say what the figures leave out."""
    if result.only_clean or result.only_faulty:
        result.notes.append(f"{result.only_clean} sample(s) only in the clean run, {result.only_faulty} only in the faulted run")
    if result.mismatched:
        result.notes.append(f"{result.mismatched} matched sample(s) have different numbers of choices: left out")
    if result.doc_hash_differs:
        result.notes.append(f"{result.doc_hash_differs} matched sample(s) have a different doc_hash: not the same documents?")
    if result.nonfinite:
        result.notes.append(f"{result.nonfinite} sample(s) with a non-finite log-likelihood: left out of the means and ratios")
    if result.perplexity_unit == "document":
        result.notes.append("no word/byte counts in the samples: the perplexity ratio is exp(mean ll_clean − mean ll_faulted) per document")
