"""What every adapter method shares: the adapter protocol, the base of the weight-space wrappers, strict option binding,
and finding the modules an adapter attaches to.

Protocol (torchtune's `AdapterModule` idea): every module that carries adapter state subclasses `Adapter` and names its
own tensors — `adapter_params()` (trained) and `adapter_buffers()` (saved, not trained). Model-level code
(llava/adapters/api.py) never guesses adapter tensors from parameter names, so a vision tower layer that happens to be
called `q_proj` can never be picked up by accident.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


class AdapterError(ValueError):
    """Bad adapter request (unknown method, option or target; unsupported operation); the message says the fix."""


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---- the protocol --------------------------------------------------------------------------------------------------

class Adapter(nn.Module):
    """A module that carries adapter state. `enabled` is switched off by `disable_adapter` to give the base model."""

    mergeable = False

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True

    def adapter_params(self) -> tuple[str, ...]:
        """Names (relative to this module) of the trainable adapter parameters."""
        raise NotImplementedError

    def adapter_buffers(self) -> tuple[str, ...]:
        """Names of adapter tensors that are saved with the adapter but not trained (e.g. quantised codes)."""
        return ()


def set_tensor(module: nn.Module, name: str, value: torch.Tensor, trainable: bool) -> None:
    """Register `value` as a trainable parameter or as a (saved) buffer: folded/frozen adapter state is a buffer."""
    if trainable:
        module.register_parameter(name, nn.Parameter(value))
    else:
        module.register_buffer(name, value.detach())


# ---- weight-space wrappers -----------------------------------------------------------------------------------------

class LinearAdapter(Adapter):
    """Base of the weight-space methods: wraps a frozen `nn.Linear` and changes its map.

    The wrapped layer's `weight` and `bias` are kept as the *same* Parameter objects under the *same* names, so the
    base model's state dict, Hugging Face export and DeepSpeed partitioning see exactly what they saw before.
    Additive methods implement `delta_forward(x)` and `delta_weight()`; merging adds `delta_weight()` to the weight and
    unmerging subtracts it. Multiplicative methods (OFT, IA3) override `adapted_forward`, `merged_weight` and
    `unmerged_weight` instead.
    """

    mergeable = True

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise AdapterError(f"expected an nn.Linear to adapt, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.register_parameter("bias", linear.bias)
        self.merged = False

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"

    # -- the math each method provides --
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the weight's layout [out, in], in float32."""
        raise NotImplementedError

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x) + self.delta_forward(x).to(x.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight()

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight()

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias

    def unmerged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias

    # -- shared behaviour --
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.base_forward(x)
        return self.adapted_forward(x)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = self.weight
        w.copy_(self.merged_weight(w.float()).to(w.dtype))
        if self.bias is not None:
            self.bias.copy_(self.merged_bias(self.bias.float()).to(self.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.weight
        w.copy_(self.unmerged_weight(w.float()).to(w.dtype))
        if self.bias is not None:
            self.bias.copy_(self.unmerged_bias(self.bias.float()).to(self.bias.dtype))
        self.merged = False


def lora_init_(tensor: torch.Tensor) -> torch.Tensor:
    """Kaiming-uniform with a=√5: nn.Linear's default init, and LoRA-A's."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the block on a forked RNG seeded with `seed` (on `device`'s generator too), so adapter inits are
    reproducible without disturbing the caller's random stream. None: use the global stream as it is."""
    if seed is None:
        yield
        return
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


# ---- finding the language model and its layers ---------------------------------------------------------------------

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINEAR_NAMES = PROJECTIONS + ("lm_head",)


def find_llama(model: nn.Module) -> tuple[str, nn.Module]:
    """(path, module) of the one `Llama` inside `model` (the model itself when it is one)."""
    from llava.model.llama import Llama

    found = [(name, m) for name, m in model.named_modules() if isinstance(m, Llama)]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(repr(n) for n, _ in found)})"
        raise AdapterError(f"adapters attach to exactly one llava.model.Llama inside the model; found {what} in "
                           f"{type(model).__name__}")
    return found[0]


def select_linears(llama: nn.Module, targets, layers=None) -> list[tuple[str, nn.Module]]:
    """The Linear modules of `llama` named by `targets` (leaf names like "q_proj" or paths like
    "layers.0.mlp.down_proj"), restricted to `layers` (indices) when given. Paths are relative to `llama`."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise AdapterError(f"targets is empty; choose from {', '.join(LINEAR_NAMES)} or full paths like "
                           "'layers.0.self_attn.q_proj'")
    n_layers = len(llama.layers)
    if layers is not None:
        bad = [i for i in layers if not (isinstance(i, int) and 0 <= i < n_layers)]
        if bad:
            raise AdapterError(f"layers {bad} out of range: the model has layers 0..{n_layers - 1}")
    candidates = {name: m for name, m in llama.named_modules() if _leaf(name) in LINEAR_NAMES}
    selected: dict[str, nn.Module] = {}
    for target in targets:
        if target in LINEAR_NAMES:
            matches = [n for n in candidates if _leaf(n) == target]
        elif target in candidates:
            matches = [target]
        else:
            raise AdapterError(f"unknown target {target!r}{did_you_mean(target, LINEAR_NAMES)}; valid targets: "
                               f"{', '.join(LINEAR_NAMES)} or a path such as 'layers.0.self_attn.q_proj'")
        if layers is not None:  # lm_head is outside the layers and stays selectable
            matches = [n for n in matches if _layer_index(n) is None or _layer_index(n) in layers]
        if not matches:
            raise AdapterError(f"target {target!r} matches no module in layers {list(layers)}")
        for name in matches:
            if name == "lm_head" and llama.config.tie_embeddings:
                raise AdapterError("lm_head shares its weight with embed_tokens (tie_embeddings): adapting or merging "
                                   "it would change the input embeddings too; leave lm_head out of targets")
            if not isinstance(candidates[name], nn.Linear):
                raise AdapterError(f"{name} is a {type(candidates[name]).__name__}, not a plain nn.Linear "
                                   "(does the model already carry an adapter?)")
            selected[name] = candidates[name]
    return list(selected.items())


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "layers" else None


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, new)


def wrap_linears(llama: nn.Module, targets, layers, make: Callable[[str, nn.Linear], nn.Module]) -> None:
    """Replace each selected Linear by `make(path, linear)`; every wrapper is built before the first replacement, so a
    bad option leaves the model as it was."""
    wrapped = [(path, make(path, linear)) for path, linear in select_linears(llama, targets, layers)]
    for path, module in wrapped:
        replace_module(llama, path, module)


# ---- options -------------------------------------------------------------------------------------------------------

def apply_time_only(default=None) -> Any:
    """A dataclass field used while applying the adapter but not saved (a tokenizer object, say)."""
    return dataclasses.field(default=default, metadata={"persist": False})


def bind_options(cls: type, options: dict, method: str) -> Any:
    """Build the method's options dataclass; an unknown key or a wrong type is an error naming the valid options."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in options.items():
        if key not in fields:
            raise AdapterError(f"adapter {method!r} has no option {key!r}{did_you_mean(key, fields)}; valid options: "
                               f"{', '.join(fields)}")
        kwargs[key] = _coerce(value, hints[key], f"{method} option {key!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"adapter {method!r}: {e}") from None


def _coerce(value, hint, where: str):
    """Accept JSON's lists for tuples and ints for floats; reject other type mismatches of simple fields."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for tp in allowed:
        origin = typing.get_origin(tp) or tp
        if origin is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin in (int, str, bool) and type(value) is origin:
            return value
        if origin in (list, dict) and isinstance(value, origin):
            return value
        if origin is object or origin is typing.Any:
            return value
    names = " | ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise AdapterError(f"{where}: expected {names}, got {type(value).__name__} ({value!r})")


def persistent_options(options) -> dict:
    """The options as JSON-able data, without apply-time-only fields."""
    out = {}
    for f in dataclasses.fields(options):
        if f.metadata.get("persist", True):
            value = getattr(options, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


# ---- DeepSpeed ZeRO-3 ----------------------------------------------------------------------------------------------

def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params: list[torch.Tensor], modify: bool = False) -> Iterator[None]:
    """Make ZeRO-3-partitioned parameters whole inside the block (writes are kept when `modify`); plain parameters
    pass through. Every rank must enter this together, as with `deepspeed.zero.GatheredParameters`."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield
