"""`llava-pipeline`: one command, one subcommand per stage.

Each subcommand lives with the code it runs and parses its own arguments, so this file is only a table.
Handlers are imported lazily: `llava-pipeline --help` must not pay for importing torch or deepspeed.
"""
from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help). Each function takes argv (list[str]) and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "scenes": ("data_gen.cli:scenes_main", "render synthetic scenes (images + captions + boxes + stage-1 shards)"),
    "coco": ("data_gen.cli:coco_main", "import COCO captions + instances into the captions JSONL format"),
    "shards": ("llava.data.pairs:shards_main", "write webdataset image-caption shards from a folder or a JSON list"),
    "generate": ("data_gen.cli:generate_main", "write LLaVA instruction data from captions + boxes (openai | offline)"),
    "validate": ("pipeline.validate:main", "pre-flight scan of a dataset the way training reads it"),
    "plan": ("pipeline.plan:main", "parameter counts, memory per GPU, time and a fits/does-not-fit verdict"),
    "base": ("stages.base:main", "demo only: pretrain a tiny CLIP + tokenizer + tiny LLaMA on scene data"),
    "align": ("stages.align:main", "stage 1: train the projector on image-caption pairs"),
    "instruct": ("stages.instruct:main", "stage 2: tune projector + LLM (or adapters) on instruction data"),
    "prefer": ("stages.prefer:main", "stage 3: DPO/IPO on chosen/rejected answers against hallucination"),
    "eval": ("pipeline.evaluate:main", "batched greedy answers for a LLaVA question file, scored when references exist"),
    "chat": ("pipeline.chat:main", "chat with a trained model about an image (one-shot or interactive)"),
    "serve": ("pipeline.serve:main", "OpenAI-compatible chat API (streaming, batched) and a web chat page"),
    "export": ("pipeline.export:main", "merged model, Hugging Face LLaMA, or transformers LLaVA layout"),
    "run": ("pipeline.runner:main", "run every stage of a config file in order, skipping finished ones"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: llava-pipeline <command> [options]   (llava-pipeline <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"llava-pipeline: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = SUBCOMMANDS[name][0].split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    return int(handler(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
