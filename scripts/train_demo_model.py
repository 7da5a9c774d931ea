"""Train the embedded demo model (`lm_eval_faults/demo_model/`) from scratch, deterministically, on CPU.

Why a home-made model: tests, docs and demos need a real `LlamaForCausalLM` with a tokenizer that
loads offline, is a few MB, scores near 1.0 on `faults_demo` when healthy, and whose damage is
visible at once. Nothing on the hub is that small and that good at one task, and CI must never
download anything.

The model is a 4-layer Llama (hidden 64, intermediate 128, 4 heads, untied input/output
embeddings, float32; 168,896 parameters, a 680 KB safetensors file) with a word-level tokenizer
built from the demo corpus. It learns the closed set of single-digit sums in
`lm_eval_faults.tasks.faults_demo.demo_data`, formatted exactly as lm-eval's MMLU prompt, with the loss on the
answer letter and end-of-sequence token only (the distractors are random, so there is nothing to
learn from them). The defaults (2000 steps of 64 questions, AdamW at 3e-3 with warm-up and cosine
decay) take about 2.5 minutes on one CPU thread and reach 0.99 test accuracy. Almost all of that
time is the model's forward and backward passes; each batch is tokenized in one call. Same seed,
same torch version, same bytes: running the script with no arguments reproduces the committed
weights.

Usage: python scripts/train_demo_model.py [--steps N] [--batch-size B] [--lr LR] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

# One CPU thread throughout, tokenizer included (its batch calls would otherwise use every core).
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import torch
from lm_eval_faults.harness.package_data import demo_model_dir
from lm_eval_faults.tasks.faults_demo import demo_data
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SEED = 1234
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
# Words, single punctuation marks and newlines are tokens; other whitespace separates them.
PRE_TOKENIZER = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior="removed", invert=True)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over every word the demo corpus can produce, adding BOS like Llama's."""
    words: set[str] = set()
    sample = demo_data.training_docs(SEED)
    docs = [next(sample) for _ in range(2000)] + demo_data.test_docs() + demo_data.dev_docs()
    for doc in docs:
        words.update(piece for piece, _ in PRE_TOKENIZER.pre_tokenize_str(demo_data.format_example(doc)))
    words.update(str(n) for n in range(demo_data.MAX_SUM + 1))
    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, UNK, *sorted(words)])}

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = PRE_TOKENIZER
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A 4-layer Llama; RoPE lets lm-eval feed it long MMLU prompts without a size cost."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def make_batch(tokenizer: PreTrainedTokenizerFast, docs: list[dict]) -> dict[str, torch.Tensor]:
    """Token ids of prompt + letter + EOS; labels only on the letter and EOS.

    The prompts are tokenized in one batch call; the answer " A".."D" is the single word token of
    its letter, looked up directly.
    """
    prompts = tokenizer([demo_data.format_prompt(doc) for doc in docs])["input_ids"]
    letter_ids = tokenizer.convert_tokens_to_ids(list(demo_data.LETTERS))
    rows = [[*p, letter_ids[doc["answer"]], tokenizer.eos_token_id] for p, doc in zip(prompts, docs, strict=True)]
    width = max(map(len, rows))
    pads = [width - len(row) for row in rows]
    input_ids = [row + [tokenizer.pad_token_id] * pad for row, pad in zip(rows, pads, strict=True)]
    labels = [[-100] * len(p) + row[len(p) :] + [-100] * pad for row, p, pad in zip(rows, prompts, pads, strict=True)]
    attention_mask = [[1] * len(row) + [0] * pad for row, pad in zip(rows, pads, strict=True)]
    return {
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(attention_mask),
    }


@torch.no_grad()
def letter_accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, docs: list[dict]) -> float:
    """Share of docs whose gold letter has the highest next-token logit among A-D (lm-eval's `acc`)."""
    model.eval()
    letter_ids = tokenizer.convert_tokens_to_ids(list(demo_data.LETTERS))
    ids = torch.tensor([tokenizer(demo_data.format_prompt(doc))["input_ids"] for doc in docs])
    picks = model(input_ids=ids).logits[:, -1, letter_ids].argmax(-1)
    model.train()
    return (picks == torch.tensor([doc["answer"] for doc in docs])).float().mean().item()


def train(steps: int, batch_size: int, lr: float) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """AdamW with linear warm-up and cosine decay; prints test accuracy as it goes."""
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = steps // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    stream = demo_data.training_docs(SEED)
    test_docs = demo_data.test_docs()
    model.train()
    for step in range(1, steps + 1):
        loss = model(**make_batch(tokenizer, [next(stream) for _ in range(batch_size)])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == steps:
            print(f"step {step:5d}  loss {loss.item():.4f}  test acc {letter_accuracy(model, tokenizer, test_docs):.3f}", flush=True)
    model.eval()
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=demo_model_dir())
    args = parser.parse_args()

    start = time.perf_counter()
    model, tokenizer = train(args.steps, args.batch_size, args.lr)
    elapsed = time.perf_counter() - start
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"saved {args.out}: {params} parameters, trained {args.steps} steps in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
