"""The RRAM blog's slider, for real: a small Gradio app of clean and faulted generations side by side.

The model loads once (again only when another one is named); each setting of the controls is a
spec, injected for one greedy generation and restored in O(faults), so moving the slider never
reloads anything. A setting's faults are those of `inject(spec)` with the prompt's request key,
the same at every visit and in `lm-eval-faults generate`. The clean answer of a prompt is
generated once and kept.

Gradio is an optional extra (`pip install 'lm-eval-faults[playground]'`), imported only here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from lm_eval_faults.core.spec import COMPONENTS, to_spec
from lm_eval_faults.study.generation import Generated, Generator, compare_prompt
from lm_eval_faults.study.side_by_side import CLASS_COLOURS, STYLE, FaultedView, highlighted

SITE_CHOICES = ("weights", "activations", "kv_cache")
SCOPE_CHOICES = ("leaf", "all")
P_RANGE = (-10.0, -2.0)
"""log10 p: the slider's ends."""


@dataclass(frozen=True)
class Setting:
    """One position of the controls, and the spec it stands for."""

    log10_p: float
    site: str
    target: str
    scope: str
    seed: int

    @property
    def p(self) -> float:
        return float(f"{10.0**self.log10_p:.3g}")

    def spec_text(self) -> str:
        keys = [f"p={self.p:g}", f"site={self.site}", f"seed={self.seed}"]
        if self.site != "kv_cache":
            keys.append(f"target={self.target}")
        if self.site == "activations":
            keys.append(f"act_scope={self.scope}")
        return ",".join(keys)


class Playground:
    """One loaded model, its clean answers, and the faulted answer of any setting."""

    def __init__(self, load: Any, model: str, max_new_tokens: int = 48, chat: bool = False) -> None:
        """`load(model) -> (model, tokenizer)`: called once per model named."""
        self._load = load
        self.max_new_tokens = max_new_tokens
        self.chat = chat
        self._lock = threading.Lock()  # one model, one generation at a time
        self._model_name = ""
        self._generator: Generator | None = None
        self._clean: dict[str, Generated] = {}
        self.loads = 0
        self.use(model)

    def use(self, model: str) -> Generator:
        if self._generator is None or model != self._model_name:
            loaded, tokenizer = self._load(model)
            self._generator = Generator(loaded, tokenizer, self.max_new_tokens, chat=self.chat)
            self._model_name, self._clean = model, {}
            self.loads += 1
        return self._generator

    def run(self, model: str, prompt: str, setting: Setting) -> tuple[str, str, str]:
        """(clean page fragment, faulted page fragment, report summary) for one setting."""
        spec = to_spec(setting.spec_text())
        with self._lock:
            generator = self.use(model)
            result = compare_prompt(generator, prompt, [(setting.spec_text(), spec)])
        item = result.faulted[0]
        view = FaultedView(item.label, item.generated.pieces, item.first_divergence, item.first_divergence, item.failure)
        clean_html = _panel("clean", "clean", highlighted(result.clean.pieces, view.clean_diverges_at, "lost"))
        faulted_html = _panel(
            "faulted",
            f'<span class="badge" style="background:{CLASS_COLOURS[item.failure]};color:#fff">{item.failure}</span> faulted',
            highlighted(view.pieces, view.diverges_at, "new") or "<em>(empty)</em>",
        )
        counts = ", ".join(f"{name.replace('_', ' ')} {value:,}" for name, value in item.faults.items()) or "no faults drawn"
        divergence = "identical" if item.first_divergence is None else f"first divergence at token {item.first_divergence}"
        summary = f"{spec.describe()}\n{counts}\n{divergence}; perplexity ratio to clean {item.perplexity_ratio:.3g}"
        if item.generated.nonfinite:
            summary += "\nthe faulted model's logits went NaN/Inf: the text after that was chosen from sanitised logits"
        return clean_html, faulted_html, summary


def _panel(kind: str, title: str, body: str) -> str:
    return f'<style>{STYLE}</style><div class="text {kind}"><h3>{title}</h3>{body}</div>'


def build_app(playground: Playground, model: str, prompt: str) -> Any:
    """The Gradio Blocks: inputs left, the two texts side by side, the report's counts below.
    Its one endpoint, `/generate`, takes the inputs in the order shown."""
    import gradio as gr

    def generate(model_name: str, text: str, log10_p: float, site: str, target: str, scope: str, seed: float) -> tuple[str, str, str]:
        try:
            return playground.run(model_name, text, Setting(float(log10_p), site, target, scope, int(seed)))
        except (ValueError, TypeError, OSError) as error:  # bad input: shown in the app, in one line
            raise gr.Error(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__) from None

    with gr.Blocks(title="lm-eval-faults playground") as app:
        gr.Markdown("## lm-eval-faults playground: clean and faulted generations side by side")
        with gr.Row():
            with gr.Column(scale=1):
                model_box = gr.Textbox(model, label="model (path or hub id; loads once)")
                prompt_box = gr.Textbox(prompt, label="prompt", lines=3)
                slider = gr.Slider(*P_RANGE, value=-6.0, step=0.25, label="log10 p (per bit)")
                site = gr.Radio(list(SITE_CHOICES), value="activations", label="site")
                target = gr.Dropdown(["all", *COMPONENTS], value="all", label="target (weights, activations)")
                scope = gr.Radio(list(SCOPE_CHOICES), value="all", label="activation scope (act_scope)")
                seed = gr.Number(0, precision=0, label="seed")
            with gr.Column(scale=3):
                with gr.Row():
                    clean = gr.HTML(label="clean")
                    faulted = gr.HTML(label="faulted")
                report = gr.Textbox(label="fault report", lines=3)
        button = gr.Button("generate")
        inputs = [model_box, prompt_box, slider, site, target, scope, seed]
        outputs = [clean, faulted, report]
        button.click(generate, inputs, outputs, api_name="generate")  # first: the others' names are derived from it
        for control in (slider, site, target, scope, seed):
            control.change(generate, inputs, outputs, api_visibility="private")
        prompt_box.submit(generate, inputs, outputs, api_visibility="private")
        app.load(generate, inputs, outputs, api_visibility="private")
    return app
