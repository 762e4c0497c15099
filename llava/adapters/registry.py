"""Method name → how to build it. Each method file registers its build function with `@register(...)`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from llava.adapters.base import AdapterError, did_you_mean


@dataclass(frozen=True)
class Method:
    name: str
    options: type  # dataclass of the method's options
    # build(llama, options) installs the adapter modules; it may return the options with apply-time inputs resolved
    # (text → token ids) so that what is saved rebuilds the same adapter.
    build: Callable
    mergeable: bool  # weight-space method whose change folds into the base weights
    summary: str
    # Option values used when the adapter is rebuilt only to receive saved weights (skips an expensive init).
    loading_overrides: dict = field(default_factory=dict)
    extra_loss: Callable | None = None  # (model, options) -> Tensor, added to the training loss
    after_step: Callable | None = None  # (model, options, step, total_steps, grad_of) after each optimiser step
    saved_state: Callable | None = None  # (model) -> dict written to adapter_config.json for people and tools


METHODS: dict[str, Method] = {}


def register(name: str, options: type, *, mergeable: bool, summary: str, **hooks):
    def decorator(build):
        if name in METHODS:
            raise RuntimeError(f"adapter method {name!r} registered twice")
        METHODS[name] = Method(name, options, build, mergeable, summary, **hooks)
        return build

    return decorator


def get_method(name: str) -> Method:
    if name not in METHODS:
        listing = "".join(f"\n  {m.name}: {m.summary}" for m in METHODS.values())
        raise AdapterError(f"unknown adapter method {name!r}{did_you_mean(name, METHODS)}; valid methods:{listing}")
    return METHODS[name]
