"""The activation estimate (stages/memory.py) against what really happens on the CPU:

1. per decoder block, the bytes autograd saves for the backward pass (recorded with `saved_tensors_hooks`, each
   storage once, weights and rotary tables left out) equal the tensor-by-tensor count within 1 %;
2. the peak resident memory of a whole LLaVA forward + backward (tests/plan/peak_run.py, a fresh process per run)
   lies within PEAK_BAND of the predicted peak, for fp32 and bf16, full / frozen / LoRA training, with and without
   gradient checkpointing, with the head or a block deciding the peak. Measured on this machine (docs/planning.md):
   predicted / measured from 0.97 to 1.16 over 24 runs (the estimate errs on the safe side where a block decides).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava.model.llama import Llama, LlamaConfig
from stages import memory

HERE = Path(__file__).parent
PEAK_BAND = (0.95, 1.25)  # predicted / measured
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def saved_block_bytes(model: Llama, x: torch.Tensor) -> int:
    cos, sin = model._rope_tables(x.shape[1], x.dtype)
    cos, sin = cos[:x.shape[1]][None, None], sin[:x.shape[1]][None, None]
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x, cos, sin, None, None)
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["full", "frozen", "lora", "lora_dropout"])
def test_saved_tensors_per_block(dtype, mode):
    config = LlamaConfig(dim=128, n_layers=1, n_heads=8, n_kv_heads=2, ffn_hidden=344, vocab_size=256)
    model = Llama(config).init_weights(seed=0).to(dtype)
    training = memory.Training()
    if mode != "full":
        model.requires_grad_(False)
        training = memory.Training(llm="frozen")
    if mode.startswith("lora"):
        from llava.adapters import apply_adapter

        dropout = 0.1 if mode == "lora_dropout" else 0.0
        apply_adapter(model, "lora", r=8, dropout=dropout, targets=list(TARGETS))
        training = memory.Training(llm="adapter", lora_targets=TARGETS, lora_r=8, lora_dropout=dropout)
    x = torch.randn(2, 96, config.dim, dtype=dtype, requires_grad=True)
    predicted = memory.block_bytes_per_token(memory.LlmShape.of(config), dtype.itemsize, training) * 2 * 96
    assert predicted == pytest.approx(saved_block_bytes(model, x), rel=0.01)


PEAK_RUNS = [
    {"precision": "fp32", "llm": "full", "checkpointing": False},  # head decides
    {"precision": "bf16", "llm": "full", "checkpointing": True},
    {"precision": "fp32", "llm": "frozen", "checkpointing": False, "vocab": 256},  # last block decides
    {"precision": "bf16", "llm": "adapter", "checkpointing": True, "vocab": 256},  # recomputed block decides
]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
@pytest.mark.parametrize("spec", PEAK_RUNS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_peak_memory_of_real_runs(spec):
    out = subprocess.run([sys.executable, str(HERE / "peak_run.py"), json.dumps(spec)], capture_output=True,
                         text=True, timeout=300, cwd=HERE.parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = result["predicted"] / result["measured"]
    assert PEAK_BAND[0] <= ratio <= PEAK_BAND[1], result
