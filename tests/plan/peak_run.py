"""One forward + backward of a small LlavaModel in a fresh process: its peak resident memory above the memory held
before the step, next to `stages.memory.activation_bytes` for the same shapes. Prints one JSON line.

    python tests/plan/peak_run.py '{"precision": "bf16", "llm": "full", "checkpointing": false}'

The step runs twice; the second one is measured, so gradients and allocator pools of the first are already there.
Linux's peak-RSS counter (VmHWM) is reset right before it (`/proc/self/clear_refs`), and glibc is told to hand every
block over 64 KiB straight back to the system (a fixed mmap threshold), so freed activations do not linger in the
heap and the resident memory follows what torch holds.
"""
from __future__ import annotations

import json
import os
import sys


def rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(spec: dict) -> dict:
    import torch

    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.model.llama import Llama, LlamaConfig
    from llava.model.llava import LlavaConfig, LlavaModel
    from llava.model.vision import build_vision_tower
    from stages import memory

    torch.manual_seed(0)
    torch.set_num_threads(1)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["precision"]]
    llm_cfg = LlamaConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden=688,
                          vocab_size=spec.get("vocab", 4096), max_seq_len=1024)
    tower = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}
    config = LlavaConfig(vision_tower=tower, llm=llm_cfg, projector_type="mlp2x_gelu", max_len=1024)
    vision = build_vision_tower(tower)
    model = LlavaModel(config, llm=Llama(llm_cfg).init_weights(seed=0), vision=vision).to(dtype)
    training = memory.Training(llm=spec["llm"], gradient_checkpointing=spec["checkpointing"])
    if spec["llm"] == "frozen":
        model.llm.requires_grad_(False)
    elif spec["llm"] == "adapter":
        from llava.adapters import apply_adapter

        targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        apply_adapter(model, "lora", r=16, dropout=0.05, targets=targets, extra_trainable=("projector",))
        training = memory.Training(llm="adapter", lora_targets=targets, lora_r=16, lora_dropout=0.05,
                                   gradient_checkpointing=spec["checkpointing"])
    model.llm.gradient_checkpointing = spec["checkpointing"]
    model.train()

    batch_size, seq_len = spec.get("micro_batch", 8), spec.get("seq_len", 512)
    image_tokens = model.num_image_tokens
    text = seq_len - image_tokens + 1  # the placeholder becomes image_tokens positions
    ids = torch.randint(3, llm_cfg.vocab_size, (batch_size, text))
    ids[:, 1] = IMAGE_TOKEN_INDEX  # BOS-like first token, then the image
    images = torch.randn(batch_size, 3, 32, 32, dtype=dtype)
    labels = ids.clone()
    labels[:, :2] = -100

    def step():
        out = model(ids, labels=labels, images=images)
        out["loss"].backward()

    step()
    import gc

    gc.collect()
    before = rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    step()
    measured = rss_bytes("VmHWM") - before

    predicted = memory.activation_bytes(
        memory.LlmShape.of(llm_cfg), memory.Batch(batch_size, seq_len, image_tokens, supervised=text - 2),
        precision=spec["precision"], training=training, projector_dims=(64, 256, 256),
        vision=(64, image_tokens + 1, 256, 2))
    return {**spec, "measured": measured, "predicted": predicted["peak"], "parts": predicted}


if __name__ == "__main__":
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # glibc reads it at start-up: re-exec with it set
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
    print(json.dumps(main(json.loads(sys.argv[1]))))
