"""(IA)³ (Liu et al., 2022): learned vectors, initialised to ones, that rescale keys and values (`l ⊙ W x`, the
output of k_proj and v_proj) and the input of the MLP's down projection (`W (l ⊙ x)`). Same targets and shapes as
peft's defaults for LLaMA; parameters per layer: k_out + v_out + ffn_hidden."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llava.adapters.base import AdapterError, LinearAdapter, wrap_linears
from llava.adapters.registry import register


class IA3Linear(LinearAdapter):
    def __init__(self, linear: nn.Linear, scale_input: bool):
        super().__init__(linear)
        self.scale_input = scale_input
        w = linear.weight
        self.ia3_l = nn.Parameter(torch.ones(self.in_features if scale_input else self.out_features,
                                             dtype=w.dtype, device=w.device))

    def adapter_params(self) -> tuple[str, ...]:
        return ("ia3_l",)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scales={'input' if self.scale_input else 'output'}"

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.ia3_l.to(x.dtype)
        return self.base_forward(x * scale) if self.scale_input else self.base_forward(x) * scale

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self.ia3_l.float()
        return weight * scale[None, :] if self.scale_input else weight * scale[:, None]

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self._checked_divisor()
        return weight / scale[None, :] if self.scale_input else weight / scale[:, None]

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.scale_input else bias * self.ia3_l.float()

    def unmerged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.scale_input else bias / self._checked_divisor()

    def _checked_divisor(self) -> torch.Tensor:
        scale = self.ia3_l.float()
        if (scale.abs() < 1e-6).any():
            raise AdapterError("cannot unmerge IA3: a learned scale is ~0, so the original weight is lost")
        return scale


@dataclass
class Ia3Options:
    targets: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    feedforward: tuple[str, ...] = ("down_proj",)  # targets whose *input* is scaled (the others scale the output)
    layers: tuple[int, ...] | None = None


@register("ia3", Ia3Options, mergeable=True,
          summary="learned rescaling of keys, values and the MLP's inner activations")
def build_ia3(llama: nn.Module, opts: Ia3Options) -> None:
    stray = [name for name in opts.feedforward if name not in opts.targets]
    if stray:
        raise AdapterError(f"ia3 feedforward {stray} must also be in targets {list(opts.targets)}")
    wrap_linears(llama, opts.targets, opts.layers, lambda path, linear: IA3Linear(
        linear, scale_input=path.rpartition(".")[2] in opts.feedforward or path in opts.feedforward))
