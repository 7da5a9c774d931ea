"""`lm-eval-faults export MODEL --model_args ... --out PATH`: write the faulted model so that
another engine runs it.

From a GGUF source with `storage=file`, a GGUF file equal to the source byte for byte except the
words faults changed (llama.cpp and every other GGUF reader load it as they load the source);
otherwise the faulted weights the model computes with, as safetensors (`save_pretrained`), with
the tokenizer beside them. The fault report and the spec go to stdout; the output is checked
before the model loads and written atomically, so a refused or failed export leaves nothing.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lm_eval_faults.core.injection import Injection
from lm_eval_faults.core.spec import parse_arg_string, parse_fault_args
from lm_eval_faults.core.storage.codecs import FILE
from lm_eval_faults.core.storage.gguf_file import write_gguf
from lm_eval_faults.harness.gguf_storage import attach_gguf_storage, gguf_path
from lm_eval_faults.harness.loading import LOAD_KEYS, load_model
from lm_eval_faults.harness.package_data import demo_model_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pretrained", nargs="?", help="model path or hub id (default: the embedded demo model)")
    parser.add_argument("--model_args", default="", help="p=1e-5,storage=file,gguf_file=F[,target=mlp,seed=1,...]")
    parser.add_argument(
        "--out", required=True, help="a .gguf file (GGUF source with storage=file), else a folder for safetensors and the tokenizer"
    )


def main(args: argparse.Namespace) -> int:
    model_args = parse_arg_string(args.model_args)
    if args.pretrained:
        model_args["pretrained"] = args.pretrained
    spec, load_args = parse_fault_args(model_args, passthrough=LOAD_KEYS)
    pretrained = str(load_args.get("pretrained") or demo_model_dir())
    as_gguf = spec.storage == FILE
    out = Path(args.out)
    if as_gguf and (out.suffix != ".gguf" or out.is_dir()):
        raise ValueError(f"--out {args.out!r}: storage=file exports a GGUF file; give a path ending in .gguf")
    if not as_gguf and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OSError(f"--out {args.out!r} exists and is not an empty folder; safetensors go into a new folder")
    source = gguf_path(pretrained, str(load_args.get("gguf_file"))) if as_gguf else None
    if source is not None and out.resolve() == source.resolve():
        raise ValueError(f"--out {args.out!r} is the source file; files on disk are never modified")
    model = load_model(load_args, spec)
    if source is not None:
        attach_gguf_storage(model, source)
    injection = Injection.apply(model, spec, progress=True)
    print(injection.report.format_table())
    if source is not None:
        weights = injection.injectors.get("weights")
        sites = getattr(weights, "sites", [])
        encodings = list({id(site.encoding): site.encoding for site in sites if site.encoding is not None}.values())
        changed = write_gguf(source, encodings, out)
        print(
            f"wrote {out}: {sum(changed.values()):,} bytes changed in {len(changed)} tensors of {source.name}; every other byte is the source's"
        )
    else:
        from transformers import AutoTokenizer

        folder = out.with_name(f".{out.name}.partial")
        model.save_pretrained(folder, safe_serialization=True)  # type: ignore[operator]  # a PreTrainedModel
        AutoTokenizer.from_pretrained(
            pretrained, **{k: v for k, v in load_args.items() if k in ("revision", "subfolder", "gguf_file")}
        ).save_pretrained(folder)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(folder, out)
        print(f"wrote {out}: the faulted weights as safetensors, with the tokenizer")
    injection.restore()
    return 0
