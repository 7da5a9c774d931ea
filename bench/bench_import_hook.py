"""What the `.pth` import hook costs every Python process: whole `python -c pass` runs, side by side.

Three interpreters, interleaved round by round (the order rotates each round):

- `no plugin`: a throwaway venv on the same base interpreter whose site-packages holds every entry
  of this venv's site-packages (symlinked) except this package's own (`lm_eval_faults.pth`, the
  editable-install `.pth`, the dist-info), so the only difference is the plugin;
- `hook`: this venv's python, as every process on the machine runs it;
- `hook + opt-out`: the same with `LM_EVAL_FAULTS_NO_AUTOLOAD=1`.

Prints the median wall time of each, the differences from `no plugin`, and how many modules each
has in `sys.modules` at start. Run it with the venv's python:

    python bench/bench_import_hook.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

OPT_OUT = "LM_EVAL_FAULTS_NO_AUTOLOAD"


def is_ours(name: str) -> bool:
    name = name.lower().replace("-", "_")
    return name.startswith("lm_eval_faults") or ("editable" in name and "lm_eval_faults" in name)


def make_baseline_venv(root: Path) -> Path:
    """A venv identical to this one but without this package; returns its python."""
    if sys.prefix == sys.base_prefix:
        sys.exit("run this with the venv's python (the one the plugin is installed into)")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    ours = Path(sysconfig.get_paths()["purelib"])
    python = root / "bin" / "python"
    theirs = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    for entry in sorted(ours.iterdir()):
        if not is_ours(entry.name):
            (theirs / entry.name).symlink_to(entry)
    return python


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != OPT_OUT and not k.startswith("PYTHON")}
    env.update(extra)
    return env


def time_once(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
    return (time.perf_counter() - start) * 1e3


def module_count(python: str, env: dict[str, str]) -> int:
    code = "import sys; print(len(sys.modules))"
    return int(subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_import_hook_") as tmp:
        baseline = str(make_baseline_venv(Path(tmp) / "venv"))
        hooked = os.path.join(sys.prefix, "bin", "python")
        configs = {
            "no plugin": ([baseline, "-c", "pass"], clean_env()),
            "hook": ([hooked, "-c", "pass"], clean_env()),
            "hook + opt-out": ([hooked, "-c", "pass"], clean_env(**{OPT_OUT: "1"})),
        }
        names = list(configs)
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(args.warmup + args.rounds):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                elapsed = time_once(*configs[name])
                if i >= args.warmup:
                    times[name].append(elapsed)
        counts = {name: module_count(argv[0], env) for name, (argv, env) in configs.items()}

    base = statistics.median(times["no plugin"])
    print(f"python {sys.version.split()[0]}, {args.rounds} interleaved rounds of `python -c pass`")
    print(f"{'config':<16} {'median ms':>10} {'vs no plugin':>13} {'min ms':>8} {'modules':>8}")
    for name in names:
        med = statistics.median(times[name])
        print(f"{name:<16} {med:>10.2f} {med - base:>+13.2f} {min(times[name]):>8.2f} {counts[name]:>8}")


if __name__ == "__main__":
    main()
