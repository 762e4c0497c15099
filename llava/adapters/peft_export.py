"""`export_peft`: write a LoRA adapter in peft's on-disk layout, so `peft.PeftModel.from_pretrained` loads it onto the
transformers LlamaForCausalLM that `Llama.save_hf` writes for the same base weights.

Key map (ours, relative to the Llama → peft):
    layers.N.self_attn.q_proj.lora_A   →  base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight   [r, in]
    layers.N.self_attn.q_proj.lora_B   →  base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight   [out, r]
    lm_head.lora_A                     →  base_model.model.lm_head.lora_A.weight
Only the language model's LoRA goes into the export; extra trainable modules (the projector) are not part of a
LlamaForCausalLM and are saved by `save_adapter`.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from llava.adapters.api import WEIGHTS_FILE, CONFIG_FILE, _root
from llava.adapters.base import AdapterError, find_llama
from llava.adapters.lora import LoRALinear


def hf_module_name(name: str) -> str:
    """Our module path inside the Llama → the module path inside transformers' LlamaForCausalLM."""
    return name if name == "lm_head" else f"model.{name}"


def export_peft(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> None:
    from llava.io import atomic_save_safetensors, atomic_write_json

    root, spec, _ = _root(model)
    if spec.method != "lora":
        raise AdapterError(f"export_peft writes LoRA adapters; this model has a {spec.method!r} adapter "
                           "(save it with save_adapter)")
    _, llama = find_llama(root)
    modules = [(name, m) for name, m in llama.named_modules() if isinstance(m, LoRALinear)]
    if any(m.merged for _, m in modules):
        raise AdapterError("the LoRA adapter is merged into the base weights; call unmerge_adapter before export_peft "
                           "so that the base model and the adapter are not applied twice")
    opts = spec.bound
    state = {}
    for name, m in modules:
        key = f"base_model.model.{hf_module_name(name)}"
        state[f"{key}.lora_A.weight"] = m.lora_A.detach().clone()
        state[f"{key}.lora_B.weight"] = m.lora_B.detach().clone()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": opts.r, "lora_alpha": opts.alpha, "lora_dropout": opts.dropout, "use_rslora": opts.rslora,
        # Exact module paths: peft matches list entries by equality or dotted suffix.
        "target_modules": [hf_module_name(name) for name, _ in modules],
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    out_dir = Path(out_dir)
    atomic_save_safetensors(state, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    atomic_write_json(out_dir / CONFIG_FILE, config)
