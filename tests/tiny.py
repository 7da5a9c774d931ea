"""Tiny models and tasks built in the tests themselves: no hub, no network, seconds to build."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = [
    "the",
    "a",
    "is",
    "of",
    "and",
    "to",
    "in",
    "what",
    "which",
    "color",
    "sky",
    "grass",
    "sun",
    "snow",
    "blue",
    "green",
    "yellow",
    "white",
    "red",
    "answer",
    "question",
]
VOCAB_SIZE = 128

COMMON = dict(vocab_size=VOCAB_SIZE, num_attention_heads=4)
FAMILIES: dict[str, tuple[type, dict]] = {
    "llama": (transformers.LlamaConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_key_value_heads=2, **COMMON)),
    "mistral": (
        transformers.MistralConfig,
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_key_value_heads=2, **COMMON),
    ),
    "qwen2": (transformers.Qwen2Config, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_key_value_heads=2, **COMMON)),
    "gemma": (
        transformers.GemmaConfig,
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_key_value_heads=2, head_dim=8, **COMMON),
    ),
    "gpt2": (transformers.GPT2Config, dict(n_embd=32, n_layer=4, n_head=4, n_positions=64, vocab_size=VOCAB_SIZE)),
    "gpt_neox": (
        transformers.GPTNeoXConfig,
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, max_position_embeddings=64, **COMMON),
    ),
    "opt": (
        transformers.OPTConfig,
        dict(hidden_size=32, ffn_dim=64, num_hidden_layers=4, word_embed_proj_dim=32, max_position_embeddings=64, **COMMON),
    ),
    "phi": (transformers.PhiConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, max_position_embeddings=64, **COMMON)),
}


def tiny_model(family: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A randomly initialised 4-layer model of `family`, deterministic in `seed`."""
    config_cls, kwargs = FAMILIES[family]
    config = config_cls(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over a fixed vocabulary (unknown words map to <unk>)."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    letters = [c for c in "ABCDabcdefghijklmnopqrstuvwxyz0123456789.,:?!\n"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + WORDS + letters))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_model(directory: Path, family: str = "llama", dtype: torch.dtype = torch.float32) -> Path:
    """Save a tiny model and its tokenizer where `pretrained=` can load them offline."""
    tiny_model(family, dtype).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def write_tiny_task(directory: Path, name: str = "tiny_colors") -> Path:
    """A four-choice task (loglikelihood) and a generative one over local JSONL data."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [
        {"question": "what color is the sky ?", "choices": ["blue", "green", "red", "white"], "answer": 0},
        {"question": "what color is the grass ?", "choices": ["red", "green", "blue", "white"], "answer": 1},
        {"question": "what color is the sun ?", "choices": ["blue", "white", "yellow", "green"], "answer": 2},
        {"question": "what color is the snow ?", "choices": ["green", "red", "blue", "white"], "answer": 3},
    ]
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "question : {{{{question}}}} answer :"
"""
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\n{common}output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n"
    )
    (directory / f"{name}_gen.yaml").write_text(
        f'task: {name}_gen\n{common}output_type: generate_until\ndoc_to_target: "{{{{choices[answer]}}}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return directory
