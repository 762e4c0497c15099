"""Loading Hugging Face checkpoint layouts, and one clear error (file + key) for each kind of broken checkpoint."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from foundation_helpers import random_ids, save_hf_model
from safetensors.torch import save_file

from llava.model import CheckpointError, Llama, LlamaConfig


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A saved random transformers model, its state dict and its logits on fixed ids."""
    path = tmp_path_factory.mktemp("reference")
    theirs = save_hf_model(path)
    ids = random_ids(2, 16)
    with torch.no_grad():
        logits = theirs(input_ids=ids).logits
    return path, {k: v.clone() for k, v in theirs.state_dict().items()}, ids, logits


def write_dir(path, state: dict, config_from, fmt: str, n_shards: int = 1):
    """Write `state` as model.safetensors / pytorch_model.bin, or as `n_shards` shards plus an index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text((config_from / "config.json").read_text())
    keys = list(state)
    if n_shards == 1:
        name = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
        save_file(state, path / name) if fmt == "safetensors" else torch.save(state, path / name)
        return path
    weight_map = {}
    for i in range(n_shards):
        part = {k: state[k] for k in keys[i::n_shards]}
        if fmt == "safetensors":
            name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
            save_file(part, path / name)
        else:
            name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
            torch.save(part, path / name)
        weight_map.update(dict.fromkeys(part, name))
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def assert_loads(path, ids, logits):
    model = Llama.from_hf(path)
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt,n_shards", [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 3)])
def test_checkpoint_layouts_load(reference, tmp_path, fmt, n_shards):
    src, state, ids, logits = reference
    assert_loads(write_dir(tmp_path, state, src, fmt, n_shards), ids, logits)


def test_transformers_sharded_save_loads(tmp_path):
    theirs = save_hf_model(tmp_path / "src")
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    ids = random_ids(1, 12)
    with torch.no_grad():
        assert_loads(tmp_path / "sharded", ids, theirs(input_ids=ids).logits)


def test_tied_checkpoint_that_still_stores_lm_head_loads(tmp_path):
    """Some tied checkpoints (older .bin saves) keep a copy of the embedding as lm_head.weight: skip it."""
    theirs = save_hf_model(tmp_path / "src", tie_word_embeddings=True)
    state = {k: v.clone() for k, v in theirs.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    ids = random_ids(1, 12)
    with torch.no_grad():
        assert_loads(write_dir(tmp_path / "tied", state, tmp_path / "src", "bin"), ids, theirs(input_ids=ids).logits)


def test_legacy_rotary_buffer_and_ignored_prefixes(reference, tmp_path):
    src, state, ids, logits = reference
    extra = dict(state)
    extra["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    extra["model.mm_projector.weight"] = torch.ones(4, 4)  # a LLaVA checkpoint's projector
    path = write_dir(tmp_path, extra, src, "safetensors")
    with pytest.raises(CheckpointError, match="model.mm_projector.weight"):
        Llama.from_hf(path)
    model = Llama.from_hf(path, ignore_prefixes=("model.mm_projector.",))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), logits, atol=1e-5, rtol=0)


def test_dtype_follows_config_or_argument(reference, tmp_path):
    src, state, ids, _ = reference
    path = write_dir(tmp_path, {k: v.to(torch.bfloat16) for k, v in state.items()}, src, "safetensors")
    config = json.loads((path / "config.json").read_text())
    config.update(torch_dtype="bfloat16", dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(config))
    assert Llama.from_hf(path).embed_tokens.weight.dtype == torch.bfloat16
    assert Llama.from_hf(path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


# ---- broken checkpoints ------------------------------------------------------------------------------------------

def test_missing_shard(reference, tmp_path):
    src, state, _, _ = reference
    path = write_dir(tmp_path, state, src, "safetensors", n_shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json.*model-00002-of-00003.safetensors"):
        Llama.from_hf(path)


def test_missing_bin_shard(reference, tmp_path):
    src, state, _, _ = reference
    path = write_dir(tmp_path, state, src, "bin", n_shards=2)
    (path / "pytorch_model-00001-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.index.json.*pytorch_model-00001-of-00002.bin"):
        Llama.from_hf(path)


def test_shape_mismatch(reference, tmp_path):
    src, state, _, _ = reference
    bad = dict(state)
    bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    path = write_dir(tmp_path, bad, src, "safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors.*model.layers.1.mlp.up_proj.weight.*\(100, 64\)"):
        Llama.from_hf(path)


def test_unknown_key(reference, tmp_path):
    src, state, _, _ = reference
    path = write_dir(tmp_path, {**state, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, src, "bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*unexpected key 'model.layers.0.self_attn.q_norm"):
        Llama.from_hf(path)


def test_missing_key(reference, tmp_path):
    src, state, _, _ = reference
    path = write_dir(tmp_path, {k: v for k, v in state.items() if k != "model.layers.1.self_attn.v_proj.weight"},
                     src, "safetensors")
    with pytest.raises(CheckpointError, match=r"missing weights model.layers.1.self_attn.v_proj.weight"):
        Llama.from_hf(path)


@pytest.mark.parametrize("change,message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "rope_scaling type 'yarn'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"num_key_value_heads": 3}, "n_heads 4 is not divisible by n_kv_heads 3"),
    ({"num_attention_heads": 8}, "head_dim=16 != hidden_size/num_attention_heads"),
])
def test_unsupported_config(reference, tmp_path, change, message):
    src, state, _, _ = reference
    path = write_dir(tmp_path, state, src, "safetensors")
    config = json.loads((path / "config.json").read_text())
    config.update(change)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"config.json.*{message}"):
        Llama.from_hf(path)


def test_config_missing_key_and_missing_files(reference, tmp_path):
    src, state, _, _ = reference
    with pytest.raises(CheckpointError, match="config.json: not found"):
        Llama.from_hf(tmp_path)
    path = write_dir(tmp_path / "a", state, src, "safetensors")
    config = json.loads((path / "config.json").read_text())
    del config["intermediate_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: missing required key 'intermediate_size'"):
        Llama.from_hf(path)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Llama.from_hf(tmp_path / "b")


@pytest.mark.parametrize("damage,message", [
    ("truncated", r"model.safetensors: key 'model.layers.*' .* it is truncated or corrupt"),
    ("garbage", r"model.safetensors: cannot read safetensors header"),
    ("bad_dtype", r"model.safetensors: key '.*' has dtype 'Q32', which is not a weight dtype"),
])
def test_corrupt_safetensors(reference, tmp_path, damage, message):
    src, state, _, _ = reference
    path = write_dir(tmp_path, state, src, "safetensors")
    file = path / "model.safetensors"
    data = file.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"\x00not a safetensors file" * 10
    else:
        data = data.replace(b'"F32"', b'"Q32"', 1)
    file.write_bytes(data)
    with pytest.raises(CheckpointError, match=message):
        Llama.from_hf(path)


def test_corrupt_index(reference, tmp_path):
    src, state, _, _ = reference
    path = write_dir(tmp_path, state, src, "safetensors", n_shards=2)
    (path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not a valid index"):
        Llama.from_hf(path)


class _TouchFile:
    """Unpickling this would create a file: weights_only loading must refuse before running it."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused(reference, tmp_path):
    src, state, _, _ = reference
    path = write_dir(tmp_path / "ckpt", state, src, "bin")
    target = tmp_path / "pwned.txt"
    torch.save({**state, "payload": _TouchFile(str(target))}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: cannot load with weights_only=True"):
        Llama.from_hf(path)
    assert not target.exists()


def test_from_hf_holds_one_copy_of_the_weights(tmp_path):
    """Peak memory while loading and running stays near one copy of the weights (meta init + assign)."""
    Llama.from_name("tiny").save_hf(tmp_path / "tiny")
    config = LlamaConfig(dim=256, n_layers=4, n_heads=4, ffn_hidden=1024, vocab_size=32000, max_seq_len=256)
    model = Llama(config)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_hf(tmp_path / "big")
    del model
    # VmHWM (the peak resident set of this process image) starts fresh at exec, unlike ru_maxrss, which a child
    # inherits from pytest. Loading and running a tiny model first takes the one-time costs (lazy imports, kernels).
    probe = textwrap.dedent(f"""
        import re, torch
        from llava.model import Llama
        def peak():
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
        ids = torch.tensor([[1, 2, 3]])
        with torch.no_grad():
            Llama.from_hf({str(tmp_path / "tiny")!r})(ids)
            before = peak()
            model = Llama.from_hf({str(tmp_path / "big")!r})
            assert not any(p.is_meta for p in model.parameters())
            model(ids)  # touches every weight
        print(peak() - before)
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.strip().splitlines()[-1])
    assert weight_bytes * 0.8 < growth < weight_bytes * 1.3, (growth, weight_bytes)
