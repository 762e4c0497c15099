"""Stage 2, visual instruction tuning: projector + language model (or an adapter + the projector) on LLaVA JSON data.

The model is stage 1's (`align_dir`: its model_config.json and mm_projector.safetensors), or one described in a
`model:` section with an optional `projector` file (LLaVA's `pretrain_mm_mlp_adapter`, .bin or .safetensors). Data:
LLaVA's instruction JSON, text-only samples included, rendered with `template` (vicuna_v1 by default), batched by
modality and length (LLaVA's `group_by_modality_length`). The vision tower stays frozen unless `tune_vision`.

Full tuning writes `output_dir/final/` = `LlavaModel.save` (self-contained: weights, tokenizer, config). With
`adapter: {method: lora, r: 8, ...}` (any llava.adapters method and its options) only the adapter and the projector
train; `final/` then holds `adapter_config.json` + `adapter_model.safetensors` (adapter and projector tensors), and
`adapter_config.json` names its base, `output_dir/base_model/` (the frozen model with stage 1's projector, written
once before training), so chat and eval load base + adapter with no options repeated. Under ZeRO-3 every saved tensor
is gathered first; an empty file is never written.

`eval: {question_file, image_folder, ...}` with `train.eval_every: N` answers a held-out question file every N steps
(batched greedy decoding, exact match) and logs `eval/accuracy` and per-category scores with the training metrics;
`run(cfg, eval_fn=...)` takes any other `(model, step) -> dict` hook instead.

LLaVA-1.5's recipe: lr 2e-5, global batch 128, one epoch, 3 % warmup then cosine, ZeRO-3, bf16, model_max_length
2048, gradient checkpointing (configs/vicuna-7b-instruct.yaml; LoRA: r 128, alpha 256, lr 2e-4, projector lr 2e-5).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from stages.config import ConfigError, dump_yaml
from stages import common
from stages.align import PROJECTOR_FILE
from stages.trainer import TrainConfig

FINAL_DIR, BASE_DIR = "final", "base_model"

TRAIN_SECTIONS = {
    "train": ("", dict(lr=2e-5, weight_decay=0.0, warmup_ratio=0.03, lr_schedule="cosine", epochs=1,
                       micro_batch_size=16, grad_accum=1, precision="bf16", zero_stage=3,
                       gradient_checkpointing=True)),
}


@dataclass
class EvalSpec:
    """A held-out question file answered during training (LLaVA's question format, with reference answers)."""
    question_file: str
    image_folder: str | None = None  # folder the question file's image paths start from
    limit: int | None = 200  # first N questions (keeps the periodic eval cheap)
    batch_size: int = 16
    max_new_tokens: int = 16


@dataclass
class InstructConfig:
    output_dir: str
    data: str  # LLaVA instruction JSON
    image_folder: str | None = None  # folder the data's image paths start from
    align_dir: str | None = None  # stage 1's output_dir: the model to start from and its trained projector
    model: common.ModelSpec | None = None  # instead of align_dir: the model's parts (then `projector` is optional)
    projector: str | None = None  # with `model`: a stage-1 projector file (ours or LLaVA's mm_projector.bin)
    template: str = "vicuna_v1"
    max_len: int = 2048  # positions after the image splice (LLaVA's model_max_length)
    image_aspect_ratio: str | None = None  # pad | crop | resize; None: as stage 1 (LLaVA-1.5: crop, then pad)
    tune_vision: bool = False  # also train the vision tower (the layers its selected features depend on)
    group_by_modality_length: bool = True
    adapter: dict | None = None  # {method: lora, r: 8, alpha: 16, ...}: train an adapter + the projector instead
    eval: EvalSpec | None = None
    on_error: str = "stop"  # stop | skip (a bad sample is logged and replaced by another of its modality)
    train: TrainConfig | None = None


SCHEMA = InstructConfig  # what `--config` binds to; TRAIN_SECTIONS gives its train defaults


# ---- the model -----------------------------------------------------------------------------------------------------

def starting_model(cfg: InstructConfig):
    """(model, tokenizer): stage 1's model with its trained projector, set up for this stage's template and length."""
    if (cfg.align_dir is None) == (cfg.model is None):
        raise ConfigError("instruct: give exactly one of align_dir (stage 1's output) or model (the model's parts)")
    dtype = common.DTYPES[cfg.train.precision]
    if cfg.align_dir is not None:
        if cfg.projector is not None:
            raise ConfigError("instruct.projector: align_dir already gives the projector; leave projector unset")
        config, tokenizer_file = common.read_model_config(Path(cfg.align_dir) / common.MODEL_CONFIG)
        config.template, config.max_len, config.freeze_vision = cfg.template, cfg.max_len, not cfg.tune_vision
        config.image_aspect_ratio = cfg.image_aspect_ratio or config.image_aspect_ratio
        projector = Path(cfg.align_dir) / PROJECTOR_FILE
    else:
        config, tokenizer_file = common.llava_config(cfg.model, template=cfg.template, max_len=cfg.max_len,
                                                     freeze_vision=not cfg.tune_vision)
        config.image_aspect_ratio = cfg.image_aspect_ratio or config.image_aspect_ratio
        projector = Path(cfg.projector) if cfg.projector else None
    from stages.memory import check_fits

    check_fits("instruct", cfg, config)  # on a GPU: refuse what cannot fit before reading any weight
    model, tokenizer = common.build_model(config, tokenizer_file, dtype, seed=cfg.train.seed)
    if projector is not None:
        model.load_projector(projector)
    else:
        common.log("[instruct] no stage-1 projector given: the projector starts from random weights")
    return model, tokenizer


def check_adapter_spec(cfg: InstructConfig) -> None:
    from stages.trainer import deepspeed_config

    method = cfg.adapter.get("method")
    if not isinstance(method, str):
        raise ConfigError(f"instruct.adapter: needs a 'method' (e.g. lora), got {cfg.adapter!r}")
    if "extra_trainable" in cfg.adapter:
        raise ConfigError("instruct.adapter.extra_trainable: the projector always trains with the adapter; "
                          "remove this key")
    if cfg.tune_vision:
        raise ConfigError("instruct: tune_vision with an adapter is not supported (the adapter trains the language "
                          "model only); drop one of them")
    zero_stage = deepspeed_config(cfg.train, 1)["zero_optimization"]["stage"]
    if method == "adalora" and (zero_stage != 0 or cfg.train.precision != "fp32"):
        # The trainer runs after_optimizer_step after engine.step(); only the plain fp32 optimizer path still has
        # the gradients AdaLoRA's importance scores read there.
        raise ConfigError(f"instruct.adapter: adalora needs train.zero_stage=0 and train.precision=fp32 (got ZeRO-"
                          f"{zero_stage}, {cfg.train.precision}): its rank allocation reads gradients after the "
                          "optimizer step, which DeepSpeed's ZeRO and mixed-precision optimizers have cleared")


def apply_adapter_spec(model: nn.Module, spec: dict) -> str:
    from llava.adapters import apply_adapter

    options = dict(spec)
    method = options.pop("method")
    apply_adapter(model, method, extra_trainable=("projector",), **options)
    return method


def adapter_hooks() -> dict:
    """AdaLoRA's orthogonality loss and rank allocation (no-ops for the other methods), as trainer hooks."""
    from llava import adapters

    return {"extra_loss": adapters.extra_loss, "after_optimizer_step": adapters.after_optimizer_step}


# ---- evaluation during training ------------------------------------------------------------------------------------

def question_file_eval(spec: EvalSpec, tokenizer, template: str, every: int) -> Callable[[nn.Module, int], dict]:
    """Held-out exact match with llava.evaluation's batched greedy answering (imported only when asked for)."""
    from llava.evaluation import make_eval_callback

    return make_eval_callback(spec.question_file, spec.image_folder, every=max(every, 1), limit=spec.limit,
                              batch_size=spec.batch_size, max_new_tokens=spec.max_new_tokens, tokenizer=tokenizer,
                              template=template)


# ---- saving --------------------------------------------------------------------------------------------------------

def save_adapter_final(model: nn.Module, final: Path, base_dir: Path) -> None:
    """Adapter + projector (gathered out of ZeRO-3 on every rank, written by rank 0) and the base it belongs to."""
    from llava.adapters import save_adapter, trainable_parameters
    from llava.adapters.api import CONFIG_FILE
    from llava.adapters.base import gathered
    from llava.io import atomic_write_json

    with gathered([p for _, p in trainable_parameters(model)]):
        if common.is_main():
            save_adapter(model, final)
    if common.is_main():
        config = json.loads((final / CONFIG_FILE).read_text(encoding="utf-8"))
        config["base_model"] = str(Path("..") / base_dir.name)  # relative: the run folder can move
        atomic_write_json(final / CONFIG_FILE, config)
    common.barrier()


def build(cfg: InstructConfig):
    """(model, tokenizer) ready to train: stage 1's model, and with `adapter` the adapter attached (its base saved
    first, to output_dir/base_model, while the model is still whole)."""
    from llava.model.llava import CONFIG_FILE

    if cfg.adapter is not None:
        check_adapter_spec(cfg)

    model, tokenizer = starting_model(cfg)
    if cfg.adapter is not None:
        base_dir = Path(cfg.output_dir) / BASE_DIR
        if common.is_main() and not (base_dir / CONFIG_FILE).is_file():
            model.save(base_dir, tokenizer=tokenizer)
        common.barrier()
        method = apply_adapter_spec(model, cfg.adapter)
        common.log(f"[instruct] {method} adapter: "
                   f"{sum(p.numel() for p in model.parameters() if p.requires_grad)} trainable parameters "
                   f"(projector included)")
    return model, tokenizer


def train(cfg: InstructConfig, model: nn.Module, tokenizer, eval_fn: Callable[[nn.Module, int], dict] | None = None
          ) -> dict:
    """Train and write `output_dir/final`; returns its path and the final metrics."""
    from llava.data.collate import Collator
    from llava.data.instruct import InstructDataset
    from llava.data.sampler import ModalityLengthGroupedSampler
    from stages.trainer import Trainer, setup_distributed

    out = Path(cfg.output_dir)
    dist_info = setup_distributed()
    common.save_resolved_config(cfg, out)
    if eval_fn is None and cfg.eval is not None:
        eval_fn = question_file_eval(cfg.eval, tokenizer, cfg.template, cfg.train.eval_every)
    dataset = InstructDataset(cfg.data, tokenizer, image_folder=cfg.image_folder,
                              image_processor=model.image_processor(), template=cfg.template, max_len=cfg.max_len,
                              num_image_tokens=model.num_image_tokens, on_error=cfg.on_error)
    sampler = None
    if cfg.group_by_modality_length:
        sampler = ModalityLengthGroupedSampler(dataset.lengths, dataset.has_image,
                                               batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                                               world_size=dist_info.world_size, rank=dist_info.rank,
                                               seed=cfg.train.seed)
    common.log(f"[instruct] {len(dataset)} samples ({int(dataset.has_image.sum())} with images) from {cfg.data}")
    trainer = Trainer(cfg.train, model, dataset, collate_fn=Collator(tokenizer.pad_id), sampler=sampler,
                      eval_fn=eval_fn, forward_only=None if cfg.tune_vision else lambda n: n.startswith("vision."),
                      **(adapter_hooks() if cfg.adapter is not None else {}))
    result = trainer.fit()

    final = out / FINAL_DIR
    if cfg.adapter is not None:
        save_adapter_final(trainer.model, final, out / BASE_DIR)
    else:
        common.save_full_model(trainer, trainer.model, final, tokenizer)
    if common.is_main():
        from llava.io import atomic_write_text

        atomic_write_text(final / "training_config.yaml", dump_yaml(cfg))
    common.barrier()
    return {"model": str(final), "base_model": str(out / BASE_DIR) if cfg.adapter is not None else None,
            "metrics": result.metrics}


def run(cfg: InstructConfig, eval_fn: Callable[[nn.Module, int], dict] | None = None) -> dict:
    from stages.trainer import setup_distributed

    setup_distributed()
    return train(cfg, *build(cfg), eval_fn=eval_fn)


HELP = (__doc__.split("\n\n")[0] + " Reads: stage 1's output (align_dir) or a model section, the instruction "
        "JSON (data) and its images (image_folder). Writes: output_dir/final (a whole model, or an adapter + "
        "projector on output_dir/base_model), config.yaml, metrics.jsonl, checkpoints/.")


def main(argv: list[str] | None = None) -> int:
    return common.stage_main(argv, name="instruct", description=HELP, schema=SCHEMA,
                             train_sections=TRAIN_SECTIONS, run=run, entry=main)


if __name__ == "__main__":
    import sys

    sys.exit(main())
