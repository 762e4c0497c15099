"""Weights that do not belong to the model being built: a checkpoint of another shape, a cut file, a missing shard, a
tokenizer bigger than the embedding. Each is an error that names the file, the tensor and both shapes (or sizes),
raised before any weight is half-assigned."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from faults_lib import cases

TOWER = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}


def tiny_llama(**overrides):
    from llava.model import Llama

    return Llama.from_name("tiny", **overrides).init_weights(seed=0)


def saved_llama(root: Path, **overrides) -> Path:
    path = root / "llm"
    tiny_llama(**overrides).save_hf(path)
    return path


def tiny_llava(projector_type: str = "linear", llm_dim: int | None = None):
    from llava.model.llama import LlamaConfig
    from llava.model.llava import LlavaConfig, LlavaModel
    from llava.model.vision import arch_from_dict

    llm = LlamaConfig.from_name("tiny", **({"dim": llm_dim} if llm_dim else {}))
    return LlavaModel(LlavaConfig(vision_tower=arch_from_dict(TOWER), llm=llm, projector_type=projector_type))


def llm_of_other_shape(tmp_path):
    """config.json of one shape, weights of another (a file copied from the wrong model)."""
    from llava.model import Llama

    path = saved_llama(tmp_path)
    other = saved_llama(tmp_path / "other", ffn_hidden=128)
    (path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    return Llama.from_hf(path)


def cut_safetensors(tmp_path):
    from llava.model import Llama

    path = saved_llama(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    return Llama.from_hf(path)


def missing_shard(tmp_path):
    from llava.model import Llama

    path = tmp_path / "llm"
    tiny_llama().save_hf(path, max_shard_bytes=100_000)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    return Llama.from_hf(path)


def projector_of_other_shape(tmp_path):
    file = tmp_path / "mm_projector.safetensors"
    tiny_llava("mlp2x_gelu").save_projector(file)
    tiny_llava("linear").load_projector(file)


def vision_weights_of_other_shape(tmp_path):
    from safetensors.torch import save_file

    from llava.model.vision import build_vision_tower

    file = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in build_vision_tower({**TOWER, "width": 96}).visual.state_dict().items()},
              str(file))
    build_vision_tower(TOWER, str(file))


def adapter_of_other_rank(tmp_path):
    from llava.adapters import apply_adapter, load_adapter, save_adapter
    from llava.model import Llama

    save_adapter(apply_adapter(Llama.from_name("tiny"), "lora", r=4), tmp_path / "adapter")
    load_adapter(apply_adapter(Llama.from_name("tiny"), "lora", r=8), tmp_path / "adapter")


def adapter_weights_of_other_rank(tmp_path):
    """adapter_config.json says r=8 but the tensors are r=4 (files mixed from two runs)."""
    from llava.adapters import apply_adapter, load_adapter, save_adapter
    from llava.model import Llama

    save_adapter(apply_adapter(Llama.from_name("tiny"), "lora", r=4), tmp_path / "r4")
    save_adapter(apply_adapter(Llama.from_name("tiny"), "lora", r=8), tmp_path / "r8")
    (tmp_path / "r8" / "adapter_model.safetensors").write_bytes((tmp_path / "r4" / "adapter_model.safetensors").read_bytes())
    load_adapter(Llama.from_name("tiny"), tmp_path / "r8")


def tokenizer_bigger_than_embedding(tmp_path):
    from faults_lib import make_tokenizer
    from stages.common import ModelSpec, build_model, llava_config

    llm = saved_llama(tmp_path, vocab_size=300)
    make_tokenizer(llm / "tokenizer.model")  # 400 pieces
    config, tokenizer = llava_config(ModelSpec(llm=str(llm), vision_tower=TOWER, projector_type="linear"),
                                     template="vicuna_v1", max_len=64)
    build_model(config, tokenizer, torch.float32)


@dataclass(frozen=True)
class ShapeFault:
    name: str
    call: Callable
    error: str
    message: str


SHAPE_FAULTS = [
    ShapeFault("LLaMA weights of another shape", llm_of_other_shape, "CheckpointError",
               r"model\.safetensors: key 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \(\d+, \d+\), config\.json "
               r"implies \(\d+, \d+\)"),
    ShapeFault("safetensors file cut short", cut_safetensors, "CheckpointError",
               r"model\.safetensors: .*(cannot read|truncated or corrupt)"),
    ShapeFault("shard listed in the index but missing", missing_shard, "CheckpointError",
               r"model\.safetensors\.index\.json: shard model-\d+-of-\d+\.safetensors is listed but missing"),
    ShapeFault("projector of another type", projector_of_other_shape, "CheckpointError",
               r"mm_projector\.safetensors: projector weights .* do not fit projector_type='linear'"),
    ShapeFault("vision weights of another width", vision_weights_of_other_shape, "VisionTowerError",
               r"clip\.safetensors: .*(shape|do not match)"),
    ShapeFault("adapter saved with another rank", adapter_of_other_rank, "AdapterError",
               r"adapter_config\.json: adapter lora .* does not match the model's lora"),
    ShapeFault("adapter tensors of another rank", adapter_weights_of_other_rank, "AdapterError",
               r"adapter_model\.safetensors: \S+ has shape \(4, \d+\), the model's adapter has \(8, \d+\)"),
    ShapeFault("tokenizer bigger than the embedding", tokenizer_bigger_than_embedding, "ConfigError",
               r"tokenizer\.model has 400 pieces but the language model in .* has only 300 embeddings"),
]


@pytest.mark.parametrize("fault", cases(SHAPE_FAULTS))
def test_mismatched_weights_are_a_named_error(tmp_path, fault):
    torch.manual_seed(0)
    with pytest.raises(Exception) as info:
        fault.call(tmp_path)
    assert fault.error in [c.__name__ for c in type(info.value).__mro__], f"{type(info.value).__name__}: {info.value}"
    assert re.search(fault.message, str(info.value)), str(info.value)


def test_failed_projector_load_leaves_the_model_unchanged(tmp_path):
    """A refused file must not leave half-assigned weights behind."""
    model = tiny_llava("linear")
    before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    file = tmp_path / "p.safetensors"
    tiny_llava("mlp2x_gelu").save_projector(file)
    with pytest.raises(Exception):
        model.load_projector(file)
    assert all(torch.equal(before[k], v) for k, v in model.projector.state_dict().items())
    assert json.dumps(sorted(before))  # names are plain strings
