"""Adapters on the real multimodal model (vision tower + projector + LLaMA) and through llava.generate."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from adapter_cases import perturb_adapter, tiny_llama
from llava.adapters import (Adapter, apply_adapter, disable_adapter, load_adapter, save_adapter,
                            trainable_parameters)
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX as IMG
from llava.generate import GenerationConfig, generate
from llava.model.llama import LlamaConfig
from llava.model.llava import LlavaConfig, LlavaModel

TINY_VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8}


def tiny_llava() -> LlavaModel:
    torch.manual_seed(0)
    return LlavaModel(LlavaConfig(vision_tower=TINY_VISION, llm=LlamaConfig.from_name("tiny"), max_len=128)).eval()


def llava_batch():
    rows = [[1, IMG, 5, 6, 7], [1, 8, IMG, 9, 10, 11, 12]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.where(mask.bool() & (ids != IMG), ids, torch.full_like(ids, IGNORE_INDEX))
    labels[:, :3] = IGNORE_INDEX
    return ids, mask, labels, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_lora_touches_only_the_language_model_and_the_named_projector(tmp_path):
    model = apply_adapter(tiny_llava(), "lora", r=2, extra_trainable=("projector",))
    adapters = [name for name, m in model.named_modules() if isinstance(m, Adapter)]
    assert adapters and all(name.startswith("llm.layers.") for name in adapters)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in trainable_parameters(model)}
    assert not any(name.startswith("vision.") for name in trainable)
    assert {n for n in trainable if n.startswith("projector.")} == {f"projector.{n}" for n, _ in
                                                                    model.projector.named_parameters()}
    ids, mask, labels, images = llava_batch()
    model.train()
    model(ids, labels=labels, images=images, attention_mask=mask)["loss"].backward()
    assert all(p.grad is not None for _, p in trainable_parameters(model))
    assert all(p.grad is None for p in model.vision.parameters())
    model.eval()
    perturb_adapter(model)
    save_adapter(model, tmp_path)
    fresh = tiny_llava()
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, labels=labels, images=images, attention_mask=mask)["loss"],
                                   model(ids, labels=labels, images=images, attention_mask=mask)["loss"])


@pytest.mark.parametrize("method,options", [("prompt_tuning", dict(num_tokens=3)),
                                            ("p_tuning", dict(num_tokens=2, encoder_hidden=16))])
def test_virtual_tokens_go_before_the_image_and_labels_need_no_change(method, options):
    model = apply_adapter(tiny_llava(), method, **options)
    perturb_adapter(model, scale=0.3)
    ids, mask, labels, images = llava_batch()
    with torch.no_grad():
        loss = model(ids, labels=labels, images=images, attention_mask=mask)["loss"]
        # By hand: splice, prepend the prompt, run the plain model, drop the virtual positions, shift the labels.
        embeds, label_rows = model.prepare_inputs_embeds(ids, images, mask, labels, model.config.max_len)
        x = pad_sequence(embeds, batch_first=True)
        prompt = model.llm.input_prompt(x.shape[0])
        n = prompt.shape[1]
        with disable_adapter(model):
            logits = model.llm(inputs_embeds=torch.cat((prompt, x), 1))[:, n:]
        targets = pad_sequence(label_rows, batch_first=True, padding_value=IGNORE_INDEX)
        expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,options", [("prompt_tuning", dict(num_tokens=3)),
                                            ("prefix_tuning_v2", dict(num_tokens=3)),
                                            ("prefix_tuning", dict(num_tokens=2, encoder_hidden=16))])
def test_generate_batched_equals_one_by_one(method, options):
    model = apply_adapter(tiny_llama(), method, **options)
    perturb_adapter(model, scale=0.3)
    model.config.eos_id = None  # run every row to the full length
    prompts = [[1, 5, 9, 14, 3, 7], [1, 22], [1, 40, 41, 42]]
    config = GenerationConfig(max_new_tokens=6)
    batched = generate(model, prompts, config=config)
    singles = [generate(model, [p], config=config)[0] for p in prompts]
    assert batched == singles
    with disable_adapter(model):
        assert generate(model, prompts, config=config) != batched  # the adapter steers the output
