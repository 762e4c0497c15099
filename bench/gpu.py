"""The day a GPU is lent: one unattended command (<= 10 minutes) that checks correctness first, then measures.

    python bench/gpu.py --out runs/bench-gpu                 # on the GPU machine (bench/gpu.sh does the same)
    python bench/gpu.py --device cpu --tiny --out /tmp/b     # smoke run on a CPU (tests/plan runs it)

Sections, each recorded even when an earlier one failed (exit code 1 if any check failed):
1. `bf16_logits`: LLaVA logits (tower + projector + LLaMA) in bf16 against fp32 on the same weights and images:
   relative L2 error below LOGITS_TOLERANCE (the share of equal greedy tokens is reported; on random weights the
   logits are nearly flat, so it is no criterion);
2. `sdpa_kernel`: a training forward + backward with scaled_dot_product_attention restricted to the fused kernels
   (flash / memory-efficient on CUDA, flash on CPU); torch raises if our attention call cannot use them;
3. `stage2`: the stage-2 training step through `stages.trainer.Trainer` (DeepSpeed engine, bf16, gradient
   checkpointing, tower frozen) on a ~1B LLaMA-shaped model (preset `llama-1b`) with CLIP ViT-L/14-336: tokens/s and
   MFU against the card's dense bf16 peak; peak memory (`max_memory_allocated`) against `stages.memory`'s prediction;
4. `decode`: greedy decoding at batch 1 with the KV cache: tokens/s against the HBM roofline (bandwidth / weight
   bytes read per token).

Writes `report.json` and `report.md` in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# Relative L2 error of bf16 logits against fp32: bf16 rounds each op's result to 8 bits of mantissa (0.4 %), and
# the errors of ~25 blocks add up; measured 0.6 % on the 2-block CPU smoke model.
LOGITS_TOLERANCE = 5e-2
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}  # dense bf16, HBM B/s
SHAPES = {
    "full": dict(llm="llama-1b", tower="ViT-L-14-336", micro_batch=8, seq_len=2048, steps=10, warmup=3,
                 decode_tokens=256, check_batch=2, check_text=256),
    "tiny": dict(llm="tiny", tower={"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
                 micro_batch=2, seq_len=64, steps=3, warmup=1, decode_tokens=8, check_batch=2, check_text=24),
}


def card_figures(device: torch.device) -> tuple[str, float | None, float | None]:
    """(name, dense bf16 FLOP/s, HBM bytes/s) of the device, None where the card is not in PEAKS."""
    if device.type != "cuda":
        return platform.processor() or "cpu", None, None
    name = torch.cuda.get_device_name(device)
    for key, (flops, bandwidth) in PEAKS.items():
        if key in name:
            return name, flops, bandwidth
    return name, None, None


def build_model(shape: dict, dtype: torch.dtype, seed: int = 0):
    from llava.model.llama import Llama, LlamaConfig
    from llava.model.llava import LlavaConfig, LlavaModel

    torch.manual_seed(seed)
    llm = Llama(LlamaConfig.from_name(shape["llm"], eos_id=None, max_seq_len=max(shape["seq_len"], 256)))
    config = LlavaConfig(vision_tower=shape["tower"], llm=llm.config, max_len=shape["seq_len"])
    return LlavaModel(config, llm=llm.init_weights(seed=seed)).to(dtype)


def synthetic_batch(model, batch_size: int, text_len: int, seed: int = 0) -> dict:
    """bos, one image, random text: a stage-2 shaped batch (every text token supervised)."""
    from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.llm.config.vocab_size, (batch_size, text_len), generator=gen)
    ids[:, 0], ids[:, 1] = 1, IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, :2] = IGNORE_INDEX
    size = model.vision.image_size
    images = torch.randn(batch_size, 3, *size, generator=gen)
    return {"input_ids": ids, "labels": labels, "images": images}


def to(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}


# ---- sections --------------------------------------------------------------------------------------------------------

def check_bf16_logits(shape: dict, device: torch.device) -> dict:
    model = build_model(shape, torch.float32).to(device).eval()
    batch = synthetic_batch(model, shape["check_batch"], shape["check_text"])
    with torch.no_grad():
        reference = model(**to(batch, device, torch.float32), return_logits=True)["logits"].float()
        model.to(torch.bfloat16)
        logits = model(**to(batch, device, torch.bfloat16), return_logits=True)["logits"].float()
    error = float((logits - reference).norm() / reference.norm())
    agreement = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    return {"relative_error": error, "tolerance": LOGITS_TOLERANCE, "greedy_agreement": agreement,
            "passed": error < LOGITS_TOLERANCE}


def check_sdpa_kernel(shape: dict, device: torch.device) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION] + ([SDPBackend.EFFICIENT_ATTENTION] if device.type == "cuda" else [])
    model = build_model(shape, torch.bfloat16).to(device).train()
    batch = to(synthetic_batch(model, shape["check_batch"], shape["check_text"]), device, torch.bfloat16)
    names = [b.name for b in backends]
    try:
        with sdpa_kernel(backends):
            model(**batch)["loss"].backward()
    except RuntimeError as e:
        return {"allowed": names, "passed": False, "error": str(e).splitlines()[0]}
    return {"allowed": names, "passed": True}


def measure_stage2(shape: dict, device: torch.device, out: Path, peak_flops: float | None) -> dict:
    """Stage 2's training step through the trainer's DeepSpeed engine; the first `warmup` steps are not timed."""
    from torch.utils.data import Dataset

    from llava.data.collate import Collator
    from stages import memory
    from stages.trainer import TrainConfig, Trainer, measure_peak_flops

    model = build_model(shape, torch.bfloat16)
    model.vision.set_trainable(False)
    text_len = shape["seq_len"] - model.num_image_tokens + 1
    batch = synthetic_batch(model, shape["micro_batch"], text_len)

    class Repeat(Dataset):  # the same samples over and over: the step's cost does not depend on the values
        def __len__(self):
            return shape["micro_batch"] * (shape["steps"] + shape["warmup"])

        def __getitem__(self, i):
            j = i % shape["micro_batch"]
            return {"input_ids": batch["input_ids"][j], "labels": batch["labels"][j],
                    "images": [batch["images"][j]], "id": str(i)}

    peak = peak_flops or measure_peak_flops(device, torch.bfloat16)
    cfg = TrainConfig(output_dir=str(out / "stage2"), micro_batch_size=shape["micro_batch"], precision="bf16",
                      zero_stage=0, gradient_checkpointing=True, num_workers=0, tensorboard=False, peak_flops=peak,
                      warmup_ratio=0.0, lr=1e-5, max_steps=shape["steps"] + shape["warmup"])
    trainer = Trainer(cfg, model, Repeat(), collate_fn=Collator(0), forward_only=lambda n: n.startswith("vision."))
    engine = trainer.engine
    collated = Collator(0)([Repeat()[i] for i in range(shape["micro_batch"])])
    inputs = to({k: v for k, v in collated.items() if k not in ("ids", "num_skipped")}, device, torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(shape["steps"] + shape["warmup"]):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        engine.backward(engine(**inputs)["loss"])
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= shape["warmup"]:
            times.append(time.perf_counter() - tick)
    tokens = shape["micro_batch"] * shape["seq_len"]
    tokens_per_s = tokens / statistics.median(times)
    result = {"params": sum(p.numel() for p in model.parameters()), "micro_batch": shape["micro_batch"],
              "seq_len": shape["seq_len"], "step_seconds": statistics.median(times), "tokens_per_s": tokens_per_s,
              "flops_per_token": trainer.flops_per_token, "peak_flops": peak,
              "mfu": trainer.flops_per_token * tokens_per_s / peak}

    counts = memory.count_params(model)
    llm = model.llm.config
    states = memory.model_state_bytes(counts.total, counts.total_trainable, counts.largest_layer, precision="bf16",
                                      zero_stage=0, ranks=1, ranks_per_node=1)
    mlp = model.vision.visual.transformer.resblocks[0].mlp.c_fc.out_features
    activations = memory.activation_bytes(
        memory.LlmShape.of(llm), memory.Batch(shape["micro_batch"], shape["seq_len"], model.num_image_tokens,
                                              supervised=text_len - 3),
        precision="bf16", training=memory.Training("full", gradient_checkpointing=True),
        projector_dims=(model.vision.hidden_size, llm.dim, llm.dim),
        vision=(model.vision.hidden_size, model.num_image_tokens + 1, mlp, model.vision.num_blocks))
    result["predicted_bytes"] = states.gpu + activations["peak"]
    if device.type == "cuda":
        result["measured_bytes"] = torch.cuda.max_memory_allocated(device)
        result["predicted_over_measured"] = result["predicted_bytes"] / result["measured_bytes"]
    return result


def measure_decode(shape: dict, device: torch.device, bandwidth: float | None) -> dict:
    from llava.generate import GenerationConfig, generate

    llm = build_model(shape, torch.bfloat16).llm.to(device).eval()
    prompt = [list(range(3, 35))]
    n = shape["decode_tokens"]

    def timed(new_tokens: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        out = generate(llm, prompt, config=GenerationConfig(max_new_tokens=new_tokens))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        assert len(out[0]) == new_tokens, "decoding stopped early"
        return time.perf_counter() - tick

    timed(n)  # warm-up (kernels, allocator)
    seconds = min(timed(n) for _ in range(3)) - min(timed(1) for _ in range(3))  # decode steps only, not prefill
    tokens_per_s = (n - 1) / max(seconds, 1e-9)
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.parameters())
    result = {"tokens_per_s": tokens_per_s, "weight_bytes": weight_bytes}
    if bandwidth:
        result["roofline_tokens_per_s"] = bandwidth / weight_bytes
        result["fraction_of_roofline"] = tokens_per_s / result["roofline_tokens_per_s"]
    return result


# ---- the report ------------------------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    lines = [f"# GPU bench: {report['device_name']}", "",
             f"torch {report['torch']}, {report['shape']} shapes, {report['seconds']:.0f} s, "
             f"{'all checks passed' if report['passed'] else 'SOME CHECKS FAILED'}", "",
             "| section | result |", "|---|---|"]
    for name, value in report["sections"].items():
        if "error" in value and "passed" not in value:
            text = f"error: {value['error']}"
        else:
            text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
        lines.append(f"| {name} | {text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (smoke run)")
    parser.add_argument("--out", default="runs/bench-gpu", help="folder for report.json and report.md")
    parser.add_argument("--budget-s", type=float, default=540, help="skip sections that would start after this")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device; use --device cpu --tiny for a smoke run", file=sys.stderr)
        return 2
    from llava.io import atomic_write_json, atomic_write_text
    from stages.trainer import setup_distributed

    device = torch.device(args.device)
    shape = SHAPES["tiny" if args.tiny else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name, peak_flops, bandwidth = card_figures(device)
    setup_distributed()
    start = time.perf_counter()
    sections: dict[str, dict] = {}
    for section, run in (("bf16_logits", lambda: check_bf16_logits(shape, device)),
                         ("sdpa_kernel", lambda: check_sdpa_kernel(shape, device)),
                         ("stage2", lambda: measure_stage2(shape, device, out, peak_flops)),
                         ("decode", lambda: measure_decode(shape, device, bandwidth))):
        if time.perf_counter() - start > args.budget_s:
            sections[section] = {"error": f"skipped: the {args.budget_s:.0f} s budget was spent"}
            continue
        try:
            sections[section] = run()
        except Exception as e:  # noqa: BLE001 - an unattended run records the failure and goes on
            sections[section] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        print(f"[bench] {section}: {json.dumps(sections[section], default=str)[:400]}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    passed = all(s.get("passed", "error" not in s) for s in sections.values())
    report = {"device_name": name, "torch": torch.__version__, "shape": "tiny" if args.tiny else "full",
              "seconds": time.perf_counter() - start, "passed": passed, "sections": sections}
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown({**report, "sections": {
        k: {kk: vv for kk, vv in v.items() if kk != "traceback"} for k, v in sections.items()}}))
    print(f"[bench] wrote {out / 'report.json'} and {out / 'report.md'}: "
          f"{'all checks passed' if passed else 'SOME CHECKS FAILED'}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
