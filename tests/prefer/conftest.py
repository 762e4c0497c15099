"""A tiny saved LLaVA model (the "stage 2" every preference test starts from) and offline preference pairs about
scenes of its image size, made once per session."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# fp32 on the CPU, no worker processes, no hardware probe, a log line every step.
MICRO_TRAIN = {"precision": "fp32", "num_workers": 0, "tensorboard": False, "peak_flops": 1e11, "log_every": 1,
               "warmup_ratio": 0.0, "zero_stage": 0, "gradient_checkpointing": False, "micro_batch_size": 2,
               "lr": 1e-3}


def tiny_model(root: Path, captions: Path):
    from data_gen.preference import read_pairs
    from data_gen.records import read_captions
    from llava.model.llama import LlamaConfig
    from llava.model.llava import LlavaConfig, LlavaModel
    from llava.tokenizer import Tokenizer

    texts = [c for r in read_captions(captions)[0] for c in r.captions]
    texts += [p["chosen"] for p in read_pairs(root / "pairs.json")] + ["Is there a red circle? Yes No"] * 5
    tokenizer = Tokenizer.train(texts * 3, root / "tokenizer.model", vocab_size=300)
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_tower={"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
        projector_type="mlp2x_gelu", max_len=384,
        llm=LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.vocab_size,
                        ffn_hidden=128, max_seq_len=512))
    return LlavaModel(config), tokenizer


@pytest.fixture(scope="session")
def prefer_data(tmp_path_factory):
    from data_gen.preference import generate_pairs
    from data_gen.scenes import render_scenes

    root = tmp_path_factory.mktemp("prefer_data")
    scenes = render_scenes(root / "scenes", 12, seed=0, size=32, captions_per_image=1)
    generate_pairs(scenes["captions"], root / "pairs.json", types={"description": 1, "short": 1}, progress=False)
    model, tokenizer = tiny_model(root, Path(scenes["captions"]))
    model.save(root / "stage2", tokenizer=tokenizer)
    return SimpleNamespace(root=root, model=root / "stage2", pairs=root / "pairs.json",
                           images=Path(scenes["image_folder"]), captions=Path(scenes["captions"]))


def prefer_config(data, out: Path, **extra) -> dict:
    train = {**MICRO_TRAIN, "max_steps": 4, **extra.pop("train", {})}
    return {"output_dir": str(out), "model": str(data.model), "data": str(data.pairs),
            "image_folder": str(data.images), "train": train, **extra}
