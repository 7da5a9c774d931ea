"""`faults_facts`: easy factual completions a small real LM gets right, so damage has room to show.

MMLU sits at chance for 100M-parameter models (SmolLM2-135M scores 0.29), so a fault cannot
lower it. Capitals of well-known countries are completions such models know: the task scores
the log-likelihood of " Paris" after "The capital of France is" against three other capitals,
the lm-eval way (`multiple_choice`, `acc`). The distractors are drawn from the same list with a
fixed seed, so the data is deterministic and generated here, not downloaded.
"""

from __future__ import annotations

import random
from typing import Any

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Poland": "Warsaw",
    "Ireland": "Dublin",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Belgium": "Brussels",
    "the Netherlands": "Amsterdam",
    "the United Kingdom": "London",
    "South Korea": "Seoul",
    "Thailand": "Bangkok",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Kenya": "Nairobi",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Cuba": "Havana",
    "Mexico": "Mexico City",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "India": "New Delhi",
    "the Czech Republic": "Prague",
    "Switzerland": "Bern",
    "Ukraine": "Kyiv",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "Iceland": "Reykjavik",
}
SEED = 2024


def test_docs() -> list[dict[str, Any]]:
    """One question per country: the true capital among three others, at a seeded position."""
    rng = random.Random(SEED)
    capitals = list(CAPITALS.values())
    docs = []
    for country, capital in CAPITALS.items():
        choices = rng.sample([c for c in capitals if c != capital], 3)
        answer = rng.randrange(4)
        choices.insert(answer, capital)
        docs.append({"country": country, "choices": choices, "answer": answer})
    return docs


def load_dataset(**_: Any):
    """`custom_dataset` hook for the task YAML; lm-eval passes its metadata as keywords, unused here."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_list(test_docs())})
