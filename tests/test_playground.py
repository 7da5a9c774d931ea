"""The playground app, driven through Gradio's own client on a local port (no browser)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

gradio = pytest.importorskip("gradio", reason="the playground extra (gradio) is not installed")
from gradio_client import Client  # noqa: E402
from lm_eval_faults.cli.playground import loader  # noqa: E402
from lm_eval_faults.study.playground import Playground, Setting, build_app  # noqa: E402


def text_of(fragment: str) -> str:
    return re.sub(r"<[^>]+>|&#8203;", "", fragment.partition("</style>")[2])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_llama_dir: Path):
    playground = Playground(loader({}), str(tiny_llama_dir), max_new_tokens=8)
    app = build_app(playground, str(tiny_llama_dir), "what color is the sky ?")
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, quiet=True)
    try:
        yield playground, Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        app.close()


def test_the_slider_reinjects_without_reloading(served, tiny_llama_dir: Path) -> None:
    playground, client = served
    model = str(tiny_llama_dir)
    low = client.predict(model, "what color is the sky ?", -9.0, "kv_cache", "all", "all", 0, api_name="/generate")
    high = client.predict(model, "what color is the sky ?", -2.0, "kv_cache", "all", "all", 0, api_name="/generate")
    again = client.predict(model, "what color is the sky ?", -2.0, "kv_cache", "all", "all", 0, api_name="/generate")
    assert playground.loads == 1, "moving the slider never reloads the model"
    assert text_of(low[0]) == text_of(high[0]), "the clean answer is the same whatever the setting (its highlights differ)"
    assert "kv cache hit" in high[2] and "bitflip p=0.01" in high[2]
    assert high == again, "a setting's faults are reproducible"
    assert "identical" in low[2] or "first divergence" in low[2]


def test_every_site_runs(served, tiny_llama_dir: Path) -> None:
    _, client = served
    for site in ("weights", "activations", "kv_cache"):
        _, faulted, report = client.predict(str(tiny_llama_dir), "the sun is", -2.0, site, "attention", "leaf", 1, api_name="/generate")
        assert ("on the KV cache" if site == "kv_cache" else f"on {site}") in report and 'class="text faulted"' in faulted


def test_settings_spell_their_specs() -> None:
    assert Setting(-6.0, "activations", "mlp", "all", 2).spec_text() == "p=1e-06,site=activations,seed=2,target=mlp,act_scope=all"
    assert Setting(-5.5, "kv_cache", "mlp", "all", 0).spec_text() == "p=3.16e-06,site=kv_cache,seed=0"
