"""Forward time with activation faults against the unfaulted forward, and the cost per hook call.

    python bench/bench_activations.py                      # SmolLM2-135M (fp32), 1 thread, batch 4x32
    python bench/bench_activations.py --rounds 25 --memory-calls 10000

Everything runs in one process on one loaded model. A configuration is a rate p, a scope
(`act_scope=leaf`: leaf modules' outputs; `all`: every module's, nested) and a stream mode:

- `call`: plain `inject(model, site=activations)`: each module output draws from its CALL stream;
- `request`: what `faulty_hf` does: `next_forward(Rows(...))` before every forward, so each row of
  a batch-first output draws from its own REQUEST stream (keyed by the row's tokens).

Each round visits every configuration (the order rotating from round to round): inject, one
untimed forward (the first forward of an injection has no plan yet), one timed faulted forward,
restore, one timed unfaulted forward. A faulted forward's ratio is to the mean of the unfaulted
forwards just before and after it, so drift on a shared machine cancels; each figure is a median
over the rounds. Times are this process's CPU time (`--clock cpu`; the other processes of a shared
machine stretch wall time, not the CPU time of a model on one thread).

Per configuration: the faulted forward, the ratio, hook calls and hit elements per forward, and
two per-hook costs in microseconds: `us/hook`, the whole overhead, (ratio - 1) x unfaulted forward
/ hook calls; `in hooks`, the time measured inside the hooks (the planning pass included) per
call, which excludes torch's hook dispatch and the caches the hooks cost the model, and is much
less noisy. On a GPU the model's forward is faster but a hook's work is not (it is host Python
and numpy, plus a device gather and scatter of the hit words, which waits for the device), so
the overhead there is about hook calls x this cost / the GPU's forward time.

Then a memory check: `--memory-calls` hook calls (module calls, as the report counts them) at
the largest p, scope `all`, request mode, after a warm-up, in two halves; prints the growth of
the process RSS, of all memory traced by tracemalloc (Python and numpy allocations; the model's
own code drifts by a few KiB) and of the part this package's code allocated and still holds (in
the first half, counters crossing Python's small-int cache add a few KiB once: flat means the
second half adds nothing).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lm_eval_faults import inject
from lm_eval_faults.core.injection import Injection
from lm_eval_faults.core.injectors import activations
from lm_eval_faults.core.injectors.activations import Rows
from lm_eval_faults.core.random.streams import request_key
from torch import nn

SMOLLM = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
Config = tuple[float, str, str]
"""p, act_scope, stream mode."""

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def load_model(directory: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model: nn.Module = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF, dtype=torch.float32)
    return model.eval()


def forward_fn(model: nn.Module, ids: torch.Tensor, injection: Injection, mode: str) -> Callable[[], None]:
    """One forward pass, preceded (in request mode) by the rows declaration `faulty_hf` makes."""
    rows = None
    if mode == "request":
        keys = np.array([request_key(row) for row in ids.tolist()], dtype=np.uint64)
        rows = Rows(keys, np.zeros(len(ids), dtype=np.int64), np.full(len(ids), ids.shape[1], dtype=np.int64), ids.shape[1])

    def run() -> None:
        if rows is not None:
            injection.next_forward(rows)
        try:
            model(ids)
        finally:
            if rows is not None:
                injection.next_forward(None)

    return run


def hook_calls(injection: Injection) -> int:
    return sum(site.calls for site in injection.report.activations.values())


def hit_elements(injection: Injection) -> int:
    return sum(site.hit_elements for site in injection.report.activations.values())


class HookTimer:
    """Wall time spent inside the fault hooks (the planning pass runs inside the first one)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._call = activations._OutputFaultHook.__call__

    def __enter__(self) -> HookTimer:
        call, timer = self._call, self

        def timed(hook: Any, *args: Any) -> Any:
            start = time.perf_counter_ns()
            try:
                return call(hook, *args)
            finally:
                timer.seconds += (time.perf_counter_ns() - start) * 1e-9

        activations._OutputFaultHook.__call__ = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc_info: Any) -> None:
        activations._OutputFaultHook.__call__ = self._call  # type: ignore[method-assign]


@dataclass(frozen=True)
class Sample:
    """One faulted forward, with the mean of the unfaulted forwards just before and after it."""

    faulted: float
    clean: float
    hook_calls: int
    hits: int
    in_hooks: float

    @property
    def ratio(self) -> float:
        return self.faulted / self.clean


def time_clean(model: nn.Module, ids: torch.Tensor, clock: Callable[[], float]) -> float:
    start = clock()
    model(ids)
    return clock() - start


def sample(model: nn.Module, ids: torch.Tensor, config: Config, clock: Callable[[], float], clean_before: float) -> tuple[Sample, float]:
    """A sample of `config`, and the unfaulted forward that closed it (it opens the next one)."""
    p, scope, mode = config
    with inject(model, p=p, site="activations", act_scope=scope) as injection:
        run = forward_fn(model, ids, injection, mode)
        run()
        calls, hits = hook_calls(injection), hit_elements(injection)
        with HookTimer() as timer:
            start = clock()
            run()
            faulted = clock() - start
        calls, hits = hook_calls(injection) - calls, hit_elements(injection) - hits
    clean_after = time_clean(model, ids, clock)
    return Sample(faulted, (clean_before + clean_after) / 2, calls, hits, timer.seconds), clean_after


def ours(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes still held that this package's code allocated."""
    return sum(stat.size for stat in snapshot.filter_traces([tracemalloc.Filter(True, "*/lm_eval_faults/*")]).statistics("filename"))


def memory_check(model: nn.Module, ids: torch.Tensor, p: float, calls: int) -> None:
    with inject(model, p=p, site="activations", act_scope="all") as injection:
        run = forward_fn(model, ids, injection, "request")
        for _ in range(3):
            run()
        half = max(1, int(np.ceil(calls / 2 / (hook_calls(injection) / 3))))
        tracemalloc.start()
        for _ in range(2):  # allocations that are made once (caches) land before the first reading
            run()
        readings = []
        start_calls = hook_calls(injection)
        for forwards in (0, half, half):
            for _ in range(forwards):
                run()
            gc.collect()
            readings.append((rss_mib(), tracemalloc.get_traced_memory()[0] / 1024, ours(tracemalloc.take_snapshot()) / 1024))
        tracemalloc.stop()
        done, hits = hook_calls(injection) - start_calls, hit_elements(injection)
    (rss0, all0, ours0), (rss1, all1, ours1), (rss2, all2, ours2) = readings
    print(f"\nmemory: {done} hook calls ({2 * half} forwards, p={p:g}, act_scope=all, request mode, {hits} hit elements in all)")
    print(f"  RSS MiB:                         {rss0:.1f} -> {rss1:.1f} -> {rss2:.1f} ({rss1 - rss0:+.1f}, {rss2 - rss1:+.1f})")
    print(f"  traced KiB:                      {all0:.1f} -> {all1:.1f} -> {all2:.1f} ({all1 - all0:+.1f}, {all2 - all1:+.1f})")
    print(f"  held by lm_eval_faults code KiB: {ours0:.1f} -> {ours1:.1f} -> {ours2:.1f} ({ours1 - ours0:+.1f}, {ours2 - ours1:+.1f})")


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SMOLLM, help="directory holding the SmolLM2 GGUF")
    parser.add_argument("--p", default="1e-9,1e-5", help="comma-separated rates")
    parser.add_argument("--scopes", default="leaf,all")
    parser.add_argument("--modes", default="call,request")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu", help="cpu: this process's CPU time (default); wall: elapsed")
    parser.add_argument("--memory-calls", type=int, default=10_000, help="hook calls in the memory check (0: skip it)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    rates = [float(p) for p in args.p.split(",")]
    configs = [(p, scope, mode) for p in rates for scope in args.scopes.split(",") for mode in args.modes.split(",")]
    samples: dict[Config, list[Sample]] = {config: [] for config in configs}
    clock = CLOCKS[args.clock]
    print(f"{args.batch}x{args.length} tokens, {torch.get_num_threads()} thread(s), {args.clock} time, {args.rounds} rounds")
    with torch.no_grad():
        model(ids)
        clean = time_clean(model, ids, clock)
        for round_number in range(args.rounds):
            shift = round_number % len(configs)
            for config in configs[shift:] + configs[:shift]:
                taken, clean = sample(model, ids, config, clock, clean)
                samples[config].append(taken)

        cleans = [s.clean for taken in samples.values() for s in taken]
        print(f"unfaulted forward: {statistics.median(cleans) * 1e3:.1f} ms (median)\n")
        print(f"{'configuration':<24} {'forward ms':>10} {'ratio':>7} {'hooks/fwd':>9} {'hits/fwd':>9} {'us/hook':>8} {'in hooks':>9}")
        for config, taken in samples.items():
            ratio = statistics.median(s.ratio for s in taken)
            calls = statistics.median(s.hook_calls for s in taken)
            per_hook = (ratio - 1.0) * statistics.median(s.clean for s in taken) / calls * 1e6
            in_hooks = statistics.median(s.in_hooks / s.hook_calls for s in taken) * 1e6
            faulted = statistics.median(s.faulted for s in taken) * 1e3
            hits = statistics.median(s.hits for s in taken)
            name = f"p={config[0]:g} {config[1]} {config[2]}"
            print(f"{name:<24} {faulted:>10.1f} {ratio:>7.3f} {calls:>9.0f} {hits:>9.0f} {per_hook:>8.1f} {in_hooks:>9.1f}")
        if args.memory_calls:
            memory_check(model, ids, max(rates), args.memory_calls)


if __name__ == "__main__":
    main()
