"""`llava-pipeline plan`: will this stage config fit, and how long will it take, before any GPU is rented?

    llava-pipeline plan --config configs/vicuna-7b-instruct.yaml --gpu a100-80g --gpus 8 --llm vicuna-7b-v1.5

The model is built on the `meta` device from its configs (LLaMA config.json, CLIP config), so no weight is read and
no memory is used; the parameter counts are exact. Memory per rank is worked out by stages/memory.py (model states
under the configured ZeRO stage and offload, activations of the configured micro-batch at `max_len`, the worst
case), plus DeepSpeed's communication buckets and the CUDA context. The verdict says how much is left, or what to
change; `align` and `instruct` run the same check on a GPU before loading any weight.

Where a path in the config does not exist yet (the shipped recipes say /path/to/...), the architecture comes from
`--llm` (a LLaMA preset name or a Hugging Face directory) and `--vision` (an open_clip name or a CLIP directory), or
from the directory's name when it names a preset (vicuna-7b-v1.5, clip-vit-large-patch14-336); the output says so.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from stages import memory
from stages.config import ConfigError, load_config

GiB = memory.GiB
CARDS, Setup = memory.CARDS, memory.Setup
LLAVA_GLOBAL_BATCH = {"align": 256, "instruct": 128}  # LLaVA-1.5's recipes
VISION_NAMES = {  # Hugging Face CLIP directory names -> open_clip architectures (for paths that do not exist yet)
    "clip-vit-large-patch14-336": "ViT-L-14-336", "clip-vit-large-patch14": "ViT-L-14",
    "clip-vit-base-patch16": "ViT-B-16", "clip-vit-base-patch32": "ViT-B-32",
}


# ---- the model -------------------------------------------------------------------------------------------------------

def _llm_from(value: str, notes: list[str]):
    """(LlamaConfig, None) for a preset, or (None, directory) for a Hugging Face directory whose config.json is read
    later; a path that does not exist yet but is named like a preset (/path/to/vicuna-7b-v1.5) gives the preset."""
    from llava.model.llama import PRESETS, LlamaConfig

    path = Path(value)
    if path.is_dir():
        directory = path / "llm" if (path / "llava_config.json").is_file() else path
        if not (directory / "config.json").is_file():
            raise ConfigError(f"{directory}: no config.json (expected a Hugging Face LLaMA directory)")
        return None, str(directory)
    if value in PRESETS:
        return LlamaConfig.from_name(value), None
    if path.name.lower() in PRESETS:
        notes.append(f"{value} does not exist here: using the {path.name.lower()} preset's architecture")
        return LlamaConfig.from_name(path.name.lower()), None
    raise ConfigError(f"model.llm: {value} does not exist and its name is not a LLaMA preset "
                      f"({', '.join(sorted(PRESETS))}); pass --llm PRESET_OR_DIR")


def _vision_from(value, notes: list[str]):
    """A tower spec that builds without weights: a config dict, the architecture of an existing directory or JSON
    file, or an open_clip name (a CLIP directory that does not exist yet maps to its open_clip name)."""
    from stages.common import OPEN_CLIP_CONFIG, _open_clip_json

    if isinstance(value, dict):
        return value
    path = Path(str(value))
    if (path / OPEN_CLIP_CONFIG).is_file():
        return _open_clip_json(path / OPEN_CLIP_CONFIG)[0]
    if path.is_dir():
        return memory.vision_arch(str(path))
    if path.suffix == ".json" and path.is_file():
        return _open_clip_json(path)[0]
    if path.name in VISION_NAMES:
        notes.append(f"{value} does not exist here: using open_clip's {VISION_NAMES[path.name]} architecture")
        return VISION_NAMES[path.name]
    if "/" in str(value):
        raise ConfigError(f"model.vision_tower: {value} does not exist and its name is not one of "
                          f"{', '.join(VISION_NAMES)}; pass --vision NAME_OR_DIR")
    return str(value)  # an open_clip model name


def resolve_model(stage: str, cfg, llm: str | None, vision: str | None) -> tuple[object, list[str]]:
    """The LlavaConfig the stage would build (architecture only), and notes on what was assumed."""
    from llava.model.llava import LlavaConfig
    from stages.common import MODEL_CONFIG, read_model_config

    notes: list[str] = []
    template = "plain" if stage == "align" else cfg.template
    if stage == "instruct" and cfg.align_dir is not None and llm is None:
        if not (Path(cfg.align_dir) / MODEL_CONFIG).is_file():
            raise ConfigError(f"align_dir: {Path(cfg.align_dir) / MODEL_CONFIG} does not exist yet (stage 1 writes "
                              f"it); pass --llm PRESET_OR_DIR (and --vision) to plan stage 2 before stage 1 ran")
        config, _ = read_model_config(Path(cfg.align_dir) / MODEL_CONFIG)
        return replace(config, template=template, max_len=cfg.max_len), notes
    spec = getattr(cfg, "model", None)
    llm_value = llm or (spec.llm if spec is not None else None)
    vision_value = vision or (spec.vision_tower if spec is not None else "ViT-L-14-336")
    if spec is None and vision is None:
        notes.append("vision tower not given: assuming ViT-L-14-336 (LLaVA-1.5's); pass --vision")
    llama_config, llm_path = _llm_from(llm_value, notes)
    config = LlavaConfig(vision_tower=_vision_from(vision_value, notes), template=template, max_len=cfg.max_len,
                         select_layer=spec.select_layer if spec else -2,
                         select_feature=spec.select_feature if spec else "patch",
                         projector_type=spec.projector_type if spec else "mlp2x_gelu", llm_path=llm_path,
                         **({"llm": llama_config} if llama_config is not None else {}))
    return config, notes


# ---- the plan --------------------------------------------------------------------------------------------------------

def detect_stage(data: dict) -> str:
    if "shards" in data:
        return "align"
    if "data" in data:
        return "instruct"
    raise ConfigError("plan: cannot tell the stage: an align config has `shards`, an instruct config has `data`")


def bind(stage: str, data: dict):
    from stages import align, instruct
    from stages.common import bind_stage

    module = {"align": align, "instruct": instruct}[stage]
    return bind_stage(module.SCHEMA, data, name=stage, train_sections=module.TRAIN_SECTIONS)


# ---- output ----------------------------------------------------------------------------------------------------------

def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours >= 1 else f"{seconds / 60:.0f} min"


def render(result: dict, setup: Setup, notes: list[str], fits: bool, sentence: str) -> str:
    p, m, s, t = result["params"], result["memory"], result["settings"], result["time"]
    lines = [f"plan: {result['stage']} on {setup.nodes} node(s) x {setup.gpus} GPU(s) "
             f"({setup.card}, {setup.gpu_mem_gib:g} GiB each)"]
    lines += [f"  note: {note}" for note in notes]
    lines.append("parameters (exact, built on the meta device):")
    for name, count in p["components"].items():
        lines.append(f"  {name:<10} {count:>15,}   trainable {p['trainable_by_component'][name]:>15,}")
    lines.append(f"  {'total':<10} {p['total']:>15,}   trainable {p['trainable']:>15,}")
    zero = f"ZeRO-{s['zero_stage']}" + (" + optimizer offload" if s["offload_optimizer"] else "") + \
        (" + parameter offload" if s["offload_params"] else "")
    a = m["activation_parts"]
    lines += [
        f"memory per GPU ({s['precision']}, {zero}, micro-batch {s['micro_batch_size']} x {result['seq_len']} "
        f"positions, {result['image_tokens']} per image, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}):",
        f"  model states       {_gib(m['model_states']):>12}   (weights, gradients, AdamW states)",
        f"  activations        {_gib(m['activations']):>12}   (kept {_gib(a['kept'])}; peak phase: head "
        f"{_gib(a['head_phase'])}, block {_gib(a['block_phase'])})",
        f"  ZeRO buckets       {_gib(m['buckets']):>12}",
        f"  CUDA context       {_gib(m['cuda_context']):>12}",
        f"  total              {_gib(m['need']):>12}   of {setup.gpu_mem_gib:g} GiB",
    ]
    if m["adapter"] is not None:
        saved = m["adapter"]
        lines.append(f"  adapter: model states {_gib(m['model_states'])} against {_gib(saved['full_finetune_states'])}"
                     f" for full fine-tuning; with the frozen base in NF4 (QLoRA-style, {memory.NF4_BYTES} bytes "
                     f"per weight) {_gib(saved['nf4_base_states'])}")
    if m["host_per_node"] and (s["offload_optimizer"] or s["offload_params"]):
        lines.append(f"  host memory per node for offloaded states: {_gib(m['host_per_node'])}")
    lines.append(f"global batch: {s['micro_batch_size']} x {s['grad_accum']} x {result['ranks']} ranks = "
                 f"{result['global_batch']}")
    reference = LLAVA_GLOBAL_BATCH[result["stage"]]
    if result["global_batch"] != reference:
        per_step = s["micro_batch_size"] * result["ranks"]
        if reference % per_step == 0:
            hint = f"set train.grad_accum={reference // per_step} to match it"
        else:
            hint = "no grad_accum matches it at this micro-batch and rank count"
        lines.append(f"  note: LLaVA-1.5's {result['stage']} recipe uses a global batch of {reference}; {hint}")
    if t["steps_per_epoch"] is not None:
        lines.append(f"steps per epoch: {t['steps_per_epoch']:,}")
    else:
        lines.append("steps per epoch: pass --samples N (the data set's size)")
    if t["seconds"] is not None:
        lines.append(f"expected time: {_duration(t['seconds'])} ({t['flops_per_sample'] / 1e12:.2f} TFLOP per sample "
                     f"at {t['mean_tokens']} positions on average, MFU {t['mfu']:.0%} of "
                     f"{t['peak_flops'] / 1e12:.0f} TFLOP/s)")
    lines.append(("verdict: " if fits else "VERDICT: ") + sentence)
    return "\n".join(lines)


def plan(config_file: str | None, overrides: list[str], setup: Setup, *, llm: str | None = None,
         vision: str | None = None) -> tuple[dict, list[str], bool, str]:
    data = load_config(config_file, overrides)
    stage = detect_stage(data)
    cfg = bind(stage, data)
    llava_config, notes = resolve_model(stage, cfg, llm, vision)
    result = memory.estimate(stage, cfg, llava_config, setup)
    fits, sentence = memory.verdict(stage, cfg, llava_config, setup, result)
    return result, notes, fits, sentence


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llava-pipeline plan", description=__doc__.split("\n\n")[0],
        epilog="Reads: the stage config (--config) and the configs it names (the LLaMA config.json, the CLIP "
               "config; never a weight file). Writes: nothing; prints the plan (--json: as JSON). Exit code 0 when "
               "it fits, 1 when it does not, 2 for a config error.")
    parser.add_argument("--config", required=True, help="an align or instruct stage config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as the stages take them")
    parser.add_argument("--gpu", default="a100-80g", choices=sorted(CARDS), help="card: memory, peak FLOP/s")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-mem", type=float, help="GiB per GPU (default: the card's)")
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOPs utilisation for the time")
    parser.add_argument("--samples", type=int, help="samples in the data set (for steps per epoch and time)")
    parser.add_argument("--mean-tokens", type=int, help="mean positions per sample after the splice (for the time)")
    parser.add_argument("--seq-len", type=int, help="padded positions per row for memory (default: max_len)")
    parser.add_argument("--llm", help="LLaMA preset or directory, when the config's path does not exist yet")
    parser.add_argument("--vision", help="open_clip name or CLIP directory, when the config's does not exist yet")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.nodes < 1:
        parser.error("--gpus and --nodes must be >= 1")
    setup = Setup(args.gpus, args.nodes, args.gpu, args.gpu_mem or CARDS[args.gpu].memory_gib, args.mfu,
                  args.samples, args.mean_tokens, args.seq_len)
    try:
        result, notes, fits, sentence = plan(args.config, args.overrides, setup, llm=args.llm, vision=args.vision)
    except ConfigError as e:
        print(f"llava-pipeline plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**result, "setup": asdict(setup), "notes": notes, "fits": fits, "verdict": sentence},
                         indent=2))
    else:
        print(render(result, setup, notes, fits, sentence))
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
