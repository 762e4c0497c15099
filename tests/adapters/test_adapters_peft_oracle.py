"""Oracle checks against peft on the same weights: a tiny transformers LlamaForCausalLM is loaded into ours with
`from_hf`, both sides get the adapter, our (perturbed) adapter weights are copied into peft's, and logits must agree."""
from __future__ import annotations

import pytest
import torch

from adapter_cases import perturb_adapter
from llava.adapters import apply_adapter, export_peft
from llava.adapters.base import PROJECTIONS
from llava.model import Llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 256


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(path)
    return path


def hf_model(path):
    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


def ours(path, method, **options):
    model = Llama.from_hf(path).eval()
    apply_adapter(model, method, **options)
    perturb_adapter(model, scale=0.1)
    return model


def ids(batch=2, length=7):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(5))


def peft_module(peft_model, name):
    return peft_model.base_model.model.get_submodule(f"model.{name}")


def adapted_modules(model, attr):
    return [(name, m) for name, m in model.named_modules() if hasattr(m, attr) and not name.endswith(attr)]


def assert_same_logits(our_model, peft_model, x=None, drop=0):
    x = ids() if x is None else x
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits[:, drop:]
        torch.testing.assert_close(our_model(x), expected, rtol=1e-4, atol=1e-5)


def test_base_model_matches_transformers(hf_dir):
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(Llama.from_hf(hf_dir).eval()(x), hf_model(hf_dir)(input_ids=x).logits,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_peft(hf_dir, rslora):
    model = ours(hf_dir, "lora", r=4, alpha=8, rslora=rslora)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(PROJECTIONS), use_rslora=rslora,
                             task_type="CAUSAL_LM")
    reference = peft.get_peft_model(hf_model(hf_dir), config).eval()
    for name, m in adapted_modules(model, "lora_A"):
        target = peft_module(reference, name)
        target.lora_A["default"].weight.data.copy_(m.lora_A)
        target.lora_B["default"].weight.data.copy_(m.lora_B)
    assert_same_logits(model, reference)


def test_export_peft_loads_in_peft_on_the_base_we_save(hf_dir, tmp_path):
    base = Llama.from_hf(hf_dir).eval()
    base.save_hf(tmp_path / "base")  # the base model as our pipeline writes it
    model = apply_adapter(base, "lora", r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj", "lm_head"],
                          layers=[1])
    perturb_adapter(model, scale=0.1)
    export_peft(model, tmp_path / "adapter")
    reference = peft.PeftModel.from_pretrained(hf_model(tmp_path / "base"), tmp_path / "adapter").eval()
    assert_same_logits(model, reference)
    with torch.no_grad():  # and the adapter really is in play
        assert (hf_model(tmp_path / "base")(input_ids=ids()).logits - model(ids())).abs().max() > 1e-3


def test_adalora_forward_matches_peft(hf_dir):
    model = ours(hf_dir, "adalora", init_r=6, target_r=3, alpha=8)
    config = peft.AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, target_modules=list(PROJECTIONS), total_step=10,
                                task_type="CAUSAL_LM")
    reference = peft.get_peft_model(hf_model(hf_dir), config).eval()
    for name, m in adapted_modules(model, "lora_E"):
        target = peft_module(reference, name)
        target.lora_A["default"].data.copy_(m.lora_A)
        target.lora_E["default"].data.copy_(m.lora_E[:, None])
        target.lora_B["default"].data.copy_(m.lora_B)
    assert_same_logits(model, reference)


@pytest.mark.parametrize("cayley,coft", [("neumann", False), ("exact", False), ("neumann", True)])
def test_oft_matches_peft(hf_dir, cayley, coft):
    model = ours(hf_dir, "oft", block_size=16, cayley=cayley, coft=coft, eps=0.5)
    config = peft.OFTConfig(r=0, oft_block_size=16, target_modules=list(PROJECTIONS), coft=coft, eps=0.5,
                            use_cayley_neumann=cayley == "neumann", task_type="CAUSAL_LM")
    reference = peft.get_peft_model(hf_model(hf_dir), config).eval()
    # peft's exact path computes (I - S)(I + S)^-1, the transpose of ours: the same rotation with S negated.
    sign = -1 if cayley == "exact" else 1
    for name, m in adapted_modules(model, "oft_S"):
        peft_module(reference, name).oft_R["default"].weight.data.copy_(sign * m.oft_S)
    assert_same_logits(model, reference)


def test_ia3_matches_peft(hf_dir):
    model = ours(hf_dir, "ia3")
    config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                            task_type="CAUSAL_LM")
    reference = peft.get_peft_model(hf_model(hf_dir), config).eval()
    for name, m in adapted_modules(model, "ia3_l"):
        target = peft_module(reference, name).ia3_l["default"]
        target.data.copy_(m.ia3_l.view_as(target))
    assert_same_logits(model, reference)


def test_krona_matches_peft_lokr_kron_product(hf_dir):
    model = ours(hf_dir, "krona", scale=1.0)
    # r large enough that LoKr keeps both factors full (no low-rank split); scaling alpha / r = 1.
    config = peft.LoKrConfig(r=64, alpha=64, target_modules=list(PROJECTIONS), task_type="CAUSAL_LM")
    reference = peft.get_peft_model(hf_model(hf_dir), config).eval()
    for name, m in adapted_modules(model, "krona_A"):
        target = peft_module(reference, name)
        assert target.lokr_w1["default"].shape == m.krona_A.shape, name
        target.lokr_w1["default"].data.copy_(m.krona_A)
        target.lokr_w2["default"].data.copy_(m.krona_B)
    assert_same_logits(model, reference)


def test_prompt_tuning_matches_peft(hf_dir):
    model = ours(hf_dir, "prompt_tuning", num_tokens=5)
    config = peft.PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM")
    reference = peft.get_peft_model(hf_model(hf_dir), config).eval()
    reference.prompt_encoder["default"].embedding.weight.data.copy_(model.input_prompt.embeddings)
    assert_same_logits(model, reference, drop=5)  # peft returns the virtual positions' logits too


def test_prefix_tuning_v2_matches_peft(hf_dir):
    model = ours(hf_dir, "prefix_tuning_v2", num_tokens=3)
    config = peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    reference = peft.get_peft_model(hf_model(hf_dir), config).eval()
    # peft: one row per virtual token, laid out (layer, key/value, kv head, head_dim)
    prefixes = torch.stack([layer.self_attn.kv_prefix.prefix for layer in model.layers])  # [L, 2, kvh, n, hd]
    flat = prefixes.permute(3, 0, 1, 2, 4).reshape(3, -1)
    reference.prompt_encoder["default"].embedding.weight.data.copy_(flat)
    assert_same_logits(model, reference)
