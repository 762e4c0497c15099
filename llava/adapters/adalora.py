"""AdaLoRA (Zhang et al., 2023): ΔW = P·diag(λ)·Q · alpha/(r + 1e-5), an SVD-shaped update whose rank budget moves
to where it matters during training.

- P (`lora_B`, [out, r]) and Q (`lora_A`, [r, in]) start as N(0, 0.02) and λ (`lora_E`, [r]) at zero, so the model
  is unchanged at init (peft's init and scaling, so the forward matches peft's `SVDLinear`).
- `extra_loss` adds w · mean(‖QQᵀ − I‖_F, ‖PᵀP − I‖_F) to keep P and Q near-orthogonal (peft's unsquared form).
- `after_optimizer_step` updates each entry's importance I = |w·∂L/∂w| as an EMA Ī (β1) and its uncertainty
  Ū = EMA|I − Ī| (β2); a triplet's score is s(λᵢ) + mean s(Qᵢ,:) + mean s(P:,ᵢ) with s = Ī·Ū. The total budget falls
  from Σ init_r to target_r per module on a cubic schedule between tinit and T − tfinal; every ΔT steps the λ of the
  lowest-scored triplets are set to zero (they can still grow back, as in the paper). At T − tfinal the pattern is
  fixed: it is stored in each module's `rank_mask` buffer (applied in the forward, saved with the adapter and in
  adapter_config.json) and never changes again.

Differences from peft, on purpose: exactly `budget` triplets are kept (peft's `<= threshold` drops every tie), and a
budget equal to the current total masks nothing (peft's kthvalue fails on k = 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llava.adapters.base import PROJECTIONS, AdapterError, LinearAdapter, gathered, wrap_linears
from llava.adapters.registry import register


class SVDLinear(LinearAdapter):
    def __init__(self, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(linear)
        self.r = r
        self.scaling = alpha / (r + 1e-5)
        w = linear.weight
        kw = dict(dtype=w.dtype, device=w.device)
        self.lora_A = nn.Parameter(torch.randn(r, self.in_features, **kw) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, **kw))
        self.lora_B = nn.Parameter(torch.randn(self.out_features, r, **kw) * 0.02)
        self.register_buffer("rank_mask", torch.ones(r, **kw))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Importance EMAs {param name: (Ī, Ū)}; training-time state, rebuilt after a restart (as in peft).
        self.importance: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def adapter_params(self) -> tuple[str, ...]:
        return ("lora_A", "lora_E", "lora_B")

    def adapter_buffers(self) -> tuple[str, ...]:
        return ("rank_mask",)

    def _values(self) -> torch.Tensor:
        return self.lora_E * self.rank_mask

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x).to(self.lora_A.dtype)
        return F.linear(F.linear(x, self.lora_A * self._values()[:, None]) * self.scaling, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B.float() @ (self.lora_A.float() * self._values().float()[:, None]) * self.scaling

    def orthogonality(self) -> torch.Tensor:
        """‖QQᵀ − I‖_F + ‖PᵀP − I‖_F."""
        eye = torch.eye(self.r, device=self.lora_A.device, dtype=self.lora_A.dtype)
        return (torch.linalg.matrix_norm(self.lora_A @ self.lora_A.T - eye)
                + torch.linalg.matrix_norm(self.lora_B.T @ self.lora_B - eye))

    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float, grad_of: Callable) -> None:
        for name in self.adapter_params():
            p = getattr(self, name)
            grad = grad_of(p)
            if grad is None:
                raise AdapterError(
                    "AdaLoRA needs the gradients of its parameters in after_optimizer_step: call it after "
                    "optimizer.step() and before zero_grad(); under DeepSpeed (whose engine.step() clears them) call "
                    "it after engine.backward() with grad_of=deepspeed.utils.safe_get_full_grad")
            ipt = (p * grad.to(p.dtype)).abs().float()
            avg, unc = self.importance.get(name, (torch.zeros_like(ipt), torch.zeros_like(ipt)))
            avg = beta1 * avg + (1 - beta1) * ipt
            unc = beta2 * unc + (1 - beta2) * (ipt - avg).abs()
            self.importance[name] = (avg, unc)

    def triplet_scores(self) -> torch.Tensor:
        if not self.importance:  # no gradient seen yet (e.g. a resumed run): every triplet ties
            return torch.zeros(self.r, device=self.lora_E.device)
        score = {name: avg * unc for name, (avg, unc) in self.importance.items()}
        return score["lora_E"] + score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)


@dataclass
class AdaLoraOptions:
    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = PROJECTIONS
    layers: tuple[int, ...] | None = None
    tinit: int = 0  # steps before the budget starts to fall
    tfinal: int = 0  # steps at the end with the rank pattern fixed
    delta_t: int = 1  # mask every delta_t steps while the budget falls
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    seed: int | None = 0

    def __post_init__(self):
        if not 0 < self.target_r <= self.init_r:
            raise ValueError(f"need 0 < target_r ({self.target_r}) <= init_r ({self.init_r})")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"beta1={self.beta1} and beta2={self.beta2} must be in (0, 1)")
        if self.orth_reg_weight < 0 or self.delta_t < 1 or self.tinit < 0 or self.tfinal < 0:
            raise ValueError("orth_reg_weight, tinit and tfinal must be >= 0 and delta_t >= 1")


def svd_modules(model: nn.Module) -> list[tuple[str, SVDLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SVDLinear)]


def orthogonality_loss(model: nn.Module, opts: AdaLoraOptions) -> torch.Tensor:
    modules = [m for _, m in svd_modules(model)]
    # peft averages over the matrices (two per module).
    return opts.orth_reg_weight * torch.stack([m.orthogonality() for m in modules]).sum() / (2 * len(modules))


def budget_at(step: int, total_steps: int, opts: AdaLoraOptions, init_budget: int, target_budget: int) -> int:
    """Cubic schedule: b(t) = b_T + (b_0 − b_T)·(1 − (t − tinit)/(T − tfinal − tinit))³ (peft's `budget_schedule`)."""
    if step <= opts.tinit:
        return init_budget
    if step >= total_steps - opts.tfinal:
        return target_budget
    remaining = 1 - (step - opts.tinit) / (total_steps - opts.tfinal - opts.tinit)
    return int((init_budget - target_budget) * remaining ** 3 + target_budget)


def update_and_allocate(model: nn.Module, opts: AdaLoraOptions, step: int, total_steps: int,
                        grad_of: Callable | None = None) -> dict[str, list[bool]] | None:
    """One AdaLoRA bookkeeping step (see the module docstring); returns the rank pattern when it is fixed now."""
    final_step = total_steps - opts.tfinal
    if not opts.tinit < final_step:
        raise AdapterError(f"AdaLoRA schedule leaves no budgeting phase: tinit={opts.tinit} must be < total_steps "
                           f"({total_steps}) − tfinal ({opts.tfinal})")
    modules = svd_modules(model)
    params = [getattr(m, n) for _, m in modules for n in m.adapter_params()]
    with gathered(params, modify=True):
        if step > final_step:  # pattern fixed: keep the pruned λ at zero
            for _, m in modules:
                m.lora_E.data.mul_(m.rank_mask)
            return None
        if step < final_step:
            for _, m in modules:
                m.update_importance(opts.beta1, opts.beta2, grad_of or (lambda p: p.grad))
            if step <= opts.tinit or step % opts.delta_t:
                return None
        init_budget = sum(m.r for _, m in modules)
        budget = budget_at(step, total_steps, opts, init_budget, opts.target_r * len(modules))
        keep = _keep_top(modules, budget)
        for (_, m), kept in zip(modules, keep):
            m.lora_E.data.mul_(kept.to(m.lora_E.dtype))
        if step < final_step:
            return None
        pattern = {}
        for (name, m), kept in zip(modules, keep):
            m.rank_mask.copy_(kept.to(m.rank_mask.dtype))
            m.importance.clear()
            pattern[name] = kept.tolist()
        return pattern


def _keep_top(modules: list[tuple[str, SVDLinear]], budget: int) -> list[torch.Tensor]:
    scores = [m.triplet_scores() for _, m in modules]
    flat = torch.cat(scores)
    keep_flat = torch.zeros_like(flat, dtype=torch.bool)
    keep_flat[torch.topk(flat, min(budget, flat.numel())).indices] = True
    return list(keep_flat.split([s.numel() for s in scores]))


def rank_pattern(model: nn.Module) -> dict[str, list[bool]]:
    return {name: m.rank_mask.bool().tolist() for name, m in svd_modules(model)}


@register("adalora", AdaLoraOptions, mergeable=True,
          summary="SVD-shaped update P·diag(λ)·Q with importance-driven rank budget",
          extra_loss=orthogonality_loss, after_step=update_and_allocate,
          saved_state=lambda model: {"rank_pattern": rank_pattern(model)})
def build_adalora(llama: nn.Module, opts: AdaLoraOptions) -> None:
    wrap_linears(llama, opts.targets, opts.layers,
                 lambda path, linear: SVDLinear(linear, opts.init_r, opts.alpha, opts.dropout))
