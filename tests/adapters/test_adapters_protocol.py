"""peft's checklist for every method: identity at init, only adapter parameters train, training changes the output and
not the base, merge/unmerge, disable, save/load, parameter counts."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from adapter_cases import CASES, batch, case_ids, perturb_adapter, tiny_llama
from llava.adapters import (AdapterError, adapter_state_dict, apply_adapter, disable_adapter, load_adapter,
                            merge_adapter, read_adapter_config, save_adapter, trainable_parameters, unmerge_adapter)


def adapted(case, seed=0):
    return apply_adapter(tiny_llama(seed), case.method, **case.options)


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_identity_at_init_and_parameter_count(case):
    base = tiny_llama()
    ids = batch()
    expected = base(ids)
    model = adapted(case)
    out = model(ids)
    assert out.shape == expected.shape  # virtual tokens' logits are dropped
    if case.identity_at_init:
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    else:
        assert (out - expected).abs().max() > 1e-4
    params = trainable_parameters(model)
    assert sum(p.numel() for _, p in params) == case.count
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {name for name, _ in params}


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_training_moves_only_the_adapter(case):
    model = adapted(case)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    base_buffers = {n: b.clone() for n, b in model.named_buffers()}
    ids = batch()
    before = model(ids).detach()
    params = [p for _, p in trainable_parameters(model)]
    initial = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    for _ in range(3):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        assert grads == {n for n, _ in trainable_parameters(model)}
        opt.step()
    assert all(not torch.equal(p, p0) for p, p0 in zip(params, initial))
    model.eval()
    assert (model(ids) - before).abs().max() > 1e-4
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
    for n, b in model.named_buffers():
        if n in base_buffers and "rank_mask" not in n:
            assert torch.equal(b, base_buffers[n]), n


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_merge_unmerge_and_disable(case):
    model = adapted(case)
    perturb_adapter(model)
    ids = batch()
    out = model(ids)
    with disable_adapter(model):
        disabled = model(ids)
    torch.testing.assert_close(model(ids), out, rtol=0, atol=0)  # re-enabled
    if case.method == "loftq":  # the base is the quantised weight: disabling drops the LoRA delta only
        reference = copy.deepcopy(model)
        for name, p in trainable_parameters(reference):
            if name.endswith("lora_B"):
                p.data.zero_()
        torch.testing.assert_close(disabled, reference(ids), rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(disabled, tiny_llama()(ids), rtol=0, atol=1e-6)

    if not case.mergeable:
        with pytest.raises(AdapterError, match="cannot merge"):
            merge_adapter(model)
        return
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    merge_adapter(model)
    merged = model(ids)
    scale = out.abs().max()
    tolerance = 1e-2 * scale if case.method in ("oft", "adalora") else 1e-4
    assert (merged - out).abs().max() <= tolerance
    assert (merged - out).abs().max() <= 1e-4  # in fp32 both are far tighter than peft's bounds
    with disable_adapter(model):  # unmerged for the block, merged again after
        torch.testing.assert_close(model(ids), disabled, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(ids), merged, rtol=0, atol=1e-5)
    unmerge_adapter(model)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-5)
    torch.testing.assert_close(model(ids), out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_save_load_roundtrip(case, tmp_path):
    model = adapted(case)
    perturb_adapter(model)
    ids = batch()
    out = model(ids)
    save_adapter(model, tmp_path)
    config = read_adapter_config(tmp_path)
    assert config["method"] == case.method
    state = adapter_state_dict(model)
    base_names = {n for n, _ in tiny_llama().named_parameters()}
    assert not (set(state) & base_names), "the adapter file must not contain base weights"

    fresh = tiny_llama()  # no adapter yet: built from the saved config
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids), out, rtol=0, atol=1e-6)

    prepared = adapted(case, seed=0)  # the same adapter already applied: weights are replaced
    load_adapter(prepared, tmp_path)
    torch.testing.assert_close(prepared(ids), out, rtol=0, atol=1e-6)


def test_adapter_lives_inside_a_larger_model_and_extra_modules_train(tmp_path):
    """LLaVA-like container: modules outside the language model keep their q_proj names but are never adapted."""

    class Container(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8)})
            self.projector = torch.nn.Linear(8, 64)
            self.llm = tiny_llama()

    model = apply_adapter(Container(), "lora", r=2, extra_trainable=("projector",))
    names = [n for n, _ in trainable_parameters(model)]
    assert "projector.weight" in names and "projector.bias" in names
    assert all(n.startswith(("llm.", "projector.")) for n in names)
    assert type(model.vision["q_proj"]) is torch.nn.Linear and not model.vision["q_proj"].weight.requires_grad
    assert sum(n.endswith("lora_A") for n in names) == 2 * 7
    perturb_adapter(model)
    save_adapter(model, tmp_path)
    fresh = Container()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh.projector.weight, model.projector.weight)
    ids = batch()
    torch.testing.assert_close(fresh.llm(ids), model.llm(ids), rtol=0, atol=1e-6)
