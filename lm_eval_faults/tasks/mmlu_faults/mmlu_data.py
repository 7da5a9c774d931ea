"""MMLU for the study's tasks: from the hub (`cais/mmlu`) by default, or from local Hendrycks CSVs.

Fault-injection sweeps run many evaluations, often on machines without internet, so the tasks in
`tasks/mmlu_faults/` read the original CSV release when told where it is, and the hub otherwise.
The directory comes from lm-eval's `--metadata '{"mmlu_dir": "..."}'` or, failing that, the
`MMLU_DIR` environment variable; it holds `dev/`, `val/` and `test/` with files such as
`astronomy_test.csv` (no header; question, A, B, C, D, answer letter; fields may contain quoted
newlines, hence the csv module).

Either way the docs have the `cais/mmlu` schema and split names (`dev`, `validation`, `test`),
so one task YAML serves both sources. Pure Python at import time.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import DatasetDict

ENV_VAR = "MMLU_DIR"
METADATA_KEY = "mmlu_dir"
HUB_DATASET = "cais/mmlu"
LETTERS = "ABCD"
# Split name in cais/mmlu -> (folder, file suffix) in the Hendrycks release.
LOCAL_SPLITS = {"dev": ("dev", "dev"), "validation": ("val", "val"), "test": ("test", "test")}


def read_csv(path: Path, subject: str) -> list[dict[str, Any]]:
    """Rows of one Hendrycks CSV as `cais/mmlu` docs: question, subject, choices, answer index."""
    with path.open(newline="", encoding="utf-8") as handle:
        return [
            {
                "question": question,
                "subject": subject,
                "choices": [a, b, c, d],
                "answer": LETTERS.index(answer.strip().upper()),
            }
            for question, a, b, c, d, answer in csv.reader(handle)
        ]


def resolve_mmlu_dir(mmlu_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The local MMLU directory: the explicit argument (task metadata), else `$MMLU_DIR`, else None."""
    chosen = mmlu_dir or os.environ.get(ENV_VAR)
    if not chosen:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"MMLU directory {path} (from {METADATA_KEY} / ${ENV_VAR}) does not exist")
    return path


def load_local(mmlu_dir: Path, subject: str) -> DatasetDict:
    """The subject's dev, validation and test splits from a Hendrycks-format directory."""
    from datasets import Dataset, DatasetDict

    return DatasetDict(
        {
            split: Dataset.from_list(read_csv(mmlu_dir / folder / f"{subject}_{suffix}.csv", subject))
            for split, (folder, suffix) in LOCAL_SPLITS.items()
        }
    )


def load_mmlu(subject: str, mmlu_dir: str | None = None, **_: Any) -> DatasetDict:
    """`custom_dataset` hook: lm-eval passes task metadata (incl. `--metadata`, model args) and `dataset_kwargs`."""
    local = resolve_mmlu_dir(mmlu_dir)
    if local is not None:
        return load_local(local, subject)
    import datasets

    return datasets.load_dataset(HUB_DATASET, subject)
