"""Bad requests fail early with a message that names the valid choices."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from adapter_cases import TINY, tiny_llama
from llava.adapters import (METHODS, AdapterError, apply_adapter, export_peft, fold_adapter, load_adapter,
                            merge_adapter, save_adapter, trainable_parameters)
from llava.model import Llama


@pytest.mark.parametrize("method,options,message", [
    ("lroa", {}, "unknown adapter method 'lroa' \\(did you mean 'lora'\\?\\); valid methods:\n  adalora: "),
    ("lora", {"rank": 4}, "has no option 'rank'.*valid options: r, alpha"),
    ("lora", {"r": "8"}, "option 'r': expected int"),
    ("lora", {"r": 0}, "r=0 must be > 0"),
    ("lora", {"targets": ["qproj"]}, "unknown target 'qproj' \\(did you mean 'q_proj'\\?\\); valid targets: q_proj"),
    ("lora", {"layers": [5]}, "layers \\[5\\] out of range: the model has layers 0..1"),
    ("oft", {"cayley": "taylor"}, "cayley='taylor' must be 'exact' or 'neumann'"),
    ("krona", {"variant": "ffn", "targets": ["q_proj"]}, "targets apply to variant 'linear' only"),
    ("ia3", {"feedforward": ["up_proj"]}, "feedforward \\['up_proj'\\] must also be in targets"),
    ("prompt_tuning", {"init": "text"}, "init='text' needs init_text"),
    ("prompt_tuning", {"init": "text", "init_text": "hello"}, "a text needs a tokenizer"),
    ("prompt_tuning", {"init": "text", "init_token_ids": [9999]}, "outside the vocabulary"),
    ("p_tuning", {"template_ids": [5, 6]}, "has no \\[P\\] slot"),
    ("p_tuning", {"num_tokens": 3, "template_ids": [-1, 5, -1]}, "num_tokens=3 but the template has 2"),
])
def test_bad_requests(method, options, message):
    with pytest.raises(AdapterError, match=message):
        apply_adapter(tiny_llama(), method, **options)


def test_every_method_is_registered():
    assert set(METHODS) == {"lora", "adalora", "loftq", "oft", "ia3", "krona", "prompt_tuning", "p_tuning",
                            "prefix_tuning", "prefix_tuning_v2"}


def test_model_errors(tmp_path):
    with pytest.raises(AdapterError, match="exactly one llava.model.Llama"):
        apply_adapter(torch.nn.Linear(2, 2), "lora")
    tied = Llama(dataclasses.replace(TINY, tie_embeddings=True))
    with pytest.raises(AdapterError, match="lm_head shares its weight with embed_tokens"):
        apply_adapter(tied, "lora", targets=["q_proj", "lm_head"])
    with pytest.raises(AdapterError, match="has no module 'projector'"):
        apply_adapter(tiny_llama(), "lora", extra_trainable=("projector",))
    model = apply_adapter(tiny_llama(), "lora", r=2)
    with pytest.raises(AdapterError, match="already has a 'lora' adapter"):
        apply_adapter(model, "ia3")
    with pytest.raises(AdapterError, match="has no adapter"):
        trainable_parameters(tiny_llama())
    with pytest.raises(AdapterError, match="nothing to fold"):
        fold_adapter(model)
    with pytest.raises(AdapterError, match="cannot merge a prompt_tuning adapter"):
        merge_adapter(apply_adapter(tiny_llama(), "prompt_tuning", num_tokens=2))
    with pytest.raises(AdapterError, match="export_peft writes LoRA adapters"):
        export_peft(apply_adapter(tiny_llama(), "ia3"), tmp_path)
    merge_adapter(model)
    with pytest.raises(AdapterError, match="unmerge_adapter before export_peft"):
        export_peft(model, tmp_path / "merged")


def test_load_errors(tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json: not found"):
        load_adapter(tiny_llama(), tmp_path)
    save_adapter(apply_adapter(tiny_llama(), "lora", r=2), tmp_path / "r2")
    with pytest.raises(AdapterError, match="does not match the model's lora"):
        load_adapter(apply_adapter(tiny_llama(), "lora", r=4), tmp_path / "r2")
    export_peft(apply_adapter(tiny_llama(), "lora", r=2), tmp_path / "peft")
    with pytest.raises(AdapterError, match="it is a peft adapter"):
        load_adapter(tiny_llama(), tmp_path / "peft")
