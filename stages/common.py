"""What the three recipes (base, align, instruct) share: their command line, strict config binding with per-stage
training defaults, the model spec they build LLaVA from, and saving under ZeRO-3.

Command line (every stage):

    llava-pipeline align --config F.yaml [key=value ...] [--nproc N] [--resume | --no-resume]

The stage config is a dataclass; the file plus the dotted `key=value` overrides are bound to it strictly (a typo'd key
is an error naming the nearest valid key). Each `train` section is a `stages.trainer.TrainConfig` whose unset keys take
the stage's own defaults (LLaVA's recipe values) and whose `output_dir` is the stage's `output_dir`. The resolved
config is printed and written to `<output_dir>/config.yaml` before anything trains.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from stages import lifeline
from stages.config import ConfigError, bind, dump_yaml, load_config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's `local-dir:` layout; the base stage writes its CLIP this way
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
MODEL_CONFIG = "model_config.json"  # written by stage 1: how to rebuild the exact model it trained


def _user_errors() -> tuple[type[Exception], ...]:
    from llava.adapters import AdapterError
    from llava.conversation import ConversationError
    from llava.data.errors import DataError
    from llava.model.llama import CheckpointError
    from llava.model.vision import VisionTowerError
    from stages.trainer import TrainerError

    return ConfigError, AdapterError, ConversationError, DataError, CheckpointError, VisionTowerError, TrainerError


# ---- ranks ---------------------------------------------------------------------------------------------------------

def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def log(message: str) -> None:
    if is_main():
        print(message, flush=True)


# ---- the model a stage trains ----------------------------------------------------------------------------------------

@dataclass
class ModelSpec:
    """Where LLaVA's parts come from (LLaVA's ModelArguments). Paths are local: nothing is downloaded."""
    llm: str  # Hugging Face LLaMA directory, or a saved llava model directory (its llm/ is used)
    # An open_clip model name ("ViT-L-14-336"), an open_clip config (a mapping or a .json file), a Hugging Face CLIP
    # directory, or a directory in open_clip's local-dir layout (open_clip_config.json + open_clip_model.safetensors,
    # as the base stage writes).
    vision_tower: Any = "ViT-L-14-336"
    vision_weights: str | None = None  # for a name or dict: an open_clip tag (local cache only) or a weights file
    tokenizer: str | None = None  # SentencePiece model; default <llm>/tokenizer.model
    select_layer: int = -2
    select_feature: str = "patch"
    projector_type: str = "mlp2x_gelu"
    image_aspect_ratio: str = "pad"


def _llm_dir(path: Path) -> Path:
    from llava.model.llava import CONFIG_FILE

    if not path.is_dir():
        raise ConfigError(f"model.llm: {path} is not a directory (expected a Hugging Face LLaMA directory)")
    return path / "llm" if (path / CONFIG_FILE).is_file() else path


def _open_clip_json(config_file: Path) -> tuple[dict, dict]:
    """(model config, preprocessing) of an open_clip config file: a model config, or local-dir's {"model_cfg", ...}."""
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{config_file}: expected an open_clip model config object")
    return data.get("model_cfg", data), data.get("preprocess_cfg", {})


def open_clip_dir(path: Path) -> tuple[dict, str, dict]:
    """(model config, weights file, preprocessing) of an open_clip local-dir directory."""
    config, preprocess = _open_clip_json(path / OPEN_CLIP_CONFIG)
    weights = next((path / name for name in OPEN_CLIP_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise ConfigError(f"{path}: no {' or '.join(OPEN_CLIP_WEIGHTS)} next to {OPEN_CLIP_CONFIG}")
    return config, str(weights), preprocess


def llava_config(spec: ModelSpec, *, template: str, max_len: int, freeze_vision: bool = True):
    """The LlavaConfig that `LlavaModel.build` turns into a model with `spec`'s pretrained parts, and the tokenizer."""
    from llava.model.llava import LlavaConfig

    root = Path(spec.llm)
    llm = _llm_dir(root)
    candidates = [Path(spec.tokenizer)] if spec.tokenizer else [llm / "tokenizer.model", root / "tokenizer.model"]
    tokenizer = next((c for c in candidates if c.is_file()), None)
    if tokenizer is None:
        raise ConfigError(f"model.tokenizer: {candidates[0]} not found; set model.tokenizer to the SentencePiece "
                          "tokenizer.model of the language model")
    tower, weights, preprocess = spec.vision_tower, spec.vision_weights, {}
    if isinstance(tower, str) and (Path(tower) / OPEN_CLIP_CONFIG).is_file():
        if weights is not None:
            raise ConfigError(f"model.vision_weights: {tower} holds its own weights; leave vision_weights unset")
        tower, weights, preprocess = open_clip_dir(Path(tower))
    elif isinstance(tower, str) and tower.endswith(".json") and Path(tower).is_file():
        tower, preprocess = _open_clip_json(Path(tower))
    elif not isinstance(tower, (str, dict)):
        raise ConfigError(f"model.vision_tower: expected a name, a directory or a config mapping, got {tower!r}")
    config = LlavaConfig(
        vision_tower=tower, vision_pretrained=str(Path(weights).resolve()) if weights and Path(weights).is_file()
        else weights, select_layer=spec.select_layer, select_feature=spec.select_feature, freeze_vision=freeze_vision,
        image_aspect_ratio=spec.image_aspect_ratio, projector_type=spec.projector_type, llm_path=str(llm.resolve()),
        template=template, max_len=max_len, image_mean=preprocess.get("mean"), image_std=preprocess.get("std"),
        image_interpolation=preprocess.get("interpolation"))
    if isinstance(tower, str) and Path(tower).is_dir():
        config.vision_tower = str(Path(tower).resolve())
    return config, tokenizer.resolve()


def build_model(config, tokenizer: Path, dtype: torch.dtype, seed: int = 0):
    """LlavaModel with pretrained LLM and tower (a fresh projector), weights in `dtype`, tokenizer attached.

    The fresh weights (the projector, and whatever `config` leaves unloaded) are drawn from `seed` on a forked RNG:
    torch seeds its default generator differently in every process, so without it two runs of one config started
    from different projectors (stage 1's first loss: 2.80, 3.83 and 2.67 in three runs of the demo)."""
    from llava.model.llava import LlavaModel
    from llava.tokenizer import Tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaModel.build(config, dtype=dtype)
    model.tokenizer_path = tokenizer
    tok = Tokenizer(tokenizer)
    if tok.vocab_size > model.llm.config.vocab_size:
        raise ConfigError(f"{tokenizer} has {tok.vocab_size} pieces but the language model in {config.llm_path} "
                          f"has only {model.llm.config.vocab_size} embeddings; they do not belong together")
    return model, tok


def write_model_config(path: Path, config, tokenizer: Path) -> None:
    from llava.io import atomic_write_json

    atomic_write_json(path, {"llava": config.to_dict(), "tokenizer": str(tokenizer)})


def read_model_config(path: Path):
    """(LlavaConfig, tokenizer path) recorded by stage 1."""
    from llava.model.llava import LlavaConfig

    if not path.is_file():
        raise ConfigError(f"{path}: not found; is {path.parent} the output_dir of a finished align stage?")
    data = json.loads(path.read_text(encoding="utf-8"))
    return LlavaConfig.from_dict(data["llava"], where=str(path)), Path(data["tokenizer"])


# ---- saving out of ZeRO ----------------------------------------------------------------------------------------------

def projector_file_state(trainer) -> dict[str, torch.Tensor]:
    """The projector under LLaVA's key names, gathered out of ZeRO-3 (collective; full tensors on rank 0)."""
    from llava.model.llava import PROJECTOR_PREFIX

    state = trainer.state_dict(lambda name: name.startswith("projector."))
    if is_main():
        empty = [k for k, v in state.items() if v.numel() == 0]
        if empty or not state:
            raise RuntimeError(f"refusing to write an empty projector (tensors {empty or 'none'}); was it gathered?")
    return {PROJECTOR_PREFIX + k.removeprefix("projector."): v for k, v in state.items()}


def save_full_model(trainer, model, path: Path, tokenizer) -> None:
    """`LlavaModel.save(path)` of the trained model; under ZeRO-3 its weights are gathered first (collective)."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        if is_main():
            model.save(path, tokenizer=tokenizer)
        barrier()
        return
    from llava.model.llava import LlavaModel

    dtype = model.llm.embed_tokens.weight.dtype
    state = trainer.state_dict(dtype=dtype)
    if is_main():
        with torch.device("meta"):
            whole = LlavaModel(model.config)
        whole.load_state_dict(state, assign=True)
        whole.save(path, tokenizer=tokenizer)
    barrier()


# ---- configs -------------------------------------------------------------------------------------------------------

def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def _section(data: dict, path: str) -> dict:
    node = data
    for part in path.split("."):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{path}: expected a mapping of training settings, got {child!r}")
        node = child
    return node


def bind_stage(schema: type, data: dict, *, name: str, train_sections: dict[str, tuple[str, dict]],
               resume: bool | None = None):
    """Bind `data` to `schema`; `train_sections` maps each train section path to (output subfolder, defaults)."""
    data = copy.deepcopy(data)
    out = data.get("output_dir")
    if not isinstance(out, str) or not out:
        raise ConfigError(f"{name}: output_dir is required (the folder this stage writes)")
    for path, (subdir, defaults) in train_sections.items():
        given = _section(data, path)
        if "output_dir" in given:
            raise ConfigError(f"{name}.{path}.output_dir: set the stage's output_dir instead; training state goes "
                              f"under {Path(out) / subdir if subdir else out}")
        merged = _deep_merge(defaults, given)
        merged["output_dir"] = str(Path(out) / subdir) if subdir else out
        if resume is not None:
            merged["resume"] = resume
        given.clear()
        given.update(merged)
    config = bind(schema, data, name)
    for path in train_sections:
        node = config
        for part in path.split("."):
            node = getattr(node, part)
        node.check()
    return config


def save_resolved_config(config, output_dir: str | Path) -> None:
    from llava.io import atomic_write_text

    text = dump_yaml(config)
    if is_main():
        print(f"[config] resolved:\n{text}", flush=True)
        atomic_write_text(Path(output_dir) / "config.yaml", text)


def stage_main(argv: list[str] | None, *, name: str, description: str, schema: type,
               train_sections: dict[str, tuple[str, dict]], run: Callable[[Any], dict],
               entry: Callable[[list[str]], int]) -> int:
    """Parse the command line, relaunch as N ranks when asked, bind the config strictly and run the stage."""
    from stages import launch

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=f"llava-pipeline {name}", description=description)
    parser.add_argument("--config", help="YAML/JSON stage config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides applied after the file, e.g. train.lr=2.0e-5 model.llm=/models/vicuna")
    parser.add_argument("--nproc", type=int, default=1, help="ranks to start on this machine (torchrun)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                        help="--resume: must continue from a checkpoint; --no-resume: must start fresh; "
                             "default: continue when a complete checkpoint exists")
    args = parser.parse_args(argv)
    try:  # in the launcher too: a bad config is reported once, before any rank starts
        data = load_config(args.config, args.overrides)
        config = bind_stage(schema, data, name=args.config or name, train_sections=train_sections,
                            resume=args.resume)
    except ConfigError as e:
        print(f"llava-pipeline {name}: {e}", file=sys.stderr)
        return 2
    try:
        with _output_folder(config.output_dir):
            if args.nproc > 1 and not launch.launched_rank():
                rest = [a for a in argv if a != f"--nproc={args.nproc}"]
                if "--nproc" in rest:
                    i = rest.index("--nproc")
                    del rest[i:i + 2]
                return launch.run(entry, rest, args.nproc)
            run(config)
    except (*_user_errors(), lifeline.FolderInUse) as e:  # bad input named by the message: no traceback needed
        print(f"llava-pipeline {name}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def _output_folder(output_dir: str):
    """The stage's output folder, locked for this command and the ranks it starts (stages/lifeline.py), as
    `llava-pipeline run` locks its out_dir: a second command on the folder is refused while any of them lives. Not
    again inside a rank, nor where the caller already holds a lock on a folder that contains it (the runner); then a
    stage command running alone in that folder refuses the caller. A command alone is refused inside a folder that a
    launch holds (a stage folder of a running `llava-pipeline run`)."""
    import contextlib

    from stages import launch

    held = os.environ.get(lifeline.FOLDER_LOCK)
    out = Path(output_dir).resolve()
    if launch.launched_rank():
        return contextlib.nullcontext()
    if held and out.is_relative_to(Path(held).parent):
        if out != Path(held).parent:
            lifeline.check_free(out)
        return contextlib.nullcontext()
    for folder in out.parents:
        lifeline.check_free(folder)
    return lifeline.hold_folder(out)

