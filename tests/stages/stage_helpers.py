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
