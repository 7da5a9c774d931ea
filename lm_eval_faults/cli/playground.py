"""`lm-eval-faults playground`: the Gradio app of clean and faulted generations (needs the `playground` extra)."""

from __future__ import annotations

import argparse
from typing import Any

from lm_eval_faults.cli.generate import RRAM_PROMPT, load_tokenizer
from lm_eval_faults.core.spec import parse_arg_string, parse_fault_args
from lm_eval_faults.harness.loading import LOAD_KEYS, load_model
from lm_eval_faults.harness.package_data import demo_model_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pretrained", nargs="?", help="model path or hub id (default: the embedded demo model)")
    parser.add_argument("--model_args", default="", help="how to load it: dtype=bfloat16,gguf_file=F,... (no fault keys)")
    parser.add_argument("--prompt", default=RRAM_PROMPT, help="the prompt the app opens with (default: the RRAM study's)")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template (instruct models)")
    parser.add_argument("--max_new_tokens", type=int, default=48, help="tokens generated per answer (default 48)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")


def loader(load_args: dict[str, Any]) -> Any:
    """`load(model) -> (model, tokenizer)` with `--model_args`' loading keys for every model named."""

    def load(pretrained: str) -> tuple[Any, Any]:
        config = {**load_args, "pretrained": pretrained}
        return load_model(config), load_tokenizer(config)

    return load


def main(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ImportError("playground needs Gradio: pip install 'lm-eval-faults[playground]'") from None
    from lm_eval_faults.study.playground import Playground, build_app

    model_args = parse_arg_string(args.model_args)
    spec, load_args = parse_fault_args(model_args, passthrough=LOAD_KEYS)
    if spec.active or set(model_args) - set(load_args):
        raise ValueError("--model_args loads the model; the app's controls choose the faults")
    model = args.pretrained or str(demo_model_dir())
    playground = Playground(loader(load_args), model, max_new_tokens=args.max_new_tokens, chat=args.chat)
    build_app(playground, model, args.prompt).launch(server_name=args.host, server_port=args.port, share=False)
    return 0
