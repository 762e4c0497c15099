"""PEFT adapters for the LLaVA language model, one file per method behind one small protocol (base.py) and a registry.

    from llava.adapters import apply_adapter, trainable_parameters, save_adapter, load_adapter, export_peft
    apply_adapter(model, "lora", r=16, alpha=32, extra_trainable=("projector",))

Methods: lora, adalora, loftq, oft, ia3, krona (weight-space: mergeable), prompt_tuning, p_tuning, prefix_tuning,
prefix_tuning_v2 (inputs and key/value prefixes). See docs/adapters.md for options, results and caveats.
"""
from llava.adapters import (  # noqa: F401  (importing registers each method)
    adalora, ia3, krona, loftq, lora, oft, p_tuning, prefix_tuning, prefix_tuning_v2, prompt_tuning)
from llava.adapters.api import (
    AdapterSpec, adapter_state_dict, after_optimizer_step, apply_adapter, disable_adapter, extra_loss, fold_adapter,
    load_adapter, merge_adapter, read_adapter_config, save_adapter, trainable_parameters, unmerge_adapter)
from llava.adapters.base import Adapter, AdapterError
from llava.adapters.peft_export import export_peft
from llava.adapters.registry import METHODS

__all__ = [
    "METHODS", "Adapter", "AdapterError", "AdapterSpec", "adapter_state_dict", "after_optimizer_step",
    "apply_adapter", "disable_adapter", "export_peft", "extra_loss", "fold_adapter", "load_adapter", "merge_adapter",
    "read_adapter_config", "save_adapter", "trainable_parameters", "unmerge_adapter",
]
