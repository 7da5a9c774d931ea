"""The embedded demo model, the `faults_demo` task and the study's MMLU tasks, offline.

These pin what every fault experiment relies on: a healthy demo model is clearly right, a
wrecked one is at chance, and the MMLU tasks read local CSVs with the right gold letters and
score generated answers by their letter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lm_eval_faults.harness.package_data import demo_model_dir
from lm_eval_faults.tasks.faults_demo import demo_data
from lm_eval_faults.tasks.mmlu_faults.answer_letter import extract_letter
from lm_eval_faults.tasks.mmlu_faults.mmlu_data import ENV_VAR, load_mmlu, read_csv

from conftest import SHARED

MMLU_DIR = SHARED / "data" / "mmlu"
needs_mmlu = pytest.mark.skipif(
    not MMLU_DIR.is_dir(),
    reason=f"local MMLU CSVs not found at {MMLU_DIR} (../shared/data/mmlu from the repo root, or LM_EVAL_FAULTS_SHARED)",
)
SUBJECTS = {"astronomy": 152, "high_school_computer_science": 100}


def demo_accuracy(model_dir: Path) -> float:
    """`faults_demo` accuracy of the model in `model_dir`, through lm-eval's plain `hf` model."""
    import lm_eval

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=["faults_demo"],
        device="cpu",
        batch_size=64,
    )
    return results["results"]["faults_demo"]["acc,none"]


def test_demo_model_loads_offline() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir(), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir(), local_files_only=True)
    assert model.config.model_type == "llama"
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token} == {
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    }
    assert tokenizer("What is 1 plus 2?")["input_ids"][0] == tokenizer.bos_token_id


def test_faults_demo_is_discovered_and_prompts_match_training() -> None:
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    assert "faults_demo" in manager.all_tasks
    task = manager.load("faults_demo")["tasks"]["faults_demo"]
    docs = list(task.test_docs())
    assert len(docs) == demo_data.TEST_SIZE
    assert [task.doc_to_text(doc) for doc in docs] == [demo_data.format_prompt(doc) for doc in docs]


def test_demo_test_split_is_balanced_and_held_out() -> None:
    docs = demo_data.test_docs()
    assert [sum(doc["answer"] == gold for doc in docs) for gold in range(4)] == [demo_data.TEST_SIZE // 4] * 4
    held_out = {demo_data.format_prompt(doc) for doc in docs}
    stream = demo_data.training_docs(seed=0)
    assert not any(demo_data.format_prompt(next(stream)) in held_out for _ in range(20000))


def test_clean_demo_model_scores_high() -> None:
    assert demo_accuracy(demo_model_dir()) >= 0.9


def test_damaged_demo_model_scores_near_chance(tmp_path: Path) -> None:
    """Overwrite every decoder-layer weight matrix with noise of the same scale."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir(), local_files_only=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.model.layers.parameters():
            if weight.dim() == 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * weight.std())
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(demo_model_dir()).save_pretrained(tmp_path)
    assert abs(demo_accuracy(tmp_path) - 0.25) <= 0.12


@pytest.mark.parametrize(
    "response, letter",
    [
        ("B", "B"),
        (" B.", "B"),
        ("The answer is B", "B"),
        ("b", "B"),
        ("(C)", "C"),
        ("\n\nD\n\nQuestion:", "D"),
        ("A. 42", "A"),
        ("Answer: (c)", "C"),
        ("I don't know", ""),
        ("A good question.", ""),
        ("", ""),
    ],
)
def test_extract_letter(response: str, letter: str) -> None:
    assert extract_letter(response) == letter


@needs_mmlu
def test_read_csv_keeps_quotes_and_newlines() -> None:
    astronomy = read_csv(MMLU_DIR / "test" / "astronomy_test.csv", "astronomy")
    assert astronomy[0]["question"] == 'What is true for a type-Ia ("type one-a") supernova?'
    assert astronomy[0]["choices"][0] == "This type occurs in binary systems."
    assert [row["answer"] for row in astronomy[:2]] == [0, 3]
    computing = read_csv(MMLU_DIR / "test" / "high_school_computer_science_test.csv", "high_school_computer_science")
    assert "\n" in computing[6]["question"] and computing[6]["answer"] == 1


@needs_mmlu
def test_mmlu_dir_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(MMLU_DIR))
    dataset = load_mmlu("astronomy", pretrained="ignored-model-arg")
    assert {split: len(rows) for split, rows in dataset.items()} == {"dev": 5, "validation": 16, "test": 152}


def test_missing_mmlu_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_mmlu("astronomy", mmlu_dir=str(tmp_path / "absent"))


@pytest.fixture(scope="module")
def mmlu_tasks() -> dict:
    """Both groups' tasks from the local CSVs, the directory named as `--metadata` would name it."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(metadata={"mmlu_dir": str(MMLU_DIR)})
    loaded = manager.load(["mmlu_faults_mc", "mmlu_faults_gen"])
    for protocol in ("mc", "gen"):
        assert sorted(loaded["group_map"][f"mmlu_faults_{protocol}"]) == [
            f"mmlu_faults_{protocol}_{subject}" for subject in sorted(SUBJECTS)
        ]
    return loaded["tasks"]


@needs_mmlu
def test_mc_tasks_have_four_choices_and_gold_letters(mmlu_tasks: dict) -> None:
    for subject, size in SUBJECTS.items():
        task = mmlu_tasks[f"mmlu_faults_mc_{subject}"]
        task.build_all_requests(limit=None, rank=0, world_size=1)
        assert len(task.instances) == 4 * size
        assert [instance.args[1] for instance in task.instances[:4]] == [" A", " B", " C", " D"]
    astronomy = mmlu_tasks["mmlu_faults_mc_astronomy"]
    first, second = list(astronomy.test_docs())[:2]
    assert (astronomy.doc_to_target(first), astronomy.doc_to_target(second)) == (0, 3)
    context = astronomy.instances[0].args[0]
    assert context.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n")
    assert context.endswith("D. This type produces high amounts of X-rays.\nAnswer:")
    assert context.count("\nAnswer:") == 2  # one shot from dev, then the question


@needs_mmlu
def test_gen_task_prompt_and_letter_scoring(mmlu_tasks: dict) -> None:
    task = mmlu_tasks["mmlu_faults_gen_astronomy"]
    task.build_all_requests(limit=4, rank=0, world_size=1)
    context = task.instances[0].args[0]
    assert "\nAnswer: D\n\nWhat is true for a type-Ia" in context
    assert context.endswith("Answer:\n\nOutput 'A', 'B', 'C', or 'D'. Full answer not needed.")
    docs = list(task.test_docs())[:4]
    assert [task.doc_to_target(doc) for doc in docs] == ["A", "D", "C", "C"]
    responses = [" A.", "The answer is b", "I don't know", "b"]
    for instance, response in zip(task.instances, responses, strict=False):
        instance.resps = [response]
    task.apply_filters()
    filtered = [instance.filtered_resps["letter"] for instance in task.instances]
    assert filtered == ["A", "B", "", "B"]
