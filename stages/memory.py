"""How much memory a training run needs per rank, worked out from the model's shape before any weight is read.

Two parts, added up by `plan` and by the stages' start-up check (`check_fits`):

- **model states** (`model_state_bytes`): weights, gradients and AdamW states under ZeRO 0/1/2/3 and optimizer /
  parameter offload. With every parameter trained these are DeepSpeed's own estimator formulas
  (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`; tests compare them); frozen
  parameters (the vision tower, a frozen LLM, an adapter's base) only cost their weights.
- **activations** (`activation_bytes`): what autograd keeps for the backward pass of one micro-batch, counted tensor by
  tensor from this repository's LLaMA block (llava/model/llama.py), plus the largest short-lived buffers. A tensor is
  kept only when some gradient needs it, so a frozen linear keeps nothing of its input; gradient checkpointing keeps
  only each block's input and recomputes one block at a time in the backward pass. tests/plan checks the count
  against the tensors autograd really saves and the peak against the resident memory of real CPU runs.

Everything here is arithmetic on configs (no torch allocation), except `meta_model`, which builds the model on the
`meta` device to count its parameters exactly.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

GiB = 2**30
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
HOST_BUFFER_FACTOR = 1.5  # DeepSpeed's estimators' additional_buffer_factor for host memory
NF4_BYTES = 0.5 + 4 / 64  # a 4-bit NormalFloat weight with one fp32 absmax per block of 64 (QLoRA, LoftQ)


# ---- parameters ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts of a built model (shared tensors once), per component and trainable."""
    components: dict[str, int]  # vision, projector, llm (adapter tensors count under llm)
    trainable: dict[str, int]
    largest_layer: int  # most parameters directly owned by one module (DeepSpeed's largest_layer_params)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def total_trainable(self) -> int:
        return sum(self.trainable.values())


def count_params(model) -> ParamCounts:
    """Counts of a LlavaModel (real or on the meta device): component = the first part of a parameter's name."""
    components: dict[str, int] = {}
    trainable: dict[str, int] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        part = name.split(".", 1)[0]
        components[part] = components.get(part, 0) + p.numel()
        trainable[part] = trainable.get(part, 0) + (p.numel() if p.requires_grad else 0)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParamCounts(components, trainable, largest)


def vision_arch(spec) -> dict:
    """The open_clip architecture dict of a tower spec (name, config dict or Hugging Face CLIP directory), read from
    configs only: nothing of the weights is opened."""
    from pathlib import Path

    from llava.model.vision import arch_from_dict, hf_clip_arch, open_clip_arch

    if isinstance(spec, dict):
        return arch_from_dict(spec)
    if Path(str(spec)).is_dir():
        return hf_clip_arch(spec)[0]
    return open_clip_arch(str(spec))[0]


def llm_config(llava_config):
    """The LlamaConfig of `llava_config`: its `llm_path`'s config.json when it has one (weights are not opened)."""
    import json
    from pathlib import Path

    from llava.model.llama import LlamaConfig

    if not llava_config.llm_path:
        return llava_config.llm
    config_file = Path(llava_config.llm_path) / "config.json"
    return LlamaConfig.from_hf_config(json.loads(config_file.read_text(encoding="utf-8")), where=str(config_file))


def meta_model(llava_config, adapter: dict | None = None, tune_vision: bool = False):
    """The LlavaModel of `llava_config` on the meta device (no memory, no weight file opened), frozen the way the
    stages freeze it: the tower (unless `tune_vision`), the LLM in stage 1 (`template == "plain"`), everything but
    adapter + projector with `adapter`."""
    import dataclasses

    import torch

    from llava.model.llama import Llama
    from llava.model.llava import LlavaModel
    from llava.model.vision import build_vision_tower

    config = dataclasses.replace(llava_config, vision_tower=vision_arch(llava_config.vision_tower),
                                 llm=llm_config(llava_config), llm_path=None, vision_pretrained=None)
    with torch.device("meta"):
        vision = build_vision_tower(config.vision_tower, select_layer=config.select_layer,
                                    select_feature=config.select_feature, trainable=tune_vision)
        model = LlavaModel(config, llm=Llama(config.llm), vision=vision)
        if config.template == "plain":
            model.llm.requires_grad_(False)
        if adapter is not None:
            from llava.adapters import apply_adapter

            options = dict(adapter)
            apply_adapter(model, options.pop("method"), extra_trainable=("projector",), **options)
    return model


# ---- model states --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StateBytes:
    gpu: int  # per rank
    cpu: int  # per node (host memory of the offloaded states, DeepSpeed's rule incl. its 1.5 buffer factor)


def model_state_bytes(total: int, trainable: int, largest_layer: int, *, precision: str, zero_stage: int,
                      ranks: int, ranks_per_node: int, offload_optimizer: bool = False,
                      offload_params: bool = False) -> StateBytes:
    """Weights + gradients + AdamW states per rank.

    Bytes per parameter: weights `w` (2 in bf16/fp16, 4 in fp32) for every parameter; for each trained one a gradient
    of `w` bytes and optimizer states `k` (AdamW's two moments, 8, plus in mixed precision DeepSpeed's fp32 master
    copy and fp32 gradient partition, 16). ZeRO-1 partitions `k`, ZeRO-2 also the gradients, ZeRO-3 also the weights
    (and then holds the largest layer's gathered 16-bit weight and gradient, 4 bytes per parameter, as DeepSpeed
    counts it). With all parameters trained and `w` = 2 this is exactly DeepSpeed's estimator.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    if offload_params and zero_stage != 3:
        raise ValueError("parameter offload needs ZeRO-3")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("optimizer offload needs ZeRO 1, 2 or 3")
    w = BYTES[precision]
    k = 16 if w < 4 else 8
    nodes = max(1, ranks // ranks_per_node)
    host = 0.0
    if zero_stage == 3:
        gathered = 4 * largest_layer
        if offload_params:
            gpu = gathered
            host = HOST_BUFFER_FACTOR * (w * total + k * trainable) / nodes
        elif offload_optimizer:
            gpu = gathered + w * total // ranks
            host = HOST_BUFFER_FACTOR * k * trainable / nodes
        else:
            gpu = gathered + (w * total + k * trainable) // ranks
            host = HOST_BUFFER_FACTOR * 4 * largest_layer * ranks_per_node  # DeepSpeed's zero.Init staging
        return StateBytes(int(gpu), int(host))
    if offload_optimizer:
        # DeepSpeed's rule for the host side of ZeRO-Offload (stages 1-2): max(4 × ranks, 16) bytes per parameter.
        return StateBytes(w * total, int(HOST_BUFFER_FACTOR * trainable * max(4 * ranks, 16)))
    grads = w * trainable // ranks if zero_stage == 2 else w * trainable
    optimizer = k * trainable // ranks if zero_stage >= 1 else k * trainable
    host = HOST_BUFFER_FACTOR * 4 * total * ranks_per_node  # DeepSpeed's rule: each rank loads a fp32 copy
    return StateBytes(int(w * total + grads + optimizer), int(host))


# ---- activations ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LlmShape:
    """What the activation count needs to know about the LLaMA decoder."""
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    vocab_size: int

    @classmethod
    def of(cls, config) -> "LlmShape":
        return cls(config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.ffn_hidden,
                   config.vocab_size)

    @property
    def kv_dim(self) -> int:
        return self.dim // self.n_heads * self.n_kv_heads


@dataclass(frozen=True)
class Training:
    """What is trained inside the LLM and how: decides which inputs autograd keeps."""
    llm: str = "full"  # full | frozen | adapter
    lora_targets: tuple[str, ...] = ()  # with llm="adapter": LoRA-wrapped projections
    lora_r: int = 0
    lora_dropout: float = 0.0
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class Batch:
    micro_batch: int
    seq_len: int  # positions per row after the image splice (the padded length: the worst case is max_len)
    image_tokens: int = 0  # positions one image takes
    images_per_row: int = 1
    supervised: int | None = None  # supervised positions per row; None: every text position

    @property
    def supervised_per_row(self) -> int:
        text = max(self.seq_len - self.image_tokens * self.images_per_row, 1)
        return text if self.supervised is None else min(self.supervised, self.seq_len)


BLOCK_BACKWARD = 3  # MLP-wide gradient buffers alive at once while a recomputed block runs backward

_IN_FEATURES = {"q_proj": "dim", "k_proj": "dim", "v_proj": "dim", "o_proj": "dim", "gate_proj": "dim",
                "up_proj": "dim", "down_proj": "ffn_hidden"}


def block_bytes_per_token(llm: LlmShape, b: int, training: Training) -> int:
    """Bytes autograd keeps per position for one decoder block (activations in `b`-byte floats).

    Tensor by tensor, from llava/model/llama.py: each RMSNorm keeps its input in fp32 (bf16 path: the upcast copy;
    fp32 path: the input itself) and, with a trained weight, its normalised output; q/k/v (and gate/up) keep their
    shared input when their weight trains; SDPA keeps q, k, v, its output (laid out so that o_proj's input is a view
    of it) and a fp32 log-sum-exp per head; SiLU keeps the gate output, the product keeps both factors, down_proj
    its input.
    LoRA keeps, per wrapped projection, the dropout output and mask when dropout is on (else the projection's
    input, counted once per block input) and the rank-r intermediate.
    """
    h, kv, f = llm.dim, llm.kv_dim, llm.ffn_hidden
    full = training.llm == "full"
    norm = 4 * h + (b * h if full else 0)
    total = 2 * norm
    if full:
        total += b * h  # q/k/v input (norm output)
        total += b * h  # gate/up input
        total += b * f  # down_proj input
    total += b * (h + 2 * kv) + b * h + 4 * llm.n_heads  # SDPA: q, k, v, output, log-sum-exp
    total += b * 3 * f  # SiLU input, and both factors of the product
    if training.llm == "adapter" and training.lora_targets:
        shared_inputs = set()
        for target in training.lora_targets:
            width = getattr(llm, _IN_FEATURES[target])
            if training.lora_dropout > 0:
                total += 2 * b * width  # dropout output + its mask (activation dtype on CPU, bool on CUDA)
            elif target in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                shared_inputs.add(target[0] if target[0] in "qkv" else "gu")
            elif target == "down_proj":
                total += b * f  # (o_proj's input is SDPA's kept output)
            total += b * training.lora_r
        # projections reading the same tensor keep it once: q/k/v read one norm output, gate/up the other
        total += b * h * (bool(shared_inputs & {"q", "k", "v"}) + ("gu" in shared_inputs))
    return total


def activation_bytes(llm: LlmShape, batch: Batch, *, precision: str, training: Training,
                     projector_dims: tuple[int, ...] = (), vision: tuple[int, int, int, int] | None = None,
                     tune_vision: bool = False) -> dict[str, int]:
    """Activation memory of one micro-batch's forward + backward, per part, and its `peak`.

    `projector_dims`: the projector's layer widths, e.g. (1024, 4096, 4096) for mlp2x_gelu; `vision`: (tower width,
    positions per image incl. CLS, MLP width, blocks run), for the tower (run without a graph unless `tune_vision`).

    Kept through the step (`kept`): every block's saved tensors (with checkpointing only the block inputs), the final
    norm's, the projector's. The peak comes in one of two phases of the backward pass, whichever is larger:
    - `head`: the fp32 log-softmax of the supervised positions (kept) while its gradient and the logits' gradient
      (fp32) exist at once: 12 bytes per supervised position and vocabulary entry;
    - `block`: the gradients of a block's widest (MLP) tensors, plus with checkpointing the block recomputed.
    """
    b = BYTES[precision]
    tokens = batch.micro_batch * batch.seq_len
    supervised = batch.micro_batch * batch.supervised_per_row
    per_block = block_bytes_per_token(llm, b, training) * tokens
    full = training.llm == "full"
    blocks = llm.n_layers * (b * llm.dim * tokens if training.gradient_checkpointing else per_block)
    final_norm = (4 * llm.dim + (b * llm.dim if full else 0)) * tokens
    images = batch.micro_batch * batch.images_per_row if batch.image_tokens else 0
    projector = sum(b * width for width in projector_dims[:-1]) * images * batch.image_tokens
    if len(projector_dims) > 2:
        projector += b * sum(projector_dims[1:-1]) * images * batch.image_tokens  # GELU inputs
    vision_kept = vision_forward = 0
    if vision is not None and images:
        width, positions, mlp, n_blocks = vision
        if tune_vision:  # a ViT block keeps about what a fully trained LLaMA block of its widths keeps
            vit = LlmShape(width, n_blocks, max(width // 64, 1), max(width // 64, 1), mlp, 1)
            vision_kept = n_blocks * block_bytes_per_token(vit, b, Training()) * images * positions
        else:  # no graph: one block's widest buffers at a time, during the forward pass
            vision_forward = 4 * b * max(mlp, 3 * width) * images * positions
    head = (b * llm.dim if full else 0) * supervised + 12 * llm.vocab_size * supervised
    block = BLOCK_BACKWARD * b * llm.ffn_hidden * tokens + (per_block if training.gradient_checkpointing else 0)
    parts = {"blocks": blocks, "final_norm": final_norm, "projector": projector, "vision": vision_kept}
    parts["kept"] = sum(parts.values())
    parts.update(head_phase=head, block_phase=block, vision_forward=vision_forward)
    parts["peak"] = parts["kept"] + max(head, block, vision_forward)
    return parts


# ---- a whole plan: model states + activations + buffers against a card ------------------------------------------

@dataclass(frozen=True)
class Card:
    memory_gib: float  # usable device memory as the driver reports it
    peak_flops: float  # dense bf16
    hbm_bytes_per_s: float


CARDS = {  # NVIDIA datasheets (dense bf16, no sparsity)
    "a100-80g": Card(80.0, 312e12, 2.0e12),
    "a100-40g": Card(40.0, 312e12, 1.555e12),
    "h100-80g": Card(79.6, 989e12, 3.35e12),
    "a10-24g": Card(24.0, 125e12, 0.6e12),
}
CUDA_CONTEXT_GIB = 1.0  # CUDA/NCCL context and kernels' workspaces, per rank


@dataclass(frozen=True)
class Setup:
    """The hardware and the assumptions a plan is made for."""
    gpus: int  # per node
    nodes: int
    card: str
    gpu_mem_gib: float
    mfu: float
    samples: int | None
    mean_tokens: int | None
    seq_len: int | None


def deepspeed_settings(train, ranks: int) -> dict:
    """ZeRO stage, offloads and bucket sizes the trainer would give DeepSpeed."""
    from stages.trainer import deepspeed_config

    ds = deepspeed_config(train, ranks)
    zero = ds["zero_optimization"]
    stage = zero["stage"]
    buckets = float(zero.get("reduce_bucket_size", 5e8))
    buckets += float(zero.get("stage3_prefetch_bucket_size", 5e8) if stage == 3 else
                     zero.get("allgather_bucket_size", 5e8) if stage in (1, 2) else 0)
    return {"zero_stage": stage, "offload_optimizer": (zero.get("offload_optimizer") or {}).get("device") in
            ("cpu", "nvme"), "offload_params": (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme"),
            "bucket_elements": buckets if stage else 0.0}


def _training(stage: str, adapter: dict | None, checkpointing: bool) -> Training:
    """What trains inside the LLM: LoRA's tensors are counted from its options (peft's defaults where unset: all
    seven projections, r 8, no dropout); other adapter methods keep only what the frozen base keeps."""
    if adapter is None:
        return Training("frozen" if stage == "align" else "full", gradient_checkpointing=checkpointing)
    if adapter.get("method") not in ("lora", "loftq"):
        return Training("adapter", gradient_checkpointing=checkpointing)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return Training("adapter", tuple(adapter.get("targets", targets)), int(adapter.get("r", 8)),
                    float(adapter.get("dropout", 0.0)), checkpointing)


def estimate(stage: str, cfg, llava_config, setup: Setup, *, settings: dict | None = None) -> dict:
    """Every number of the plan for one set of training settings (`settings` overrides the config's)."""
    train = cfg.train
    ranks = setup.gpus * setup.nodes
    ds = {**deepspeed_settings(train, ranks), **(settings or {})}
    micro = ds.get("micro_batch_size", train.micro_batch_size)
    accum = ds.get("grad_accum", train.grad_accum)
    checkpointing = ds.get("gradient_checkpointing", train.gradient_checkpointing)
    adapter = getattr(cfg, "adapter", None)
    tune_vision = getattr(cfg, "tune_vision", False)
    model = meta_model(llava_config, adapter=adapter, tune_vision=tune_vision)
    counts = count_params(model)
    states = model_state_bytes(counts.total, counts.total_trainable, counts.largest_layer,
                               precision=train.precision, zero_stage=ds["zero_stage"], ranks=ranks,
                               ranks_per_node=setup.gpus, offload_optimizer=ds["offload_optimizer"],
                               offload_params=ds["offload_params"])
    llm = model.llm.config
    training = _training(stage, adapter, checkpointing)
    image_tokens = model.num_image_tokens
    seq_len = setup.seq_len or llava_config.max_len
    widths = [m.in_features for m in model.projector.modules() if hasattr(m, "in_features")]
    projector_dims = (*widths, llm.dim) if widths else ()
    visual = model.vision.visual
    vision = (model.vision.hidden_size, image_tokens + (model.vision.select_feature == "patch"),
              visual.transformer.resblocks[0].mlp.c_fc.out_features, model.vision.num_blocks)
    activations = activation_bytes(
        LlmShape.of(llm), Batch(micro, seq_len, image_tokens if seq_len > image_tokens else 0),
        precision=train.precision, training=training, projector_dims=projector_dims, vision=vision,
        tune_vision=tune_vision)
    buffers = int(ds["bucket_elements"] * BYTES[train.precision])
    adapter_savings = None
    if adapter is not None:  # against full fine-tuning of the same model, and with the frozen base in NF4
        state_args = dict(precision=train.precision, zero_stage=ds["zero_stage"], ranks=ranks,
                          ranks_per_node=setup.gpus, offload_optimizer=ds["offload_optimizer"],
                          offload_params=ds["offload_params"])
        adapter_params = counts.trainable.get("llm", 0)
        base_llm = counts.components["llm"] - adapter_params
        full = model_state_bytes(counts.total - adapter_params, base_llm + counts.trainable["projector"]
                                 + counts.trainable.get("vision", 0), counts.largest_layer, **state_args)
        holders = ranks if ds["zero_stage"] == 3 and not ds["offload_params"] else 1
        nf4 = states.gpu - int((BYTES[train.precision] - NF4_BYTES) * base_llm / holders)
        adapter_savings = {"full_finetune_states": full.gpu, "nf4_base_states": nf4}
    need = states.gpu + activations["peak"] + buffers + int(CUDA_CONTEXT_GIB * GiB)
    global_batch = micro * accum * ranks

    # Time: FLOPs per sample as the trainer counts MFU (6N trained, 4N frozen behind, 2N tower), at the assumed MFU.
    mean_tokens = setup.mean_tokens or min(seq_len, image_tokens + (64 if stage == "align" else 384))
    trained_llm = counts.trainable.get("llm", 0)
    llm_flops = (6 * trained_llm + 4 * (counts.components["llm"] - trained_llm)) * mean_tokens
    vision_factor = 6 if tune_vision else 2
    image_flops = (vision_factor * counts.components["vision"] * vision[1]
                   + 6 * counts.components["projector"] * image_tokens)
    flops_per_sample = llm_flops + image_flops
    card = CARDS.get(setup.card)
    peak = card.peak_flops if card else None
    steps_per_epoch = setup.samples // global_batch if setup.samples else None
    seconds = (train.epochs * setup.samples * flops_per_sample / (ranks * peak * setup.mfu)
               if setup.samples and peak else None)
    return {
        "stage": stage, "params": {"total": counts.total, "trainable": counts.total_trainable,
                                   "components": counts.components, "trainable_by_component": counts.trainable,
                                   "largest_layer": counts.largest_layer},
        "settings": {"precision": train.precision, "micro_batch_size": micro, "grad_accum": accum,
                     "gradient_checkpointing": checkpointing, **{k: ds[k] for k in ("zero_stage", "offload_optimizer",
                                                                                   "offload_params")}},
        "ranks": ranks, "global_batch": global_batch, "seq_len": seq_len, "image_tokens": image_tokens,
        "memory": {"model_states": states.gpu, "activations": activations["peak"], "buckets": buffers,
                   "cuda_context": int(CUDA_CONTEXT_GIB * GiB), "need": need, "host_per_node": states.cpu,
                   "activation_parts": activations, "adapter": adapter_savings},
        "gpu_mem": int(setup.gpu_mem_gib * GiB), "spare": int(setup.gpu_mem_gib * GiB) - need,
        "time": {"mean_tokens": mean_tokens, "flops_per_sample": flops_per_sample, "mfu": setup.mfu,
                 "peak_flops": peak, "steps_per_epoch": steps_per_epoch, "seconds": seconds},
    }


def suggestions(stage: str, cfg, llava_config, setup: Setup, result: dict) -> list[tuple[str, dict]]:
    """Changes to try, cheapest first, each keeping the global batch: (description, settings). Gradient
    checkpointing; then smaller micro-batches with more accumulation at the configured ZeRO stage; then ZeRO-3
    (with smaller micro-batches); then ZeRO-3 with optimizer and parameters offloaded to host memory."""
    s = result["settings"]
    tries: list[tuple[str, dict]] = []
    base = {"gradient_checkpointing": True}
    if not s["gradient_checkpointing"]:
        tries.append(("train.gradient_checkpointing=true", dict(base)))

    def halvings(settings: dict, prefix: str) -> None:
        micro, accum = s["micro_batch_size"], s["grad_accum"]
        while micro > 1:
            micro, accum = micro // 2, accum * 2
            tries.append((f"{prefix}train.micro_batch_size={micro} train.grad_accum={accum}",
                          {**settings, "micro_batch_size": micro, "grad_accum": accum}))

    halvings(base, "")
    if s["zero_stage"] < 3 and not s["offload_optimizer"]:
        zero3 = {**base, "zero_stage": 3}
        tries.append(("train.zero_stage=3 (configs/deepspeed/zero3.json)", zero3))
        halvings(zero3, "train.zero_stage=3 ")
    accum = s["micro_batch_size"] * s["grad_accum"]
    tries.append((f"train.deepspeed_config=configs/deepspeed/zero3_offload.json train.micro_batch_size=1 "
                  f"train.grad_accum={accum} (optimizer and parameters in host memory)",
                  {**base, "zero_stage": 3, "micro_batch_size": 1, "grad_accum": accum, "offload_optimizer": True,
                   "offload_params": True}))
    return tries


def verdict(stage: str, cfg, llava_config, setup: Setup, result: dict) -> tuple[bool, str]:
    """(fits, one sentence): the spare memory, or the first cheaper setting that fits."""
    need = result["memory"]["need"] / GiB
    if result["spare"] >= 0:
        return True, f"fits with {result['spare'] / GiB:.1f} GiB to spare per GPU ({need:.1f} of " \
                     f"{setup.gpu_mem_gib:g} GiB)"
    for description, settings in suggestions(stage, cfg, llava_config, setup, result):
        trial = estimate(stage, cfg, llava_config, setup, settings=settings)
        if trial["spare"] >= 0:
            return False, (f"does not fit: {need:.1f} GiB needed per GPU, {setup.gpu_mem_gib:g} GiB available; "
                           f"try {description} ({trial['memory']['need'] / GiB:.1f} GiB, "
                           f"{trial['spare'] / GiB:.1f} GiB to spare)")
    return False, (f"does not fit: {need:.1f} GiB needed per GPU, {setup.gpu_mem_gib:g} GiB available, and no "
                   f"ZeRO / micro-batch / offload setting brings it under; use more or larger GPUs, a LoRA adapter, "
                   f"or a shorter max_len")


def check_fits(stage: str, cfg, llava_config) -> None:
    """On a CUDA device, before any weight is read: refuse a stage config whose estimate exceeds this GPU's memory
    (the verdict names a setting that fits). Off CUDA it does nothing; LLAVA_SKIP_FIT_CHECK=1 skips it (the estimate
    assumes rows padded to max_len; data that is always much shorter can fit where the estimate says no)."""
    import torch

    if not torch.cuda.is_available() or os.environ.get("LLAVA_SKIP_FIT_CHECK") == "1":
        return
    from stages.launch import launched_world_size
    from stages.trainer import TrainerError

    ranks = launched_world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or min(ranks, torch.cuda.device_count()) or 1)
    device = int(os.environ.get("LOCAL_RANK", 0))
    total = torch.cuda.mem_get_info(device)[1]
    setup = Setup(gpus=per_node, nodes=max(1, math.ceil(ranks / per_node)), card="", gpu_mem_gib=total / GiB,
                  mfu=0.0, samples=None, mean_tokens=None, seq_len=None)
    result = estimate(stage, cfg, llava_config, setup)
    fits, sentence = verdict(stage, cfg, llava_config, setup, result)
    if not fits:
        raise TrainerError(f"{stage}: {sentence}. Nothing was loaded. (`llava-pipeline plan --config ...` shows the "
                           f"whole estimate; LLAVA_SKIP_FIT_CHECK=1 starts anyway.)")
