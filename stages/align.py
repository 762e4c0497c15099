"""Stage 1, feature alignment: train only the projector, on image-caption pairs, with the `plain` template.

The vision tower and the language model are frozen; each sample is `<image>` + caption + "\\n" with only the caption
supervised (LLaVA's `preprocess_plain`), read from webdataset shards. LLaVA-1.5's recipe: lr 1e-3, global batch 256,
one epoch, no weight decay, 3 % warmup then cosine, ZeRO-2 (configs/vicuna-7b-align.yaml).

Writes to output_dir:
- `mm_projector.safetensors`: the projector under LLaVA's key names (`model.mm_projector.0.weight`, ...);
- `model_config.json`: the LlavaConfig (tower, feature layer, projector type, LLM path) and tokenizer, from which
  stage 2 rebuilds exactly this model (`align_dir` in its config);
- `config.yaml` (the resolved stage config), `metrics.jsonl`, `checkpoints/` (trainer state, for resuming).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages import common
from stages.trainer import TrainConfig

PROJECTOR_FILE = "mm_projector.safetensors"

TRAIN_SECTIONS = {
    "train": ("", dict(lr=1e-3, weight_decay=0.0, warmup_ratio=0.03, lr_schedule="cosine", epochs=1,
                       micro_batch_size=32, grad_accum=1, precision="bf16", zero_stage=2)),
}


@dataclass
class AlignConfig:
    output_dir: str
    model: common.ModelSpec
    shards: str  # webdataset shards: a folder of .tar files (with or without index.json) or a brace/glob pattern
    max_len: int = 2048  # positions after the image splice (LLaVA's model_max_length)
    shuffle_buffer: int = 1000  # samples held for shuffling within a rank's stream
    on_error: str = "stop"  # stop | skip (a bad sample is logged and left out)
    train: TrainConfig | None = None


SCHEMA = AlignConfig  # what `--config` binds to; TRAIN_SECTIONS gives its train defaults


def build(cfg: AlignConfig):
    """(model, tokenizer, the LlavaConfig it was built from): pretrained tower and LLM frozen, a fresh projector."""
    from stages.memory import check_fits

    llava_config, tokenizer_file = common.llava_config(cfg.model, template="plain", max_len=cfg.max_len)
    check_fits("align", cfg, llava_config)  # on a GPU: refuse what cannot fit before reading any weight
    model, tokenizer = common.build_model(llava_config, tokenizer_file, common.DTYPES[cfg.train.precision],
                                            seed=cfg.train.seed)
    model.llm.requires_grad_(False)
    return model, tokenizer, llava_config


def train(cfg: AlignConfig, model, tokenizer, llava_config) -> dict:
    """Train the projector and write it with the model config; returns the paths stage 2 reads and the metrics."""
    from llava.data.collate import Collator
    from llava.data.pairs import PairDataset
    from llava.io import atomic_save_safetensors
    from stages.trainer import Trainer

    out = Path(cfg.output_dir)
    common.save_resolved_config(cfg, out)
    dataset = PairDataset(cfg.shards, tokenizer, model.image_processor(), max_len=cfg.max_len,
                          shuffle_buffer=cfg.shuffle_buffer, seed=cfg.train.seed, on_error=cfg.on_error)
    common.log(f"[align] {dataset.total} pairs in {len(dataset.shards)} shards; training "
               f"{sum(p.numel() for p in model.projector.parameters())} projector parameters")
    trainer = Trainer(cfg.train, model, dataset, collate_fn=Collator(tokenizer.pad_id),
                      forward_only=lambda name: name.startswith("vision."))
    result = trainer.fit()
    state = common.projector_file_state(trainer)
    if common.is_main():
        atomic_save_safetensors(state, out / PROJECTOR_FILE)
        common.write_model_config(out / common.MODEL_CONFIG, llava_config, tokenizer.model_file)
    common.barrier()
    return {"projector": str(out / PROJECTOR_FILE), "model_config": str(out / common.MODEL_CONFIG),
            "metrics": result.metrics}


def run(cfg: AlignConfig) -> dict:
    from stages.trainer import setup_distributed

    setup_distributed()
    return train(cfg, *build(cfg))


HELP = (__doc__.split("\n\n")[0] + " Reads: the language model and vision tower directories (model.llm, "
        "model.vision_tower) and image-caption shards (shards). Writes: output_dir/mm_projector.safetensors, "
        "model_config.json, config.yaml, metrics.jsonl, checkpoints/.")


def main(argv: list[str] | None = None) -> int:
    return common.stage_main(argv, name="align", description=HELP, schema=SCHEMA,
                             train_sections=TRAIN_SECTIONS, run=run, entry=main)


if __name__ == "__main__":
    import sys

    sys.exit(main())
