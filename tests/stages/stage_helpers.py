"""Small helpers for the stage tests (imported by conftest and the test files)."""
import json
from pathlib import Path

import torch

# Training settings every micro run shares: fp32 on the CPU, no worker processes, no hardware probe.
MICRO_TRAIN = {"precision": "fp32", "num_workers": 0, "tensorboard": False, "peak_flops": 1e11, "log_every": 1,
               "warmup_ratio": 0.0}


def bound(stage, data: dict, resume=None):
    """`data` bound to a stage module's config the way its command line binds it."""
    from stages.common import bind_stage

    return bind_stage(stage.SCHEMA, data, name=stage.__name__, train_sections=stage.TRAIN_SECTIONS, resume=resume)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(before: dict, model: torch.nn.Module, prefix: str) -> list[str]:
    """Names under `prefix` whose values differ from `before` (bitwise)."""
    now = dict(model.named_parameters())
    names = [n for n in before if n.startswith(prefix)]
    assert names, f"no parameters under {prefix!r}"
    return [n for n in names if not torch.equal(before[n], now[n].detach())]


def losses(output_dir: Path) -> list[float]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if line.strip()]


MICRO_BASE = {
    "tokenizer": {"vocab_size": 400},
    "clip": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "embed_dim": 32,
             "text_width": 32, "text_heads": 2, "text_layers": 1, "context_length": 40,
             "train": {**MICRO_TRAIN, "max_steps": 3, "micro_batch_size": 8}},
    "lm": {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_hidden": 64, "block_size": 32,
           "max_seq_len": 256, "train": {**MICRO_TRAIN, "max_steps": 12, "micro_batch_size": 8, "lr": 1e-2}},
}


def instruct_config(align_run, scene_data, out, **extra):
    from stages import instruct

    train = {**MICRO_TRAIN, "max_steps": 4, "micro_batch_size": 4, "lr": 5e-3, "zero_stage": 0,
             "gradient_checkpointing": False, **extra.pop("train", {})}
    return bound(instruct, {"output_dir": str(out), "align_dir": str(align_run.out), "data": str(scene_data.instruct),
                            "image_folder": str(scene_data.images), "max_len": 256, "train": train, **extra})
