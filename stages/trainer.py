"""The one training loop every stage uses: DeepSpeed (ZeRO 0/1/2/3) on one CPU process, many GPUs or many nodes.

A stage builds the model, the dataset and its collate function, then hands them over:

    cfg = bind(TrainConfig, section, "instruct.train")
    trainer = Trainer(cfg, model, dataset, collate_fn=collate, projector_params=lambda n: n.startswith("projector."),
                      forward_only=lambda n: n.startswith("vision."))
    trainer.fit()
    weights = trainer.state_dict(lambda n: n.startswith("projector."))  # every rank calls; full tensors on rank 0

Contract with the model: `model(**batch)` returns a dict with `loss` (a scalar, the mean over this micro-batch) and
optionally `logits` (`[batch, seq, ...]`, whose first two sizes count the tokens processed) and `metrics` (a dict of
scalar tensors, e.g. DPO's reward margin: averaged over the step's micro-batches and ranks and logged with the loss).
A batch key `ids` (a list of sample ids) is kept out of the model call and named in errors; a key `num_skipped` (bad
samples the dataset left out or replaced on the way to this batch, with on_error=skip) is kept out too and summed
over ranks into the `skipped_samples` of every metrics record, so skips in DataLoader workers are not lost.

Read top to bottom: config → process group → DeepSpeed config → optimizer / schedule → `fit` (resume, epochs,
micro-batches, step, log, eval, save). Checkpoint files and ZeRO gathering live in `stages/checkpoint.py`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from llava.io import atomic_write_text
from stages.config import ConfigError, dump_yaml
from stages import checkpoint as ckpt
from stages.launch import launched_world_size

PRECISIONS = ("bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    output_dir: str
    seed: int = 42
    epochs: int = 1
    max_steps: int = 0  # > 0: stop after this many optimizer steps (overrides epochs; epochs repeat as needed)
    micro_batch_size: int = 4  # per rank
    grad_accum: int = 1
    lr: float = 2e-5
    projector_lr: float | None = None  # LLaVA's mm_projector_lr: own lr for parameters the stage marks as projector
    weight_decay: float = 0.0  # not applied to biases and norm weights (1-D parameters)
    warmup_ratio: float = 0.03
    lr_schedule: str = "cosine"  # cosine | constant (both after linear warmup)
    max_grad_norm: float = 1.0  # DeepSpeed gradient_clipping; 0 disables
    precision: str = "bf16"  # bf16 | fp16 | fp32
    zero_stage: int | None = None  # 0..3; None: the DeepSpeed JSON's stage, or 0 without one
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states and step on the CPU
    deepspeed_config: str | None = None  # JSON to start from; "auto" values are filled from this config
    gradient_checkpointing: bool = False
    tf32: bool = True  # TF32 matmuls for fp32 ops on NVIDIA GPUs (LLaVA's default)
    save_every: int = 0  # checkpoint every N steps; a final checkpoint is always written
    keep_last: int = 2  # complete checkpoints kept; 0 keeps all
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic evaluation (an eval_fn still runs once at the end)
    num_workers: int = 2
    resume: bool | None = None  # None: resume when a complete checkpoint exists; True: must resume; False: must not
    peak_flops: float | None = None  # per device, for MFU; None measures a large matmul once
    tensorboard: bool = True

    def check(self) -> None:
        where = "train config"
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{where}: precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"{where}: lr_schedule {self.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{where}: zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        for name in ("micro_batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "save_every", "keep_last", "eval_every", "num_workers", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}: {name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.epochs < 1:
            raise ConfigError(f"{where}: set epochs >= 1 or max_steps > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{where}: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


class TrainerError(RuntimeError):
    """The run cannot start or continue as configured; the message says what to change."""


class NonFiniteLossError(TrainerError):
    """A loss or gradient norm became NaN/inf; the last complete checkpoint is left as it was."""


# ---- process group --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int


def setup_distributed() -> DistInfo:
    """Join the launcher's process group (torchrun, `deepspeed`, mpirun), or make a single-rank one.

    DeepSpeed always needs a process group, even for one process. The single-rank group meets in an in-process
    store: a TCP rendezvous would start a c10d store server listening on every interface for the whole run, and
    RANK/WORLD_SIZE environment variables would make child processes started later (torchrun for `--nproc`) mistake
    this process for a launched rank. Idempotent.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        # DeepSpeed's CPU comm backend JIT-compiles a shared-memory all-reduce (~2 min) that only its inference
        # path uses; training talks through gloo. Its compatibility table is a lazily built cache that DeepSpeed
        # reads only for that op, so marking it unbuildable skips both the compiler probe and the build.
        import deepspeed.ops

        if "__compatible_ops__" not in vars(deepspeed.ops):
            deepspeed.ops.__compatible_ops__ = {}
    # DeepSpeed's collectives call torch.distributed functions that torch has deprecated; nothing for a user to fix.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    backend = accelerator.communication_backend_name()
    if not dist.is_initialized():
        if launched_world_size() > 1:
            deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=30))  # env or MPI discovery
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend)  # binds DeepSpeed's comm layer to the group
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it; launchers set it
    local_rank = int(os.environ["LOCAL_RANK"])
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical model init everywhere, per-rank data comes from the sampler."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- DeepSpeed config -----------------------------------------------------------------------------------------

def _get(d: dict, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _set(d: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        d = d.setdefault(key, {})
    d[last] = value


def _drop_autos(d: dict) -> None:
    for key in [k for k, v in d.items() if v == "auto"]:
        del d[key]
    for v in d.values():
        if isinstance(v, dict):
            _drop_autos(v)


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config dict: `cfg.deepspeed_config` (if any) with "auto" values filled from `cfg`.

    The trainer owns batch sizes, clipping, precision and the ZeRO stage: a JSON may say "auto" (or leave them
    out) but a concrete value that disagrees with `cfg` is an error rather than a silent winner. Other "auto"
    values (e.g. LLaVA's reduce_bucket_size) are dropped, which means DeepSpeed's default. AdamW and the warmup
    schedule come from `cfg`: optimizer / scheduler sections whose params are all "auto" (as in LLaVA's JSONs) are
    dropped, any other is an error.
    """
    source = cfg.deepspeed_config or "the built-in DeepSpeed defaults"
    ds: dict = {}
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        try:
            ds = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"deepspeed_config: file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(ds, dict):
            raise ConfigError(f"{path}: the top level must be a JSON object")
    for section, fields in (("optimizer", "lr, weight_decay"), ("scheduler", "lr_schedule, warmup_ratio")):
        if section not in ds:
            continue
        params = ds[section].get("params", {}) if isinstance(ds[section], dict) else None
        kind = str(ds[section].get("type", "")).lower() if isinstance(ds[section], dict) else ""
        all_auto = isinstance(params, dict) and all(v == "auto" for v in params.values())
        if all_auto and (section == "scheduler" or kind in ("adam", "adamw")):
            del ds[section]  # only "use the trainer's values" (LLaVA's own JSONs say this): nothing to honour
            continue
        raise ConfigError(f"{source}: remove the {section!r} section; the trainer builds AdamW and the warmup "
                          f"schedule from the train config ({fields})")

    stage = cfg.zero_stage
    json_stage = _get(ds, "zero_optimization.stage")
    if stage is None:
        stage = json_stage if isinstance(json_stage, int) else 0
    owned = {
        "train_micro_batch_size_per_gpu": (cfg.micro_batch_size, "micro_batch_size"),
        "gradient_accumulation_steps": (cfg.grad_accum, "grad_accum"),
        "train_batch_size": (cfg.micro_batch_size * cfg.grad_accum * world_size,
                             "micro_batch_size × grad_accum × ranks"),
        "gradient_clipping": (cfg.max_grad_norm, "max_grad_norm"),
        "bf16.enabled": (cfg.precision == "bf16", "precision"),
        "fp16.enabled": (cfg.precision == "fp16", "precision"),
        "zero_optimization.stage": (stage, "zero_stage"),
    }
    for key, (value, field) in owned.items():
        current = _get(ds, key)
        if current is not None and current != "auto" and current != value:
            raise ConfigError(f"{source}: {key} is {current!r} but the train config gives {value!r} ({field}); "
                              f"write \"auto\" in the JSON or change {field}")
        _set(ds, key, value)
    _drop_autos(ds)

    if cfg.precision == "fp16" and stage == 0:
        # DeepSpeed 0.19's ZeRO-0 fp16 path (FP16_UnfusedOptimizer) never scales the loss in engine.backward, so
        # overflows go undetected and updates shrink by the loss scale; ZeRO-1/2/3 scale and skip correctly.
        raise ConfigError(f"{source}: precision fp16 needs zero_stage 1, 2 or 3 (DeepSpeed's ZeRO-0 fp16 path does "
                          f"not apply loss scaling); or use bf16")
    zero = ds["zero_optimization"]
    if cfg.offload_optimizer:
        if stage == 0:
            raise ConfigError("offload_optimizer needs zero_stage 1, 2 or 3 (ZeRO-0 keeps no optimizer partition)")
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": True})
    ds.setdefault("zero_allow_untested_optimizer", True)  # torch AdamW under ZeRO is fine (and tested here)
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs; keep DeepSpeed's own progress lines quiet
    return ds


def offloads_optimizer(ds: dict) -> bool:
    return _get(ds, "zero_optimization.offload_optimizer.device") in ("cpu", "nvme")


# ---- optimizer, schedule, FLOPs ------------------------------------------------------------------------------

def param_groups(model: nn.Module, cfg: TrainConfig, projector_params: Callable[[str], bool]) -> list[dict]:
    """Trainable parameters only, split by (projector lr?) × (weight decay?); frozen ones never reach the optimizer."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            projector = cfg.projector_lr is not None and projector_params(name)
            groups.setdefault((projector, p.ndim >= 2), []).append(p)
    if not groups:
        raise TrainerError("the model has no trainable parameters (every requires_grad is False)")
    if cfg.projector_lr is not None and not any(projector for projector, _ in groups):
        raise TrainerError("projector_lr is set but no trainable parameter matches the stage's projector_params")
    return [
        {"params": params, "lr": cfg.projector_lr if projector else cfg.lr,
         "weight_decay": cfg.weight_decay if decay else 0.0, "name": ("projector" if projector else "main")}
        for (projector, decay), params in sorted(groups.items())
    ]


def build_optimizer(groups: list[dict], cfg: TrainConfig, ds: dict, device_type: str) -> torch.optim.Optimizer:
    """torch AdamW (fused on CUDA); DeepSpeedCPUAdam when ZeRO-Offload runs the step on the host of a GPU machine."""
    betas, eps = (0.9, 0.999), 1e-8  # LLaVA / transformers defaults
    offload = offloads_optimizer(ds)
    if offload and device_type != "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=betas, eps=eps, weight_decay=cfg.weight_decay,
                                adamw_mode=True)
    if offload:
        ds.setdefault("zero_force_ds_cpu_optimizer", False)  # CPU-only machine: the step runs on the CPU anyway
    fused = device_type == "cuda" and not offload
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=eps, weight_decay=cfg.weight_decay,
                             fused=fused or None)


def lr_multiplier(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warmup from 0, then cosine to 0 (or constant) — transformers' schedules, as LLaVA uses them."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def flops_per_token(model: nn.Module, forward_only: Callable[[str], bool] | None = None) -> float:
    """Training FLOPs per token: 6N trained, 4N frozen (its input grads still flow back), 2N frozen and run before
    anything trained (`forward_only`, e.g. the vision tower). Attention's sequence-length term is left out, so the
    MFU is slightly conservative."""
    total, seen = 0.0, set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = getattr(p, "ds_numel", p.numel())
        if p.requires_grad:
            total += 6 * n
        elif forward_only is not None and forward_only(name):
            total += 2 * n
        else:
            total += 4 * n
    return total


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved FLOP/s of a large matmul: the denominator of MFU when the hardware peak is not configured."""
    from deepspeed.accelerator import get_accelerator

    n, reps = (8192, 20) if device.type != "cpu" else (1536, 3)
    gen = torch.Generator(device=device).manual_seed(0)  # private generator: the training RNG stays untouched
    a = torch.rand(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.rand(n, n, device=device, dtype=dtype, generator=gen)
    torch.mm(a, b)
    get_accelerator().synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    get_accelerator().synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


# ---- metrics --------------------------------------------------------------------------------------------------

class MetricsLog:
    """`metrics.jsonl` (one JSON object per logged step) and TensorBoard, written by rank 0 only.

    On resume, lines past the checkpoint's step (written by the run that died, possibly torn by the kill) are dropped,
    so the file reads as one uninterrupted run.
    """

    def __init__(self, output_dir: Path, resume_step: int, tensorboard: bool):
        self.path = output_dir / "metrics.jsonl"
        if self.path.is_file():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if self._step_of(line) is not None and self._step_of(line) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step + 1)

    @staticmethod
    def _step_of(line: str) -> int | None:
        """The step of a log line; None for a line torn by a kill mid-write."""
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            return None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


# ---- the trainer ----------------------------------------------------------------------------------------------

@dataclass
class _StepAccumulator:
    """What the micro-batches of one optimizer step add up to on this rank."""
    losses: list = field(default_factory=list)  # model loss per micro-batch
    totals: list = field(default_factory=list)  # loss + extra_loss: what was backpropagated
    extras: list = field(default_factory=list)
    metrics: list = field(default_factory=list)  # the model's own `metrics` dict per micro-batch
    who: list = field(default_factory=list)  # sample ids per micro-batch, for error messages
    tokens: int = 0
    samples: int = 0
    skipped: int = 0  # samples the dataset skipped on the way to these micro-batches


@dataclass
class TrainResult:
    step: int
    metrics: dict  # the last logged record
    checkpoint: Path | None  # the final complete checkpoint


class Trainer:
    """Owns the DeepSpeed engine and the loop. Hooks (all optional):

    - `eval_fn(model, step) -> dict`: every `eval_every` steps and at the end, on every rank (ZeRO-3 forward
      passes are collective); rank 0's numbers are logged as `eval/<key>`.
    - `extra_loss(model) -> Tensor | None`: added to each micro-batch's loss (adapter regularisers).
    - `after_optimizer_step(model, step, total_steps)`: after each optimizer step (`step` counts completed steps
      from 1). Gradients are still on the parameters where DeepSpeed keeps them there (ZeRO-0, fp32): the hook runs
      inside the step, before they are cleared. Under ZeRO-1/2/3 and fp16/bf16 they live in DeepSpeed's
      partitions; use `deepspeed.utils.safe_get_full_grad` / `safe_set_full_fp32_param` in the hook there.
    - `sampler`: yields this rank's dataset indices, `set_epoch(epoch)` makes the order a function of the epoch
      (default: DistributedSampler seeded with `cfg.seed`). Resume skips consumed micro-batches without loading
      them. An IterableDataset must shard itself per rank, define `__len__` (samples per rank per epoch) and
      `set_epoch` if it shuffles; resume then skips by reading.
    - `projector_params(name)`: which trainable parameters get `projector_lr`; `forward_only(name)`: frozen
      parameters with nothing trained before them (2N FLOPs in MFU).
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, dataset: Dataset, *,
                 collate_fn: Callable | None = None, sampler=None,
                 eval_fn: Callable[[nn.Module, int], dict] | None = None,
                 extra_loss: Callable[[nn.Module], torch.Tensor | None] | None = None,
                 after_optimizer_step: Callable[[nn.Module, int, int], None] | None = None,
                 projector_params: Callable[[str], bool] = lambda name: name.startswith("projector."),
                 forward_only: Callable[[str], bool] | None = None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        cfg.check()
        self.cfg, self.dataset, self.collate_fn = cfg, dataset, collate_fn
        self.eval_fn, self.extra_loss, self.after_optimizer_step = eval_fn, extra_loss, after_optimizer_step
        self.dist = setup_distributed()
        self.is_main = self.dist.rank == 0
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"
        if not self.is_main:
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        accelerator = get_accelerator()
        self.device = torch.device(accelerator.current_device_name())
        if self.device.type == "cuda" and cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.precision == "fp16" and not accelerator.is_fp16_supported():
            raise TrainerError(f"precision fp16 is not supported on {self.device}; use bf16 or fp32")
        seed_everything(cfg.seed)

        self._set_gradient_checkpointing(model, cfg.gradient_checkpointing)
        self.trainable = ckpt.trainable_names(model)
        self.flops_per_token = flops_per_token(model, forward_only)

        self._map_style = not isinstance(dataset, IterableDataset)
        if self._map_style:
            self.sampler = sampler if sampler is not None else DistributedSampler(
                dataset, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True, seed=cfg.seed,
                drop_last=True)
            per_rank = len(self.sampler)
        else:
            if sampler is not None:
                raise TrainerError("an IterableDataset orders itself; pass no sampler")
            if not hasattr(dataset, "__len__"):
                raise TrainerError(f"{type(dataset).__name__} has no len(): give the IterableDataset a length in "
                                   "samples per rank per epoch (webdataset: .with_epoch(n) or .with_length(n))")
            per_rank = len(dataset)
        local_steps = per_rank // (cfg.micro_batch_size * cfg.grad_accum)
        self.steps_per_epoch = int(self._all_reduce([local_steps], dist.ReduceOp.MIN)[0])
        if self.steps_per_epoch < 1:
            raise TrainerError(f"{per_rank} samples per rank is less than one optimizer step "
                               f"(micro_batch_size {cfg.micro_batch_size} × grad_accum {cfg.grad_accum})")
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * self.steps_per_epoch
        self.warmup_steps = math.ceil(cfg.warmup_ratio * self.total_steps)

        self.ds_config = deepspeed_config(cfg, self.dist.world_size)
        groups = param_groups(model, cfg, projector_params)
        self.group_names = [g.pop("name") for g in groups]
        optimizer = build_optimizer(groups, cfg, self.ds_config, self.device.type)
        multiplier = lr_multiplier(cfg.lr_schedule, self.warmup_steps, self.total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, multiplier))
        self.model = self.engine.module
        # fp32 ZeRO-0 steps our AdamW directly and then clears .grad: run the hook (and measure the grad norm,
        # which DeepSpeed does not report on this path) in between.
        self._steps_client_optimizer = self.engine.optimizer is optimizer
        if self._steps_client_optimizer and after_optimizer_step is not None:
            optimizer.register_step_post_hook(lambda *_: after_optimizer_step(self.model, self.step + 1,
                                                                              self.total_steps))
        self.float_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.precision]
        self.step = 0
        self.skipped_samples = 0  # all ranks, whole run (restored on resume)

    # -- small helpers --
    @staticmethod
    def _set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
        capable = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        if enabled and not capable:
            raise TrainerError(f"gradient_checkpointing is on but no module of {type(model).__name__} supports it "
                               "(none has a `gradient_checkpointing` attribute)")
        for module in capable:
            module.gradient_checkpointing = enabled

    def _all_reduce(self, values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def _to_device(self, batch: dict) -> dict:
        def move(x):
            if isinstance(x, torch.Tensor):
                dtype = self.float_dtype if x.is_floating_point() else None  # images follow the model's precision
                return x.to(self.device, dtype=dtype, non_blocking=True)
            return x

        return {k: move(v) for k, v in batch.items()}

    def _micro_batches(self, epoch: int, skip: int) -> Iterator[tuple[list[int] | None, dict]]:
        """This rank's micro-batches of `epoch` after the first `skip`, with their dataset indices (map-style)."""
        cfg = self.cfg
        count = self.steps_per_epoch * cfg.grad_accum
        seed = int(np.random.SeedSequence([cfg.seed, epoch, self.dist.rank]).generate_state(1)[0])
        loader_args = dict(collate_fn=self.collate_fn, num_workers=cfg.num_workers,
                           pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(seed))
        if self._map_style:
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            mbs = cfg.micro_batch_size
            if len(order) < count * mbs:
                raise TrainerError(f"the sampler gave {len(order)} indices in epoch {epoch}, fewer than the "
                                   f"{count * mbs} of every epoch so far (its len() must not shrink)")
            batches = [order[i * mbs:(i + 1) * mbs] for i in range(skip, count)]
            yield from zip(batches, DataLoader(self.dataset, batch_sampler=batches, **loader_args))
            return
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        loader = iter(DataLoader(self.dataset, batch_size=cfg.micro_batch_size, drop_last=True, **loader_args))
        for i in range(count):
            try:
                batch = next(loader)
            except StopIteration:
                raise TrainerError(f"{type(self.dataset).__name__} yielded {i} micro-batches in epoch {epoch}, "
                                   f"fewer than its len() promises ({count})") from None
            if i >= skip:
                yield None, batch

    # -- checkpoints --
    def _trainer_state(self, epoch: int, consumed: int) -> dict:
        cfg = self.cfg
        return {"step": self.step, "epoch": epoch, "batches_consumed": consumed, "total_steps": self.total_steps,
                "world_size": self.dist.world_size, "micro_batch_size": cfg.micro_batch_size,
                "grad_accum": cfg.grad_accum, "seed": cfg.seed, "zero_stage": self.ds_config["zero_optimization"]
                ["stage"], "precision": cfg.precision, "trainable": self.trainable,
                "skipped_samples": self.skipped_samples, "time": time.time()}

    def _resume(self) -> tuple[int, int]:
        """Load the newest complete checkpoint (if any and allowed); return (epoch, micro-batches consumed)."""
        cfg = self.cfg
        if self.is_main:
            for stale in ckpt.remove_incomplete(self.checkpoint_root):
                print(f"[trainer] removed incomplete checkpoint {stale} (a save that did not finish)", flush=True)
        found = [ckpt.latest_complete(self.checkpoint_root)]
        dist.broadcast_object_list(found, src=0)  # every rank resumes from the same one
        latest = found[0]
        if latest is None:
            if cfg.resume:
                raise TrainerError(f"resume=True but {self.checkpoint_root} holds no complete checkpoint")
            return 0, 0
        if cfg.resume is False:
            raise TrainerError(f"resume=False but {latest} exists; use a new output_dir, delete "
                               f"{self.checkpoint_root}, or leave resume unset to continue from it")
        state, now = ckpt.read_state(latest), self._trainer_state(0, 0)
        for key in ("world_size", "micro_batch_size", "grad_accum", "seed", "zero_stage"):
            if state[key] != now[key]:
                raise TrainerError(f"{latest} was written with {key}={state[key]} but this run has {key}={now[key]}; "
                                   f"the data position and optimizer shards only continue exactly with the same "
                                   f"value — restore it or start a new output_dir")
        if state["trainable"] != self.trainable:
            missing = sorted(set(state["trainable"]) ^ set(self.trainable))[:5]
            raise TrainerError(f"{latest} trained a different set of parameters than this model (first "
                               f"differences: {missing}); resume with the same model/adapter setup")
        state = ckpt.load(self.engine, latest)
        self.step = state["step"]
        self.skipped_samples = state.get("skipped_samples", 0)  # absent from checkpoints of older versions
        if self.is_main:
            print(f"[trainer] resumed from {latest} at step {self.step}/{self.total_steps}", flush=True)
        return state["epoch"], state["batches_consumed"]

    def _save(self, epoch: int, consumed: int) -> Path:
        if consumed == self.steps_per_epoch * self.cfg.grad_accum:
            epoch, consumed = epoch + 1, 0
        return ckpt.save(self.engine, self.checkpoint_root, self.step, self._trainer_state(epoch, consumed),
                         self.cfg.keep_last)

    # -- the loop --
    def _forward_backward(self, batch: dict, indices: list[int] | None, acc: "_StepAccumulator") -> None:
        ids = batch.pop("ids", None)
        acc.skipped += int(batch.pop("num_skipped", 0))
        inputs = self._to_device(batch)
        out = self.engine(**inputs)
        loss = out["loss"]
        extra = self.extra_loss(self.model) if self.extra_loss is not None else None
        total = loss if extra is None else loss + extra
        self.engine.backward(total)
        acc.losses.append(loss.detach().float())
        acc.totals.append(total.detach().float())
        if extra is not None:
            acc.extras.append(extra.detach().float())
        if out.get("metrics"):
            acc.metrics.append({k: float(v) for k, v in out["metrics"].items()})
        logits = out.get("logits")
        if isinstance(logits, torch.Tensor) and logits.ndim >= 2:
            acc.tokens += logits.shape[0] * logits.shape[1]
        elif isinstance(inputs.get("input_ids"), torch.Tensor):
            acc.tokens += inputs["input_ids"].numel()
        batch_size = len(ids) if ids is not None else next(
            (v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor)), 0)
        acc.samples += batch_size
        acc.who.append({k: v for k, v in (("dataset_indices", indices), ("ids", ids)) if v is not None})

    def _optimizer_step(self, acc: "_StepAccumulator", epoch: int) -> dict:
        """Check the losses on every rank, step, run the hook; return this step's numbers."""
        engine = self.engine
        totals = torch.stack(acc.totals)
        loss_sum, bad_count, tokens, samples, skipped = self._all_reduce(
            [float(torch.stack(acc.losses).sum()), float((~torch.isfinite(totals)).sum()), acc.tokens, acc.samples,
             acc.skipped])
        if bad_count:
            self._raise_non_finite(totals, acc.who, epoch)
        lrs = [group["lr"] for group in engine.optimizer.param_groups]
        grad_norm = None
        if self._steps_client_optimizer:  # DeepSpeed reports no norm on this path; the grads are reduced by now
            grads = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
        skipped_before = engine.skipped_steps
        try:
            engine.step()
        except Exception as e:  # DeepSpeed's loss scaler gives up with a bare Exception
            if "loss scale" not in str(e):
                raise
            raise NonFiniteLossError(
                f"fp16 gradients overflow at every loss scale at step {self.step + 1} (epoch {epoch}; "
                f"{engine.skipped_steps} steps skipped so far); the last complete checkpoint in "
                f"{self.checkpoint_root} is unchanged. Use bf16, lower lr, or check the samples: {acc.who}") from e
        self.step += 1
        self.skipped_samples += int(skipped)
        if self.after_optimizer_step is not None and not self._steps_client_optimizer:
            self.after_optimizer_step(self.model, self.step, self.total_steps)
        if grad_norm is None:
            reported = engine.get_global_grad_norm()
            grad_norm = float(reported) if reported is not None else float("nan")
        overflow = engine.skipped_steps > skipped_before
        if overflow and self.is_main:
            from tqdm import tqdm

            tqdm.write(f"[trainer] fp16 overflow at step {self.step}: update skipped, loss scale now "
                       f"{float(getattr(engine.optimizer, 'loss_scale', float('nan')))}")
        if not overflow and not math.isfinite(grad_norm) and self.cfg.precision != "fp16":
            raise NonFiniteLossError(
                f"gradient norm is {grad_norm} at step {self.step} (epoch {epoch}) although every loss was finite; "
                f"the last complete checkpoint in {self.checkpoint_root} is unchanged. Lower lr or max_grad_norm.")
        numbers = {"loss": loss_sum / (len(acc.losses) * self.dist.world_size), "lr": lrs[0], "grad_norm": grad_norm,
                   "tokens": tokens, "samples": samples, "skipped_samples": self.skipped_samples}
        if "projector" in self.group_names:
            numbers["projector_lr"] = lrs[self.group_names.index("projector")]
        if acc.extras:
            numbers["extra_loss"] = float(torch.stack(acc.extras).mean())
        if acc.metrics:
            names = sorted(acc.metrics[0])
            sums = self._all_reduce([sum(m[k] for m in acc.metrics) for k in names])
            numbers.update({k: v / (len(acc.metrics) * self.dist.world_size) for k, v in zip(names, sums)})
        return numbers

    def _raise_non_finite(self, totals: torch.Tensor, who: list[dict], epoch: int) -> None:
        local = [(self.dist.rank, i, who[i]) for i in range(len(who)) if not math.isfinite(float(totals[i]))]
        everywhere: list = [None] * self.dist.world_size
        dist.all_gather_object(everywhere, local)
        lines = [f"  rank {rank}, micro-batch {i} of the step: {sample}" for found in everywhere
                 for rank, i, sample in found]
        raise NonFiniteLossError(
            f"non-finite loss at step {self.step + 1} (epoch {epoch}); the optimizer step was not taken and the last "
            f"complete checkpoint in {self.checkpoint_root} is unchanged. Samples:\n" + "\n".join(lines) +
            "\nCheck these samples, lower lr, or use bf16 instead of fp16.")

    def _evaluate(self) -> dict:
        self.model.eval()
        try:
            results = self.eval_fn(self.model, self.step) or {}
        finally:
            self.model.train()
        return {f"eval/{key}": value for key, value in results.items()}

    def fit(self) -> TrainResult:
        """Train to `total_steps`, resuming from the newest complete checkpoint; ends with a complete checkpoint."""
        cfg, engine = self.cfg, self.engine
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / "train_config.yaml", dump_yaml(cfg))
            atomic_write_text(self.output_dir / "deepspeed_config.json", json.dumps(self.ds_config, indent=2) + "\n")
        epoch, consumed = self._resume()
        peak = self._peak_flops()
        log = MetricsLog(self.output_dir, self.step, cfg.tensorboard) if self.is_main else None
        bar = None
        if self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {self.output_dir.name}",
                       dynamic_ncols=True)
        last_record: dict = {}
        window = {"seconds": 0.0, "tokens": 0.0, "samples": 0.0}  # since the last logged step
        self.model.train()
        try:
            while self.step < self.total_steps:
                acc, tick = _StepAccumulator(), time.perf_counter()
                for indices, batch in self._micro_batches(epoch, consumed):
                    self._forward_backward(batch, indices, acc)
                    consumed += 1
                    if consumed % cfg.grad_accum:
                        engine.step()  # DeepSpeed counts micro-steps; no update between boundaries
                        continue
                    numbers = self._optimizer_step(acc, epoch)
                    window["seconds"] += time.perf_counter() - tick
                    window["tokens"] += numbers.pop("tokens")
                    window["samples"] += numbers.pop("samples")
                    if bar is not None:
                        bar.update(1)

                    record: dict = {}
                    if self.step % cfg.log_every == 0 or self.step in (1, self.total_steps):
                        seconds = max(window["seconds"], 1e-9)
                        tokens_per_s = window["tokens"] / seconds
                        record = {"step": self.step, "epoch": epoch, **numbers, "tokens_per_s": tokens_per_s,
                                  "samples_per_s": window["samples"] / seconds,
                                  "mfu": self.flops_per_token * tokens_per_s / (peak * self.dist.world_size)}
                        if cfg.precision == "fp16":  # overflow steps are skipped by DeepSpeed: count them
                            record["skipped_steps"] = engine.skipped_steps  # whole run (restored on resume)
                            record["loss_scale"] = float(getattr(engine.optimizer, "loss_scale", float("nan")))
                        window = {"seconds": 0.0, "tokens": 0.0, "samples": 0.0}
                        if bar is not None:
                            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    if self.eval_fn is not None and (
                            (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == self.total_steps):
                        record = {"step": self.step, **record, **self._evaluate()}
                    if record and log is not None:
                        log.write(record)
                        last_record = record
                    if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == self.total_steps:
                        self._save(epoch, consumed)
                    if self.step >= self.total_steps:
                        break
                    acc, tick = _StepAccumulator(), time.perf_counter()
                else:
                    epoch, consumed = epoch + 1, 0
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        if self.is_main:
            print(f"[trainer] finished at step {self.step}, {self.skipped_samples} samples skipped: "
                  f"{json.dumps(last_record)}", flush=True)
        return TrainResult(self.step, last_record, ckpt.latest_complete(self.checkpoint_root))

    def _peak_flops(self) -> float:
        if self.cfg.peak_flops is not None:
            return self.cfg.peak_flops
        measured = [measure_peak_flops(self.device, self.float_dtype) if self.is_main else 0.0]
        dist.broadcast_object_list(measured, src=0)  # one measurement, not N ranks fighting over the same cores
        return measured[0]

    def state_dict(self, names_predicate: Callable[[str], bool] | None = None, *, rank0_only: bool = True,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Full weights (or those matching `names_predicate`), gathered out of ZeRO-3; collective."""
        return ckpt.gathered_state_dict(self.engine, names_predicate, rank0_only=rank0_only, dtype=dtype)
