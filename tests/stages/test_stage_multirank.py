"""Two ranks under torchrun (`--nproc 2`): stage 1 on ZeRO-2, stage 2 on ZeRO-3 (full and LoRA), saved files whole."""
from pathlib import Path

import pytest
import torch
import yaml

from stage_helpers import MICRO_TRAIN

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _write(path, config):
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_two_ranks_align_zero2_then_instruct_zero3_full_and_lora(tmp_path, base_run, scene_data):
    from safetensors.torch import load_file

    from llava.model.llama import Llama
    from llava.model.llava import LlavaModel
    from pipeline.cli import main
    from llava.loading import load_model

    train = {**MICRO_TRAIN, "max_steps": 3, "micro_batch_size": 2}
    align_file = _write(tmp_path / "align.yaml", {
        "output_dir": str(tmp_path / "align"), "shards": str(scene_data.shards), "max_len": 128,
        "model": {"llm": base_run.outputs["llm"], "vision_tower": base_run.outputs["vision_tower"]},
        "train": {**train, "lr": 1e-2}})
    assert main(["align", "--config", align_file, "--nproc", "2"]) == 0  # default zero_stage 2
    projector = load_file(str(tmp_path / "align" / "mm_projector.safetensors"))
    assert projector and all(t.numel() > 0 for t in projector.values())
    assert sorted((tmp_path / "align" / "checkpoints").glob("step_*/rng_state_rank*.safetensors"))[-1].name.endswith("1.safetensors")

    instruct = {"align_dir": str(tmp_path / "align"), "data": str(scene_data.instruct), "max_len": 256,
                "image_folder": str(scene_data.images), "train": {**train, "lr": 5e-3, "zero_stage": 3}}
    full_file = _write(tmp_path / "full.yaml", {**instruct, "output_dir": str(tmp_path / "full")})
    assert main(["instruct", "--config", full_file, "--nproc", "2", "train.gradient_checkpointing=true"]) == 0
    model = LlavaModel.load(tmp_path / "full" / "final")
    clip = load_file(str(base_run.outputs["vision_tower"] + "/open_clip_model.safetensors"))
    assert all(torch.equal(clip[f"visual.{k}"], v) for k, v in model.vision.visual.state_dict().items())
    base_llm = Llama.from_hf(base_run.outputs["llm"]).state_dict()
    assert not torch.equal(model.llm.state_dict()["layers.0.mlp.up_proj.weight"], base_llm["layers.0.mlp.up_proj.weight"])

    lora_file = _write(tmp_path / "lora.yaml", {**instruct, "output_dir": str(tmp_path / "lora"),
                                                "adapter": {"method": "lora", "r": 4}})
    assert main(["instruct", "--config", lora_file, "--nproc", "2", "train.gradient_checkpointing=false"]) == 0
    saved = load_file(str(tmp_path / "lora" / "final" / "adapter_model.safetensors"))
    assert saved and all(t.numel() > 0 for t in saved.values())  # gathered out of ZeRO-3, never empty
    loaded = load_model(tmp_path / "lora" / "final")
    trained_projector = {k.removeprefix("projector."): v for k, v in saved.items() if k.startswith("projector.")}
    for key, tensor in loaded.model.projector.state_dict().items():
        assert torch.equal(tensor, trained_projector[key])
        assert not torch.equal(tensor, projector[f"model.mm_projector.{key}"])


def test_two_ranks_base_stage(tmp_path, scene_data):
    """CLIP's loss gathers the other rank's features; both trainings and the saved files come out whole."""
    import json

    import open_clip

    from stage_helpers import MICRO_BASE
    from llava.model.llama import Llama
    from pipeline.cli import main

    config = {**MICRO_BASE, "output_dir": str(tmp_path / "base"), "captions": str(scene_data.captions),
              "instruct_data": [str(scene_data.instruct)]}
    # ZeRO-3 partitioning every parameter, however small: the objective reads CLIP's temperature, text positions and
    # projections outside their modules' forward (it registers them with DeepSpeed as external parameters)
    zero3 = {**json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())}
    zero3["zero_optimization"] = {**zero3["zero_optimization"], "stage3_param_persistence_threshold": 0}
    (tmp_path / "zero3_all.json").write_text(json.dumps(zero3))
    config["clip"] = {**config["clip"], "train": {**config["clip"]["train"], "micro_batch_size": 4,
                                                  "deepspeed_config": str(tmp_path / "zero3_all.json")}}
    config["lm"] = {**config["lm"], "train": {**config["lm"]["train"], "max_steps": 4}}
    assert main(["base", "--config", _write(tmp_path / "base.yaml", config), "--nproc", "2"]) == 0
    open_clip.create_model(f"local-dir:{tmp_path / 'base' / 'clip'}")
    Llama.from_hf(tmp_path / "base" / "llm")
    state = json.loads(next((tmp_path / "base" / "clip_train" / "checkpoints").glob("*/complete.json")).read_text())
    assert state["world_size"] == 2
