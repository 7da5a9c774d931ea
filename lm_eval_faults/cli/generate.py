"""`lm-eval-faults generate`: clean and faulted generations side by side, as a page and a table.

    lm-eval-faults generate --prompt "What is the capital of France?" \\
        --faults site=activations,act_scope=all --p 1e-7,1e-6,1e-5 --out gen/

Prompts come from `--prompt` (repeatable), `--prompts FILE` (one per line) or the documents of an
lm-eval generative task (`--task NAME --limit N`); the ladder from `--p` over the `--faults` keys
and from `--spec` (repeatable, whole specs). Greedy decoding: every output is a function of
(model, prompt, spec). Every spec is checked before the model loads; the page and the JSON are
written under `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from lm_eval_faults.cli.paths import check_output_path, prepare_output_path
from lm_eval_faults.core.spec import FaultSpec, FaultSpecError, parse_arg_string, parse_fault_args, to_spec
from lm_eval_faults.core.text_table import Column, text_table
from lm_eval_faults.harness.loading import LOAD_KEYS, load_model
from lm_eval_faults.harness.package_data import demo_model_dir
from lm_eval_faults.harness.preflight import check_against_config, read_config
from lm_eval_faults.study.generation import Generator, PromptResult, compare_prompt
from lm_eval_faults.study.progress import ProgressLine
from lm_eval_faults.study.side_by_side import FaultedView, PromptView, side_by_side_page

RRAM_PROMPT = "Could you please explain Quantum Gravity to me?"
"""The RRAM study's prompt: the default when no prompt is given."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pretrained", nargs="?", help="model path or hub id (default: the embedded demo model)")
    parser.add_argument("--model_args", default="", help="how to load it: dtype=bfloat16,gguf_file=F,... (no fault keys)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; default: the RRAM study's)")
    parser.add_argument("--prompts", default=None, help="a text file of prompts, one per line")
    parser.add_argument(
        "--task", default=None, help="an lm-eval generative task whose documents are the prompts (its stop strings end every text)"
    )
    parser.add_argument("--limit", type=int, default=5, help="documents of --task to use (default 5)")
    parser.add_argument("--include_path", default=None, help="extra lm-eval task directory for --task")
    parser.add_argument("--faults", default="", help="fault keys shared by the --p ladder: site=activations,act_scope=all")
    parser.add_argument("--p", default=None, help="rates of the ladder, comma-separated: 1e-7,1e-6,1e-5")
    parser.add_argument("--spec", action="append", default=[], help="a whole spec as a ladder rung (repeatable): p=1e-6,site=kv_cache")
    parser.add_argument("--max_new_tokens", type=int, default=48, help="tokens generated per text (default 48)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template (instruct models)")
    parser.add_argument("--out", default=None, help="directory for generations.html and generations.json")


def ladder(args: argparse.Namespace) -> list[tuple[str, FaultSpec]]:
    """(label, spec) per rung: `--p` over `--faults`, then each `--spec`; all validated now."""
    base = parse_arg_string(args.faults)
    if "p" in base:
        raise FaultSpecError(f"--faults {args.faults!r}: give the rates with --p, not p= in --faults")
    rungs: list[tuple[str, FaultSpec]] = []
    for text in (args.p or "").split(","):
        if text.strip():
            label = ",".join([f"p={text.strip()}", *(f"{k}={v}" for k, v in base.items())])
            rungs.append((label, to_spec({**base, "p": text.strip()})))
    for text in args.spec:
        spec = to_spec(text)
        if not spec.active and "p" not in parse_arg_string(text):
            raise FaultSpecError(f"--spec {text!r} injects nothing: give it a rate (p=, or p01=/p10=); p=0 makes a clean rung")
        rungs.append((text, spec))
    if not rungs:
        raise FaultSpecError("generate needs a ladder: --p 1e-7,1e-6 (with --faults keys) or --spec p=1e-6,site=kv_cache")
    return rungs


def prompts_of(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The prompts, and the strings that end every text (an lm-eval task's `until`, with --task)."""
    prompts = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {args.prompts!r} is not a file")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"--prompts {args.prompts!r} holds no prompt (one per line; blank lines are skipped)")
        prompts += lines
    stop: list[str] = []
    if args.task:
        task_texts, stop = task_prompts(args.task, args.limit, args.include_path)
        prompts += task_texts
    return prompts or [RRAM_PROMPT], stop


def task_prompts(task: str, limit: int, include_path: str | None) -> tuple[list[str], list[str]]:
    """The first `limit` documents of an lm-eval generative task, as its own `doc_to_text` writes
    them, and its stop strings (`generation_kwargs.until`), which end each text as lm-eval ends it."""
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=include_path)
    if task not in manager.all_tasks:
        raise ValueError(f"--task {task!r} is not an lm-eval task here (see `lm_eval --tasks list`; --include_path adds a directory)")
    found = get_task_dict([task], manager)[task]
    if found.get_config("output_type") != "generate_until":
        raise ValueError(f"--task {task!r} is a {found.get_config('output_type')} task; generate needs a generate_until task")
    docs = found.test_docs() if found.has_test_docs() else found.validation_docs()
    until = (found.get_config("generation_kwargs") or {}).get("until") or []
    stop = [until] if isinstance(until, str) else [str(item) for item in until]
    return [str(found.doc_to_text(doc)) for _, doc in zip(range(limit), docs, strict=False)], stop


def main(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens} is invalid: at least 1 token")
    if args.limit < 1:
        raise ValueError(f"--limit {args.limit} is invalid: at least 1 document")
    rungs = ladder(args)
    model_args = parse_arg_string(args.model_args)
    if args.pretrained:
        model_args["pretrained"] = args.pretrained
    spec_keys, load_args = parse_fault_args(model_args, passthrough=LOAD_KEYS)
    if spec_keys.active:
        raise FaultSpecError("--model_args loads the model; give fault keys with --faults/--p or --spec")
    if args.out:
        check_output_path("--out", str(Path(args.out) / "generations.html"))
    prompts, stop = prompts_of(args)
    load_config = {"pretrained": str(demo_model_dir()), **load_args}
    config = read_config(load_config)
    for _, spec in rungs:
        check_against_config(spec, load_config, config)
    model = load_model(load_args)
    tokenizer = load_tokenizer(load_config)
    generator = Generator(model, tokenizer, max_new_tokens=args.max_new_tokens, chat=args.chat, stop=stop)
    results: list[PromptResult] = []
    with ProgressLine("lm-eval-faults generate", len(prompts) * len(rungs), unit="generations") as line:
        for prompt in prompts:
            results.append(compare_prompt(generator, prompt, rungs, progress=lambda: line.advance("")))
    print(summary_table(results))
    if args.out:
        write_outputs(Path(args.out), results, str(load_config["pretrained"]))
    return 0


def load_tokenizer(load_config: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    kwargs = {key: load_config[key] for key in ("gguf_file", "revision", "subfolder") if key in load_config}
    return AutoTokenizer.from_pretrained(load_config["pretrained"], **kwargs)


def _format(value: float | None, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else format(value, spec)


def summary_table(results: list[PromptResult]) -> str:
    columns = [
        Column("prompt", 7, align="<"),
        Column("spec", 44, align="<"),
        Column("class", 11, align="<"),
        Column("diverges at", 12, align=">"),
        Column("clean gap", 10, align=">"),
        Column("ppl ratio", 10, align=">"),
        Column("faults", 9, align=">"),
        Column(" text", 42, align="<"),
    ]
    rows = []
    for number, result in enumerate(results, 1):
        rows.append((str(number), "clean", "", "", "", f"ppl {result.clean_perplexity:.3g}", "", _snippet(result.clean.text)))
        for item in result.faulted:
            hits = sum(value for key, value in item.faults.items() if key.endswith("_hit"))
            rows.append(
                (
                    "",
                    item.label,
                    item.failure,
                    "-" if item.first_divergence is None else str(item.first_divergence),
                    _format(item.clean_gap),
                    _format(item.perplexity_ratio),
                    f"{hits:,}",
                    _snippet(item.generated.text),
                )
            )
    return "\n".join(text_table(columns, rows))


def _snippet(text: str, width: int = 40) -> str:
    """The text on one line, cut to `width`, after a space that parts it from the column before."""
    flat = " ".join(text.split())
    return " " + (flat if len(flat) <= width else flat[: width - 1] + "…")


def views_of(results: list[PromptResult]) -> list[PromptView]:
    views = []
    for number, result in enumerate(results, 1):
        faulted = [
            FaultedView(
                label=item.label,
                pieces=item.generated.pieces,
                diverges_at=item.first_divergence,
                clean_diverges_at=item.first_divergence,
                failure=item.failure,
                figures={
                    "diverges at token": "-" if item.first_divergence is None else str(item.first_divergence),
                    "clean log-prob gap": _format(item.clean_gap),
                    "faulted log-prob gap": _format(item.faulted_gap),
                    "perplexity": _format(item.perplexity),
                    "ratio to clean": _format(item.perplexity_ratio),
                    "faults": f"{sum(v for k, v in item.faults.items() if k.endswith('_hit')):,}",
                },
            )
            for item in result.faulted
        ]
        views.append(PromptView(f"prompt {number}", result.prompt, result.clean.pieces, faulted))
    return views


def write_outputs(out: Path, results: list[PromptResult], model: str) -> None:
    page = side_by_side_page(f"Clean and faulted generations: {Path(model).name}", views_of(results))
    Path(prepare_output_path(str(out / "generations.html"))).write_text(page, encoding="utf-8")
    data = {"model": model, "prompts": [result.to_dict() for result in results]}
    (out / "generations.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out / 'generations.html'} and {out / 'generations.json'}")
