"""Training checkpoints that are either complete or ignored, and state dicts gathered out of ZeRO shards.

Layout under `<output_dir>/checkpoints/`:

    step_00000200/                 one DeepSpeed checkpoint (`engine.save_checkpoint(tag="step_00000200")`)
        mp_rank_00_model_states.pt   module weights (trainable only), scheduler, engine counters
        *zero_pp_rank_*_optim_states.pt   optimizer shards (ZeRO-1/2/3), one per rank
        rng_state_rank{r}.safetensors   python / numpy / torch (/ CUDA) RNG of rank r: tensors + JSON metadata, no pickle
        complete.json                trainer state; written last, atomically, after every rank finished saving

A directory without `complete.json` is a save that crashed half way: resume never picks it, and the next run
deletes it.

DeepSpeed reads its `.pt` files with `torch.load(weights_only=False)`, i.e. as pickles that can run any code. Before
DeepSpeed (or `consolidate_checkpoint`) opens a checkpoint, every `.pt` file in it is screened: the globals its pickle
names must be torch's weights-only defaults or the few DeepSpeed classes in `DEEPSPEED_GLOBALS`; anything else (a
planted or foreign file) is refused with the file named, before any of it is unpickled. Frozen parameters are not saved (`exclude_frozen_parameters`): they never change and come back from
wherever the stage loaded them, which keeps stage-1 checkpoints of a 7B model at projector size.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from llava.io import atomic_save_safetensors, atomic_write_json

MARKER = "complete.json"
_TAG = re.compile(r"^step_(\d{8})$")
# What DeepSpeed 0.19 pickles into its checkpoints beyond torch's weights-only defaults (loss scalers, the ZeRO stage,
# optimizer fragment addresses), listed from its ZeRO-0/1/2/3 checkpoints in fp32, bf16 and fp16, with and without
# optimizer offload. Classes only: unpickling them builds plain state objects and runs no code of the file's choosing.
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that would run code when unpickled, or that cannot be checked; it was not loaded."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int | None:
    match = _TAG.match(path.name)
    return int(match.group(1)) if match else None


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Every `step_*` directory under `root`, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def complete_checkpoints(root: str | Path) -> list[Path]:
    return [p for p in checkpoint_dirs(root) if (p / MARKER).is_file()]


def latest_complete(root: str | Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def read_state(checkpoint: str | Path) -> dict:
    """The trainer state stored in a checkpoint's completion marker."""
    path = Path(checkpoint) / MARKER
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable checkpoint marker ({e}); delete {path.parent} to resume from the one "
                         f"before it") from None


def remove_checkpoint(path: Path) -> None:
    """Marker first, so a crash half way through the delete leaves an incomplete (ignored) directory."""
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def remove_incomplete(root: str | Path) -> list[Path]:
    stale = [p for p in checkpoint_dirs(root) if not (p / MARKER).is_file()]
    for path in stale:
        remove_checkpoint(path)
    return stale


def prune(root: str | Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    for path in complete_checkpoints(root)[:-keep_last]:
        remove_checkpoint(path)


# ---- RNG state ----------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only: each rank restores its own
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"rng_state_rank{rank}.safetensors"


def save_rng_state(path: Path) -> None:
    """This process's RNG state as safetensors: generator states as tensors, the rest as JSON metadata (no pickle)."""
    state = rng_state()
    version, python_words, gauss_next = state["python"]
    kind, numpy_words, position, has_gauss, cached_gaussian = state["numpy"]
    tensors = {"torch": state["torch"], "numpy": torch.from_numpy(numpy_words.astype(np.int64))}
    if "cuda" in state:
        tensors["cuda"] = state["cuda"].cpu()
    metadata = {"python": json.dumps([version, list(python_words), gauss_next]),
                "numpy": json.dumps([kind, int(position), int(has_gauss), float(cached_gaussian)])}
    atomic_save_safetensors(tensors, path, metadata=metadata)


def load_rng_state(path: Path) -> dict:
    """The state `save_rng_state` wrote, in the form `set_rng_state` takes."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        version, python_words, gauss_next = json.loads(metadata["python"])
        kind, position, has_gauss, cached_gaussian = json.loads(metadata["numpy"])
        state = {"python": (version, tuple(python_words), gauss_next),
                 "numpy": (kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached_gaussian),
                 "torch": tensors["torch"]}
    except Exception as e:  # noqa: BLE001 - safetensors, JSON and shape errors all mean the same: a bad file
        raise ValueError(f"{path}: unreadable RNG state ({type(e).__name__}: {e}); delete {path.parent} to resume "
                         f"from the checkpoint before it") from None
    if "cuda" in tensors:
        state["cuda"] = tensors["cuda"]
    return state


# ---- screening DeepSpeed's pickles --------------------------------------------------------------------------------

def screen_pickles(checkpoint: Path) -> None:
    """Refuse `checkpoint` unless every `.pt` file in it names only globals DeepSpeed writes (see the module doc).

    The pickle is disassembled, not run; a file that cannot be disassembled (torn, not a torch.save zip, pickle
    opcodes torch.save never writes) is refused as well.
    """
    for file in sorted(Path(checkpoint).glob("*.pt")):
        try:
            unsafe = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(file))) - DEEPSPEED_GLOBALS)
        except Exception as e:  # noqa: BLE001 - whatever the reason, the file cannot be shown safe
            raise UnsafeCheckpointError(
                f"{file}: cannot be checked before unpickling ({type(e).__name__}: {e}); it is torn or was not "
                f"written by torch.save. Delete {checkpoint} to resume from the checkpoint before it") from None
        if unsafe:
            raise UnsafeCheckpointError(
                f"{file}: refusing to unpickle it: it names {', '.join(unsafe)}, which a DeepSpeed checkpoint never "
                f"holds and which could run code when loaded. Only resume from checkpoints this trainer wrote; "
                f"delete {checkpoint} to resume from the one before it")


# ---- save / load (collective: every rank calls these) ---------------------------------------------------------

def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save(engine, root: str | Path, step: int, state: dict, keep_last: int) -> Path:
    """Save a DeepSpeed checkpoint for `step`, each rank's RNG, then the completion marker, then prune."""
    root = Path(root)
    path = root / tag_for(step)
    rank = _rank()
    if rank == 0 and path.exists():
        remove_checkpoint(path)  # an incomplete leftover of a crashed run that got this far before
    _barrier()
    engine.save_checkpoint(str(root), tag=path.name, save_latest=False, exclude_frozen_parameters=True)
    save_rng_state(rng_file(path, rank))
    _barrier()  # every rank's shards and RNG are on disk before the marker says so
    if rank == 0:
        atomic_write_json(path / MARKER, state)
        prune(root, keep_last)
    _barrier()
    return path


def load(engine, checkpoint: Path) -> dict:
    """Restore weights, optimizer, scheduler, engine counters and this rank's RNG; return the trainer state."""
    state = read_state(checkpoint)
    rng_path = rng_file(checkpoint, _rank())
    if not rng_path.is_file():
        if rng_path.with_suffix(".pt").is_file():
            raise ValueError(f"{rng_path.with_suffix('.pt')}: RNG state in the pickle format of earlier versions, "
                             f"which this one does not unpickle; start a new output_dir")
        raise ValueError(f"{rng_path} is missing: the checkpoint was written by a different number of ranks")
    rng = load_rng_state(rng_path)
    screen_pickles(checkpoint)
    # Frozen parameters were not saved, so the module load is not strict; the trainer checks beforehand that the
    # trainable parameter names match the checkpoint's.
    loaded, _ = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise ValueError(f"{checkpoint}: DeepSpeed could not load this checkpoint (see its log above)")
    set_rng_state(rng)
    return state


# ---- state dicts out of ZeRO ----------------------------------------------------------------------------------

def _chunks(items: list, numel: Callable, budget: int) -> list[list]:
    chunks, current, size = [], [], 0
    for item in items:
        if current and size + numel(item) > budget:
            chunks.append(current)
            current, size = [], 0
        current.append(item)
        size += numel(item)
    if current:
        chunks.append(current)
    return chunks


def gathered_state_dict(engine_or_model, names_predicate: Callable[[str], bool] | None = None, *,
                        rank0_only: bool = True, dtype: torch.dtype = torch.float32,
                        gather_numel: int = 2**28) -> dict[str, torch.Tensor]:
    """Full CPU copies of the model's state dict (optionally only names where `names_predicate(name)` is true).

    Under ZeRO-3 every rank holds a slice of each parameter, so saving `model.state_dict()` (or only the projector
    or adapter tensors) without gathering writes empty tensors — this gathers first, `gather_numel` elements at a
    time to bound peak memory. Collective under ZeRO-3: call it on every rank. Returns `{}` on ranks other than 0
    when `rank0_only`. Under bf16 this holds the module's bf16 weights upcast; `consolidate_checkpoint` gives the
    fp32 master weights from a saved checkpoint.
    """
    model = getattr(engine_or_model, "module", engine_or_model)
    entries = [(name, tensor) for name, tensor in model.state_dict(keep_vars=True).items()
               if names_predicate is None or names_predicate(name)]
    keep = not rank0_only or _rank() == 0
    out: dict[str, torch.Tensor] = {}
    partitioned = [t for _, t in entries if hasattr(t, "ds_id")]
    unique = list({id(t): t for t in partitioned}.values())
    copies: dict[int, torch.Tensor] = {}
    if unique:
        from deepspeed.runtime.zero import GatheredParameters

        for chunk in _chunks(unique, lambda t: t.ds_numel, gather_numel):
            with GatheredParameters(chunk, modifier_rank=None):
                if keep:
                    for t in chunk:
                        copies[id(t)] = t.detach().to("cpu", dtype=dtype, copy=True)
    if not keep:
        return out
    for name, tensor in entries:
        if id(tensor) in copies:
            out[name] = copies[id(tensor)]
        else:
            target = dtype if tensor.is_floating_point() else tensor.dtype
            out[name] = tensor.detach().to("cpu", dtype=target, copy=True)
    return out


def consolidate_checkpoint(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """fp32 state dict of the trained parameters from a saved checkpoint directory, on one process, no engine.

    ZeRO-1/2/3 checkpoints are merged from the optimizer shards with DeepSpeed's
    `get_fp32_state_dict_from_zero_checkpoint` (fp32 master weights); ZeRO-0 ones store the module directly.
    Frozen parameters are not in checkpoints (see the module docstring).
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
    screen_pickles(checkpoint)
    if any(checkpoint.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    model_file = checkpoint / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise FileNotFoundError(f"{checkpoint}: neither ZeRO shards nor {model_file.name}; not a DeepSpeed checkpoint")
    module = torch.load(model_file, map_location="cpu", weights_only=True)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]
