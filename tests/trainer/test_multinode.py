"""Multi-node rehearsal on one machine: stage 2 as 2 "nodes" x 1 rank (two torchrun agents, `--nnodes 2
--node-rank 0|1`, static rendezvous on 127.0.0.1), stopped after 2 steps and resumed to step 4 by two new agents
meeting through torchrun's c10d rendezvous instead, ends with the same weights as one uninterrupted 1 node x 2 ranks
run (`--nproc 2`). The agent commands are the ones docs/planning.md shows for real nodes, with 127.0.0.1 standing in
for the first node's address."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TRAIN = {"precision": "fp32", "num_workers": 0, "tensorboard": False, "peak_flops": 1e11, "log_every": 1,
         "warmup_ratio": 0.0, "lr_schedule": "constant", "lr": 5e-3, "micro_batch_size": 2, "zero_stage": 2,
         "gradient_checkpointing": False}


@pytest.fixture(scope="module")
def stage2_config(tmp_path_factory) -> Path:
    return write_stage2_setup(tmp_path_factory.mktemp("multinode"))


def write_stage2_setup(root: Path) -> Path:
    """A tiny stage-2 setup read from files as a real one is (LLaMA directory + tokenizer, tower weights, projector,
    scene instruction data); returns its instruct config file. Also used by test_bf16.py."""
    from safetensors.torch import save_file

    from data_gen.driver import generate
    from data_gen.scenes import render_scenes
    from llava.conversation import get_template
    from llava.model.llama import Llama, LlamaConfig
    from llava.model.llava import LlavaConfig, LlavaModel
    from llava.model.vision import build_vision_tower
    from llava.tokenizer import Tokenizer

    render_scenes(root / "scenes", 16, seed=0, size=32, shards_per=8)
    generate(root / "scenes" / "captions.jsonl", root / "train.json", backend="offline",
             types=["short_answer", "conversation"], progress=False, workers=1)
    samples = json.loads((root / "train.json").read_text())
    texts = [get_template("vicuna_v1").render(s["conversations"]) for s in samples]
    tokenizer = Tokenizer.train(texts, root / "tokenizer.model", vocab_size=1000)
    torch.manual_seed(0)
    llm = Llama(LlamaConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
                            vocab_size=tokenizer.vocab_size, max_seq_len=256)).init_weights(seed=0)
    llm.save_hf(root / "llm")
    (root / "llm" / "tokenizer.model").write_bytes((root / "tokenizer.model").read_bytes())
    tower = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}
    model = LlavaModel(LlavaConfig(vision_tower=tower, llm=llm.config), llm=llm, vision=build_vision_tower(tower))
    save_file({f"visual.{k}": v.contiguous() for k, v in model.vision.visual.state_dict().items()},
              str(root / "tower.safetensors"))
    model.save_projector(root / "mm_projector.safetensors")
    config = {"data": str(root / "train.json"), "image_folder": str(root / "scenes" / "images"), "max_len": 256,
              "model": {"llm": str(root / "llm"), "vision_tower": tower,
                        "vision_weights": str(root / "tower.safetensors")},
              "projector": str(root / "mm_projector.safetensors"), "output_dir": str(root / "unused"),
              "train": {**TRAIN, "max_steps": 4}}
    (root / "instruct.yaml").write_text(yaml.safe_dump(config))
    return root / "instruct.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_command(node_rank: int, port: int, rendezvous: str, config: Path, *overrides: str) -> list[str]:
    """One node's launcher (`torchrun` is `python -m torch.distributed.run`): a static rendezvous at the first node's
    address with this node's `--node-rank`, or torchrun's c10d rendezvous (node ranks assigned on arrival)."""
    meet = (["--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port)]
            if rendezvous == "static" else ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"])
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", *meet,
            "-m", "pipeline.cli", "instruct", "--config", str(config), *overrides]


def run_two_nodes(rendezvous: str, config: Path, *overrides: str) -> None:
    port = free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(agent_command(rank, port, rendezvous, config, *overrides), cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    for rank, (agent, output) in enumerate(zip(agents, outputs)):
        assert agent.returncode == 0, f"node {rank} failed:\n{output[-4000:]}"


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = {}
    for file in sorted((out / "final").rglob("*.safetensors")):
        weights.update({f"{file.name}:{k}": v for k, v in load_file(str(file)).items()})
    assert weights
    return weights


def test_two_nodes_with_resume_equal_one_node_two_ranks(stage2_config, tmp_path):
    from pipeline.cli import main

    reference = tmp_path / "one_node"
    assert main(["instruct", "--config", str(stage2_config), "--nproc", "2", f"output_dir={reference}"]) == 0

    two_nodes = tmp_path / "two_nodes"
    run_two_nodes("static", stage2_config, f"output_dir={two_nodes}", "train.max_steps=2")
    first = json.loads(next((two_nodes / "checkpoints").glob("*/complete.json")).read_text())
    assert first["world_size"] == 2 and first["step"] == 2
    run_two_nodes("c10d", stage2_config, f"output_dir={two_nodes}", "--resume")  # new agents continue to step 4

    records = [json.loads(line) for line in (two_nodes / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in records)
    ours, theirs = final_weights(two_nodes), final_weights(reference)
    assert set(ours) == set(theirs)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) == 0
