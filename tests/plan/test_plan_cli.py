"""`llava-pipeline plan` on the shipped real recipes, and the stages' start-up check that refuses a config which cannot
fit on the GPU before any weight is read."""
import json
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[2]
ALIGN = str(REPO / "configs" / "vicuna-7b-align.yaml")
INSTRUCT = str(REPO / "configs" / "vicuna-7b-instruct.yaml")
LORA = str(REPO / "configs" / "vicuna-7b-instruct-lora.yaml")


def plan_json(capsys, *argv) -> tuple[int, dict]:
    code = main(["plan", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_align_recipe_on_a100s(capsys):
    code, result = plan_json(capsys, "--config", ALIGN, "--gpu", "a100-80g", "--samples", "558128")
    assert code == 0 and result["fits"] and result["verdict"].startswith("fits with")
    assert result["params"]["components"]["llm"] == 6_738_415_616  # from the directory's name: vicuna-7b-v1.5
    assert result["params"]["trainable"] == result["params"]["components"]["projector"]
    assert result["global_batch"] == 256 and result["time"]["steps_per_epoch"] == 558128 // 256
    assert any("vicuna-7b-v1.5" in note for note in result["notes"])

    code, result = plan_json(capsys, "--config", ALIGN, "--gpu", "a100-40g")
    assert code == 1 and not result["fits"]
    assert "try train.micro_batch_size=16 train.grad_accum=2" in result["verdict"]
    code, result = plan_json(capsys, "--config", ALIGN, "--gpu", "a100-40g", "train.micro_batch_size=16",
                             "train.grad_accum=2")
    assert code == 0 and result["global_batch"] == 256  # the suggestion fits and keeps the global batch


def test_instruct_recipes_need_the_architecture_before_stage_one_ran(capsys):
    assert main(["plan", "--config", INSTRUCT]) == 2
    assert "align_dir" in capsys.readouterr().err
    code, result = plan_json(capsys, "--config", LORA, "--llm", "vicuna-7b-v1.5", "--gpu", "a10-24g", "--gpus", "1")
    assert code == 1 and "train.micro_batch_size=1 train.grad_accum=16" in result["verdict"]
    assert result["params"]["trainable_by_component"]["llm"] == 32 * 128 * (8 * 4096 + 3 * (4096 + 11008))
    memory = result["memory"]
    base = 6_738_415_616
    # one rank, ZeRO-3: full fine-tuning keeps 16 more bytes per LLM weight; NF4 stores the frozen base in 0.5625
    assert memory["adapter"]["full_finetune_states"] - memory["model_states"] > 16 * base - 16 * 400e6
    assert memory["model_states"] - memory["adapter"]["nf4_base_states"] == int((2 - 0.5625) * base)


def test_unknown_architectures_are_named(capsys):
    assert main(["plan", "--config", ALIGN, "model.llm=/models/llama9"]) == 2
    assert "/models/llama9 does not exist and its name is not a LLaMA preset" in capsys.readouterr().err
    assert main(["plan", "--config", ALIGN, "model.vision_tower=/models/siglip"]) == 2
    assert "pass --vision NAME_OR_DIR" in capsys.readouterr().err


def test_text_output_and_global_batch_hint(capsys):
    assert main(["plan", "--config", INSTRUCT, "--llm", "vicuna-7b-v1.5", "--gpus", "4", "--samples", "1000"]) == 0
    out = capsys.readouterr().out
    assert "global batch: 16 x 1 x 4 ranks = 64" in out and "set train.grad_accum=2" in out
    assert "verdict: fits with" in out and "steps per epoch: 15" in out


@pytest.fixture()
def fake_gpu(monkeypatch):
    """torch reports one CUDA device of the given size (the check reads nothing else of CUDA)."""
    def set_memory(gib: float):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, int(gib * 2**30)))
    monkeypatch.delenv("LLAVA_SKIP_FIT_CHECK", raising=False)
    return set_memory


def test_align_refuses_before_reading_weights(tmp_path, fake_gpu):
    from stages import align
    from stages.common import bind_stage
    from stages.trainer import TrainerError
    from llava.model.llama import CheckpointError

    llm = tmp_path / "vicuna"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "vocab_size": 32000}))  # and no weights at all
    (llm / "tokenizer.model").write_bytes(b"")
    cfg = bind_stage(align.SCHEMA, {"output_dir": str(tmp_path / "out"), "shards": str(tmp_path),
                                    "model": {"llm": str(llm), "vision_tower": "ViT-L-14-336"},
                                    "train": {"gradient_checkpointing": True}},  # as the shipped recipe
                     name="align", train_sections=align.TRAIN_SECTIONS)
    fake_gpu(40)
    with pytest.raises(TrainerError, match="does not fit.*try train.micro_batch_size=16 train.grad_accum=2"):
        align.build(cfg)
    fake_gpu(80)  # fits: the stage goes on to read the weights, which this directory does not have
    with pytest.raises(CheckpointError):
        align.build(cfg)
