"""`lm-eval-faults generate`, the failure classes and the side-by-side page (no browser: its content)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lm_eval_faults.cli import main
from lm_eval_faults.study.side_by_side import FaultedView, PromptView, side_by_side_page
from lm_eval_faults.study.text_failures import distinct_trigrams, failure_class, first_divergence


def test_first_divergence() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


@pytest.mark.parametrize(
    ("clean", "faulted", "text", "nonfinite", "ratio", "expected"),
    [
        ([1, 2, 3], [1, 2, 3], "abc", False, None, "identical"),
        ([1, 2, 3], [1, 2, 3], "abc", True, None, "non-finite"),
        ([1, 2, 3], [], "", False, None, "empty"),
        ([1, 2, 3], [7] * 20, "x" * 20, False, 100.0, "repetitive"),
        ([1, 2, 3], list(range(20)), "words", False, 50.0, "gibberish"),
        ([1, 2, 3], list(range(20)), "words", False, 2.0, "diverged"),
        ([1, 2, 3], list(range(20)), "words", False, None, "diverged"),
    ],
)
def test_failure_classes_follow_their_definitions(clean, faulted, text, nonfinite, ratio, expected) -> None:
    assert failure_class(clean, faulted, text, "clean text", nonfinite, ratio) == expected


def test_flat_logits_read_as_collapsed_not_as_the_text_they_leave() -> None:
    assert failure_class([1, 2, 3], [0] * 20, "", "clean text", flat=True) == "collapsed"
    assert failure_class([1, 2, 3], [0] * 20, "", "clean text", nonfinite=True, flat=True) == "non-finite"


def test_stop_strings_end_a_text_as_lm_eval_ends_it() -> None:
    from lm_eval_faults.study.generation import cut_at_stop, stopped_at

    pieces = [" Paris", ".", " The", " answer"]
    assert stopped_at(pieces, [".", "\n"]) == 2 and cut_at_stop(pieces[:2], ["."]) == ""
    assert stopped_at([" Ber", "lin. It"], ["."]) == 2 and cut_at_stop([" Ber", "lin. It"], ["."]) == "lin"
    assert stopped_at(pieces, []) == 4


def test_distinct_trigrams() -> None:
    assert distinct_trigrams([1, 2, 1, 2, 1, 2]) == 0.5
    assert distinct_trigrams([1, 2]) == 1.0


def test_page_shows_both_texts_with_the_divergence_highlighted() -> None:
    view = PromptView(
        "prompt 1",
        "Tell me <b>",
        ["The ", "sky ", "is ", "blue"],
        [FaultedView("p=1e-5", ["The ", "sky ", "was ", "green"], 2, 2, "diverged", {"diverges at token": "2"})],
    )
    page = side_by_side_page("title", [view])
    assert "Tell me &lt;b&gt;" in page, "text is escaped"
    assert 'The sky <span class="lost first">is </span><span class="lost">blue</span>' in page
    assert 'The sky <span class="new first">was </span><span class="new">green</span>' in page
    assert 'data-failure="diverged"' in page and "diverges at token 2" in page
    assert "<script" not in page and "http" not in page, "self-contained: no scripts, nothing fetched"


def test_generate_writes_the_page_and_json(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "gen"
    args = [
        "generate",
        str(tiny_llama_dir),
        "--prompt",
        "what color is the sky ?",
        "--prompt",
        "the sun is",
        "--faults",
        "site=kv_cache",
        "--p",
        "0,1e-2",
        "--spec",
        "p=1e-2,site=activations,seed=3",
        "--max_new_tokens",
        "8",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "p=1e-2,site=kv_cache" in table and "identical" in table
    data = json.loads((out / "generations.json").read_text())
    assert [len(prompt["faulted"]) for prompt in data["prompts"]] == [3, 3]
    first = data["prompts"][0]
    assert first["faulted"][0]["failure"] == "identical" and first["faulted"][0]["text"] == first["clean"]["text"]
    assert first["faulted"][1]["faults"]["kv_cache_hit"] > 0
    page = (out / "generations.html").read_text()
    assert page.count('class="text clean"') == 6 and "what color is the sky ?" in page
    # the same command again gives the same outputs: greedy, faults keyed by prompt and spec
    assert main([*args[:-1], str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "generations.json").read_text())["prompts"] == data["prompts"]


def test_generate_refuses_bad_input_before_loading(tmp_path: Path, capsys) -> None:
    assert main(["generate", "--p", "1e-5", "--faults", "site=kv_cache,kv_part=queries"]) == 2
    assert "kv_part='queries' is invalid" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x"]) == 2
    assert "generate needs a ladder" in capsys.readouterr().err
    assert main(["generate", "--p", "1e-5", "--out", "/proc/nope"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["generate", "--spec", "site=kv_cache"]) == 2
    assert "injects nothing" in capsys.readouterr().err
    assert main(["generate", "--p", "1e-5", "--max_new_tokens", "0"]) == 2
    assert "--max_new_tokens 0 is invalid" in capsys.readouterr().err
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    assert main(["generate", "--p", "1e-5", "--prompts", str(blank)]) == 2
    assert "holds no prompt" in capsys.readouterr().err


def test_token_scripts() -> None:
    from lm_eval_faults.study.token_scripts import script_shares, token_script

    assert [token_script(t) for t in [" Paris", "北京", "Москва", "ひらがな", "µ", "º", " 42", ", ", "  ", "\ufffd", ""]] == [
        "latin",
        "cjk",
        "cyrillic",
        "japanese",
        "greek",
        "latin",
        "digits",
        "punctuation",
        "whitespace",
        "other",
        "other",
    ]
    assert script_shares(["a", "b", "北"]) == {"latin": 2 / 3, "cjk": 1 / 3}
