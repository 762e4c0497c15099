"""Model-level adapter operations: apply, trainable parameters, save/load, merge/unmerge, disable, fold, AdaLoRA hooks.

They take the whole model — a bare `Llama` or anything containing one (the LLaVA model, a DeepSpeed engine) — and find
what they need: the language model for attaching, the `Adapter` modules (see base.py) for everything else. The module
given to `apply_adapter` records the adapter in its `adapter_spec` attribute, and names in state dicts are relative to
it, whatever wraps it later.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from llava.adapters.base import Adapter, AdapterError, LinearAdapter, bind_options, find_llama, gathered, \
    is_partitioned, persistent_options, seeded
from llava.adapters.registry import Method, get_method

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "llava-adapter"


@dataclass
class AdapterSpec:
    """What `apply_adapter` did, enough to rebuild it: saved as adapter_config.json."""
    method: str
    options: dict
    extra_trainable: tuple[str, ...] = ()
    folded: bool = False

    @property
    def bound(self):
        return bind_options(get_method(self.method).options, self.options, self.method)


# ---- applying ------------------------------------------------------------------------------------------------------

def apply_adapter(model: nn.Module, method: str, *, extra_trainable: tuple[str, ...] | list[str] = (),
                  **options) -> nn.Module:
    """Attach adapter `method` to the language model inside `model` and freeze everything else.

    `extra_trainable` names modules (paths relative to `model`, e.g. "projector") that train in full alongside the
    adapter and are saved with it; nothing outside the language model is touched unless named here. Returns `model`.
    Apply before wrapping the model in DeepSpeed: the adapter's parameters are ordinary nn.Parameters, so ZeRO
    partitions them like any other.
    """
    registered = get_method(method)
    existing = _find_spec(model)
    if existing is not None:
        raise AdapterError(f"the model already has a {existing[1].method!r} adapter; apply one per model")
    opts = bind_options(registered.options, options, method)
    _, llama = find_llama(model)
    extra = tuple(extra_trainable)
    for name in extra:
        _submodule(model, name, "extra_trainable")
    with seeded(getattr(opts, "seed", None), llama.embed_tokens.weight.device):
        opts = registered.build(llama, opts) or opts
    model.adapter_spec = AdapterSpec(method, persistent_options(opts), extra)
    _set_trainable(model)
    return model


def _submodule(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in model.named_children())
        raise AdapterError(f"{what}: {type(model).__name__} has no module {name!r} (its children: {children})") \
            from None


def _find_spec(model: nn.Module) -> tuple[nn.Module, AdapterSpec] | None:
    for module in model.modules():
        spec = module.__dict__.get("adapter_spec")
        if spec is not None:
            return module, spec
    return None


def _root(model: nn.Module) -> tuple[nn.Module, AdapterSpec, Method]:
    found = _find_spec(model)
    if found is None:
        raise AdapterError("the model has no adapter: call llava.adapters.apply_adapter(model, method, ...) first")
    root, spec = found
    return root, spec, get_method(spec.method)


def _adapters(root: nn.Module) -> list[tuple[str, Adapter]]:
    return [(name, m) for name, m in root.named_modules() if isinstance(m, Adapter)]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _set_trainable(model: nn.Module) -> None:
    root, _, _ = _root(model)
    for p in root.parameters():
        p.requires_grad_(False)
    for _, p in trainable_parameters(root):
        p.requires_grad_(True)


# ---- parameters and state ------------------------------------------------------------------------------------------

def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything the adapter trains: adapter parameters, then the extra trainable modules'."""
    root, spec, _ = _root(model)
    found: dict[str, nn.Parameter] = {}
    for prefix, module in _adapters(root):
        for name in module.adapter_params():
            found[_join(prefix, name)] = module.get_parameter(name)
    for extra in spec.extra_trainable:
        for name, p in root.get_submodule(extra).named_parameters():
            found[_join(extra, name)] = p
    return list(found.items())


def _adapter_tensors(root: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors that make up the adapter's state: trainable ones and saved buffers."""
    tensors = dict(trainable_parameters(root))
    for prefix, module in _adapters(root):
        for name in module.adapter_buffers():
            tensors[_join(prefix, name)] = module.get_buffer(name)
    return tensors


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the adapter's tensors (and the extra trainable modules'), keyed by name.

    Copies, so the result stays valid after a ZeRO-3 gather ends. Under ZeRO-3 call it inside
    `deepspeed.zero.GatheredParameters([p for _, p in trainable_parameters(model)])`.
    """
    root, _, _ = _root(model)
    state = {}
    for name, tensor in _adapter_tensors(root).items():
        if is_partitioned(tensor) and tensor.numel() == 0:
            raise AdapterError(f"{name} is partitioned by DeepSpeed ZeRO-3: call adapter_state_dict inside "
                               "deepspeed.zero.GatheredParameters(...) over trainable_parameters(model)")
        state[name] = tensor.detach().clone()
    return state


def save_adapter(model: nn.Module, out_dir: str | Path) -> None:
    """Write adapter_model.safetensors (adapter-only tensors) and adapter_config.json (method, options, ...)."""
    from llava.io import atomic_save_safetensors, atomic_write_json

    root, spec, method = _root(model)
    out_dir = Path(out_dir)
    atomic_save_safetensors(adapter_state_dict(root), out_dir / WEIGHTS_FILE, metadata={"format": FORMAT})
    config = {"format": FORMAT, "version": 1, **dataclasses.asdict(spec)}
    config["extra_trainable"] = list(spec.extra_trainable)
    if method.saved_state is not None:
        config["state"] = method.saved_state(root)
    atomic_write_json(out_dir / CONFIG_FILE, config)


def read_adapter_config(out_dir: str | Path) -> dict:
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{path}: not found (expected a directory written by llava.adapters.save_adapter)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if config.get("format") != FORMAT:
        hint = " — it is a peft adapter; load it with peft.PeftModel.from_pretrained" if "peft_type" in config else ""
        raise AdapterError(f"{path}: not a {FORMAT} config{hint}")
    for key in ("method", "options"):
        if key not in config:
            raise AdapterError(f"{path}: missing key {key!r}")
    return config


def load_adapter(model: nn.Module, out_dir: str | Path) -> nn.Module:
    """Load a saved adapter into `model`: applied first from the saved config when the model has none, otherwise the
    model's adapter must be the same method with the same options. Every tensor must match by name and shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    config = read_adapter_config(out_dir)
    found = _find_spec(model)
    if found is None:
        method = get_method(config["method"])
        apply_adapter(model, config["method"], extra_trainable=tuple(config.get("extra_trainable", ())),
                      **{**config["options"], **method.loading_overrides})
        _find_spec(model)[1].options = config["options"]
    else:
        spec = found[1]
        saved = AdapterSpec(config["method"], config["options"], tuple(config.get("extra_trainable", ())))
        if (spec.method, spec.bound, spec.extra_trainable) != (saved.method, saved.bound, saved.extra_trainable):
            raise AdapterError(f"{out_dir / CONFIG_FILE}: adapter {saved.method} {saved.options} extra_trainable="
                               f"{list(saved.extra_trainable)} does not match the model's {spec.method} {spec.options} "
                               f"extra_trainable={list(spec.extra_trainable)}")
    root, spec, _ = _root(model)
    if config.get("folded") and not spec.folded:
        fold_adapter(root)
    file = out_dir / WEIGHTS_FILE
    try:
        state = load_file(str(file))
    except (FileNotFoundError, SafetensorError) as e:
        raise AdapterError(f"{file}: cannot read adapter weights ({e})") from None
    live = _adapter_tensors(root)
    missing, unexpected = sorted(set(live) - set(state)), sorted(set(state) - set(live))
    if missing or unexpected:
        raise AdapterError(f"{file}: tensors do not match the model's adapter; missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    with gathered(list(live.values()), modify=True), torch.no_grad():
        for name, tensor in live.items():
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise AdapterError(f"{file}: {name} has shape {tuple(state[name].shape)}, the model's adapter has "
                                   f"{tuple(tensor.shape)}")
            tensor.copy_(state[name])
    return model


# ---- merge, disable, fold ------------------------------------------------------------------------------------------

def _mergeable_modules(model: nn.Module, action: str) -> list[LinearAdapter]:
    root, spec, method = _root(model)
    modules = [m for _, m in _adapters(root)]
    stuck = [name for name, m in _adapters(root) if not m.mergeable]
    if not method.mergeable or stuck:
        why = f"{spec.method} adds inputs or key/value prefixes, not weight changes" if not method.mergeable else \
            f"{stuck[0]} sits beside a non-linear block" + (f" (and {len(stuck) - 1} more)" if len(stuck) > 1 else "")
        raise AdapterError(f"cannot {action} a {spec.method} adapter: {why}. Methods that merge: "
                           "lora, adalora, loftq, oft, ia3, krona (variant 'linear')")
    return modules


def merge_adapter(model: nn.Module) -> None:
    """Fold the adapter into the base weights (forward unchanged, adapter cost gone); `unmerge_adapter` undoes it."""
    for module in _mergeable_modules(model, "merge"):
        with gathered(list(module.parameters()) + list(module.buffers()), modify=True):
            module.merge()


def unmerge_adapter(model: nn.Module) -> None:
    for module in _mergeable_modules(model, "unmerge"):
        with gathered(list(module.parameters()) + list(module.buffers()), modify=True):
            module.unmerge()


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """Run the base model inside the block (a merged adapter is unmerged for the block and merged again after)."""
    root, _, _ = _root(model)
    modules = [m for _, m in _adapters(root)]
    merged = [m for m in modules if isinstance(m, LinearAdapter) and m.merged]
    for m in merged:
        m.unmerge()
    previous = [m.enabled for m in modules]
    try:
        for m in modules:
            m.enabled = False
        yield
    finally:
        for m, enabled in zip(modules, previous):
            m.enabled = enabled
        for m in merged:
            m.merge()


def fold_adapter(model: nn.Module) -> None:
    """Replace prompt/prefix encoders (p_tuning, prefix_tuning) by the plain tensors they produce, for inference.
    The encoders are dropped, so the result no longer trains; it saves and loads like any adapter."""
    root, spec, _ = _root(model)
    foldable = [(name, m) for name, m in _adapters(root) if hasattr(m, "fold")]
    if not foldable:
        raise AdapterError(f"a {spec.method} adapter has nothing to fold (only p_tuning and prefix_tuning have an "
                           "encoder)")
    for name, module in foldable:
        parent_name, _, leaf = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        folded = module.fold()
        if folded is None:
            delattr(parent, leaf)
        else:
            setattr(parent, leaf, folded)
    spec.folded = True
    _set_trainable(root)


# ---- training hooks ------------------------------------------------------------------------------------------------

def extra_loss(model: nn.Module) -> torch.Tensor | None:
    """The adapter's regulariser to add to the training loss (AdaLoRA's orthogonality term), or None."""
    root, spec, method = _root(model)
    return None if method.extra_loss is None else method.extra_loss(root, spec.bound)


def after_optimizer_step(model: nn.Module, step: int, total_steps: int, *,
                         grad_of: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> None:
    """Per-step adapter bookkeeping (AdaLoRA's importance scores, rank budget and masking; a no-op for the others).

    Call it after each optimiser step, BEFORE `zero_grad()`: it reads the gradients. `step` counts optimiser steps
    taken (1 after the first), `total_steps` is the planned total. DeepSpeed's `engine.step()` clears gradients, so
    under DeepSpeed call it after `engine.backward(loss)` at the gradient-accumulation boundary, just before
    `engine.step()`, with `grad_of=deepspeed.utils.safe_get_full_grad` (works for ZeRO-1/2/3).
    """
    root, spec, method = _root(model)
    if method.after_step is not None:
        method.after_step(root, spec.bound, step, total_steps, grad_of)
