"""Synthetic MMLU-format questions for the embedded demo model and the `faults_demo` task.

The demo must show, in seconds on a laptop CPU, a model that is clearly right when healthy and
falls to chance when its weights are damaged. Single-digit addition is a closed set of 100 facts
that a sub-million-parameter model learns completely, so its clean accuracy is near 1.0.

The task is about that closed set of facts: every evaluation question asks a fact the model was
trained on, but with its own draw of distractors and answer position. No evaluation prompt
(question plus its four options in order) ever occurs in the training stream
(`training_docs` skips them), so a high score needs the sum and the matching option, not a
memorized prompt.

Docs use the `cais/mmlu` schema (question, subject, choices, answer index), so the task YAML is
the same as lm-eval's own MMLU. Pure Python at import time: lm-eval imports this module while
it builds the task, and the training script imports it too.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import DatasetDict

SUBJECT = "arithmetic"
LETTERS = ("A", "B", "C", "D")
MAX_OPERAND = 9
MAX_SUM = 2 * MAX_OPERAND
TEST_SIZE = 160
DEV_SIZE = 5
TEST_SEED = 20240917
DEV_SEED = 20240918

Doc = dict[str, Any]


def make_doc(a: int, b: int, gold: int, rng: random.Random) -> Doc:
    """One question 'What is a plus b?' with the sum at option `gold` and three distinct distractors."""
    total = a + b
    distractors = rng.sample([n for n in range(MAX_SUM + 1) if n != total], 3)
    choices = [str(n) for n in distractors]
    choices.insert(gold, str(total))
    return {"question": f"What is {a} plus {b}?", "subject": SUBJECT, "choices": choices, "answer": gold}


def _fixed_docs(size: int, seed: int) -> list[Doc]:
    """A reproducible evaluation split with the gold letter balanced over A-D."""
    rng = random.Random(seed)
    golds = [i % len(LETTERS) for i in range(size)]
    rng.shuffle(golds)
    return [make_doc(rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND), gold, rng) for gold in golds]


def test_docs() -> list[Doc]:
    """The `faults_demo` test split."""
    return _fixed_docs(TEST_SIZE, TEST_SEED)


def dev_docs() -> list[Doc]:
    """A small few-shot pool, as MMLU's dev split, for runs with `--num_fewshot`."""
    return _fixed_docs(DEV_SIZE, DEV_SEED)


def _prompt_key(doc: Doc) -> tuple[str, ...]:
    return (doc["question"], *doc["choices"])


def training_docs(seed: int) -> Iterator[Doc]:
    """An endless, reproducible stream of training questions that never repeats an evaluation prompt."""
    held_out = {_prompt_key(doc) for doc in test_docs() + dev_docs()}
    rng = random.Random(seed)
    while True:
        doc = make_doc(rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND), rng.randrange(len(LETTERS)), rng)
        if _prompt_key(doc) not in held_out:
            yield doc


def format_prompt(doc: Doc) -> str:
    """The prompt exactly as lm-eval's MMLU `doc_to_text` renders it (ends with 'Answer:')."""
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, doc["choices"], strict=False))
    return f"{doc['question'].strip()}{options}\nAnswer:"


def format_example(doc: Doc) -> str:
    """Prompt plus gold letter, as lm-eval scores it (target delimiter is one space)."""
    return f"{format_prompt(doc)} {LETTERS[doc['answer']]}"


def load_dataset(**_: Any) -> DatasetDict:
    """`custom_dataset` hook for the task YAML; lm-eval passes its metadata as keywords, unused here."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_list(test_docs()), "dev": Dataset.from_list(dev_docs())})
