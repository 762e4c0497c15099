"""AdaLoRA's training-time machinery: the cubic budget, importance-driven masking, the fixed final rank pattern (saved
and restored) and the orthogonality regulariser."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapter_cases import batch, tiny_llama
from llava.adapters import (AdapterError, after_optimizer_step, apply_adapter, extra_loss, load_adapter,
                            read_adapter_config, save_adapter, trainable_parameters)
from llava.adapters.adalora import AdaLoraOptions, SVDLinear, budget_at


def test_budget_schedule_is_cubic():
    opts = AdaLoraOptions(tinit=10, tfinal=20)
    b0, bt, total = 120, 40, 100
    assert budget_at(5, total, opts, b0, bt) == b0
    assert budget_at(10, total, opts, b0, bt) == b0
    assert budget_at(45, total, opts, b0, bt) == int(bt + (b0 - bt) * 0.5 ** 3)
    assert budget_at(80, total, opts, b0, bt) == bt
    assert budget_at(95, total, opts, b0, bt) == bt
    steps = [budget_at(t, total, opts, b0, bt) for t in range(total)]
    assert steps == sorted(steps, reverse=True)


def _train(model, total_steps, seed=0):
    params = [p for _, p in trainable_parameters(model)]
    opt = torch.optim.AdamW(params, lr=2e-2)
    gen = torch.Generator().manual_seed(seed)
    nonzero = []
    model.train()
    for step in range(1, total_steps + 1):
        ids = torch.randint(0, 256, (4, 10), generator=gen)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + extra_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        after_optimizer_step(model, step, total_steps)
        nonzero.append(sum(int((m.lora_E != 0).sum()) for m in model.modules() if isinstance(m, SVDLinear)))
    model.eval()
    return nonzero


def test_budget_falls_and_final_pattern_is_fixed_saved_and_restored(tmp_path):
    model = apply_adapter(tiny_llama(), "adalora", init_r=4, target_r=2, tinit=2, tfinal=3, delta_t=2,
                          targets=["q_proj", "v_proj"])
    modules = [m for m in model.modules() if isinstance(m, SVDLinear)]
    init_budget, target_budget = 4 * len(modules), 2 * len(modules)
    total = 12
    nonzero = _train(model, total)
    opts = model.adapter_spec.bound
    for step, count in enumerate(nonzero, 1):
        if opts.tinit < step < total - opts.tfinal and step % opts.delta_t == 0:  # just masked
            assert count <= budget_at(step, total, opts, init_budget, target_budget)
    assert nonzero[-1] == target_budget  # after the final allocation exactly the target budget is left
    masks = [m.rank_mask.clone() for m in modules]
    assert int(sum(mask.sum() for mask in masks)) == target_budget
    for m, mask in zip(modules, masks):
        assert torch.equal(m.lora_E != 0, mask.bool())

    save_adapter(model, tmp_path)
    pattern = read_adapter_config(tmp_path)["state"]["rank_pattern"]
    assert sorted(pattern) == sorted(n for n, m in model.named_modules() if isinstance(m, SVDLinear))
    assert sum(sum(v) for v in pattern.values()) == target_budget
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path)
    restored = [m.rank_mask for m in fresh.modules() if isinstance(m, SVDLinear)]
    assert all(torch.equal(a, b) for a, b in zip(restored, masks))
    ids = batch()
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=1e-6)


def test_orthogonality_regulariser_matches_its_formula_and_trains_p_and_q():
    model = apply_adapter(tiny_llama(), "adalora", init_r=3, target_r=2, orth_reg_weight=0.3)
    modules = [m for m in model.modules() if isinstance(m, SVDLinear)]
    eye = torch.eye(3)
    manual = sum(torch.linalg.matrix_norm(m.lora_A @ m.lora_A.T - eye) + torch.linalg.matrix_norm(
        m.lora_B.T @ m.lora_B - eye) for m in modules) / (2 * len(modules))
    loss = extra_loss(model)
    torch.testing.assert_close(loss, 0.3 * manual)
    loss.backward()
    assert all(m.lora_A.grad.abs().sum() > 0 and m.lora_B.grad.abs().sum() > 0 for m in modules)


def test_missing_gradients_and_bad_schedules_are_explained():
    model = apply_adapter(tiny_llama(), "adalora", init_r=2, target_r=1, tinit=2, tfinal=2)
    with pytest.raises(AdapterError, match="before zero_grad"):
        after_optimizer_step(model, 1, 10)
    with pytest.raises(AdapterError, match="no budgeting phase"):
        after_optimizer_step(model, 1, 4)
    # grad_of supplies gradients from elsewhere (DeepSpeed's safe_get_full_grad)
    after_optimizer_step(model, 1, 10, grad_of=lambda p: torch.ones_like(p))


def test_other_methods_have_no_extra_loss_and_a_noop_step():
    model = apply_adapter(tiny_llama(), "lora", r=2)
    assert extra_loss(model) is None
    after_optimizer_step(model, 1, 10)  # no gradients needed
