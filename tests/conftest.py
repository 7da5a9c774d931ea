"""Shared fixtures: tiny models saved once per session, the tiny local task, the shared data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from tiny import save_tiny_model, write_tiny_task

# Tiny models gain nothing from threads, and on a busy 2-core machine two threads per process
# oversubscribe the cores (measured ~30x slower per forward).
torch.set_num_threads(1)

SHARED = Path(os.environ.get("LM_EVAL_FAULTS_SHARED") or Path(__file__).resolve().parents[2] / "shared")
"""The shared data (MMLU CSVs, SmolLM2): ../shared beside the repository, or LM_EVAL_FAULTS_SHARED
for a clone elsewhere, whose real-model tests would otherwise all skip."""
SMOLLM_DIR = SHARED / "models" / "smollm2-135m-instruct"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_task(tmp_path_factory.mktemp("tiny_tasks"))


@pytest.fixture(scope="session")
def task_manager(tiny_task_dir: Path):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tiny_task_dir))


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    if not (SMOLLM_DIR / SMOLLM_GGUF).is_file():
        pytest.skip(
            f"real-model test: {SMOLLM_DIR / SMOLLM_GGUF} is absent (see ../shared/models/README.md; set LM_EVAL_FAULTS_SHARED to the shared directory)"
        )
    return SMOLLM_DIR
