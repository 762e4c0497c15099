"""`plan`'s exact parameter counts: models built on the meta device from the published configs, against the published
totals and against counts written out from the architectures' formulas (independent of the model code)."""
import json

import pytest
import torch

from llava.model.llama import LlamaConfig
from llava.model.llava import LlavaConfig
from stages import memory

# Published Hugging Face config.json values (meta-llama/Llama-2-7b-hf, lmsys/vicuna-13b-v1.5 = LLaMA-13B shape,
# openai/clip-vit-large-patch14-336's vision_config).
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "rms_norm_eps": 1e-5,
             "max_position_embeddings": 4096}
VICUNA_13B = {**LLAMA2_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
              "num_attention_heads": 40, "num_key_value_heads": 40}
CLIP_L_336 = {"model_type": "clip", "projection_dim": 768,
              "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                "num_attention_heads": 16, "patch_size": 14, "image_size": 336,
                                "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768},
              "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                              "num_attention_heads": 12, "vocab_size": 49408, "max_position_embeddings": 77}}


def llama_formula(c: dict) -> int:
    h, f, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * f + 2 * h  # q, o; k, v; gate, up, down; two norms
    return 2 * v * h + n * per_layer + h  # embeddings + head (untied), layers, final norm


def vit_formula(v: dict, projection: int) -> int:
    """open_clip's VisionTransformer: patch conv (no bias), CLS, positions, ln_pre, blocks, ln_post, projection."""
    w, m, n = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    positions = (v["image_size"] // v["patch_size"]) ** 2 + 1
    block = 2 * 2 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * m + m) + (m * w + w)  # 2 LNs, qkv, out, fc, proj
    return 3 * w * v["patch_size"] ** 2 + w + positions * w + 2 * w + n * block + 2 * w + w * projection


def meta_counts(llm: dict, tmp_path, projector="mlp2x_gelu", adapter=None) -> memory.ParamCounts:
    clip = tmp_path / "clip"
    clip.mkdir(exist_ok=True)
    (clip / "config.json").write_text(json.dumps(CLIP_L_336))
    config = LlavaConfig(vision_tower=str(clip), llm=LlamaConfig.from_hf_config(llm), projector_type=projector)
    return memory.count_params(memory.meta_model(config, adapter=adapter))


def test_llama2_7b_and_vicuna_13b_match_published_counts(tmp_path):
    seven, thirteen = meta_counts(LLAMA2_7B, tmp_path), meta_counts(VICUNA_13B, tmp_path)
    assert seven.components["llm"] == llama_formula(LLAMA2_7B) == 6_738_415_616
    assert thirteen.components["llm"] == llama_formula(VICUNA_13B) == 13_015_864_320
    assert seven.total_trainable == seven.components["llm"] + seven.components["projector"]  # stage 2, tower frozen
    assert seven.largest_layer == 32000 * 4096  # embeddings / head: what DeepSpeed's ZeRO-3 estimate gathers


def test_clip_vit_l_336_tower_matches_its_config_and_open_clip(tmp_path):
    import open_clip

    counts = meta_counts(LLAMA2_7B, tmp_path)
    expected = vit_formula(CLIP_L_336["vision_config"], CLIP_L_336["projection_dim"])
    assert counts.components["vision"] == expected == 304_293_888
    # transformers' CLIPVisionModel (no projection) is published as 303,507,456 parameters
    assert expected - 1024 * 768 == 303_507_456
    with torch.device("meta"):
        reference = open_clip.create_model("ViT-L-14-336", pretrained=None, device="meta").visual
    assert sum(p.numel() for p in reference.parameters()) == expected
    assert counts.trainable["vision"] == 0


@pytest.mark.parametrize("llm, width", [(LLAMA2_7B, 4096), (VICUNA_13B, 5120)])
def test_mlp2x_gelu_projector(tmp_path, llm, width):
    counts = meta_counts(llm, tmp_path)
    assert counts.components["projector"] == (1024 * width + width) + (width * width + width)
    assert counts.trainable["projector"] == counts.components["projector"]


def test_lora_adapter_counts_and_freezes_the_base(tmp_path):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    counts = meta_counts(LLAMA2_7B, tmp_path, adapter={"method": "lora", "r": 128, "alpha": 256, "targets": targets})
    h, f, r = 4096, 11008, 128
    lora = 32 * r * (4 * (h + h) + 2 * (h + f) + (f + h))  # r * (in + out) per wrapped projection
    assert counts.trainable["llm"] == lora
    assert counts.components["llm"] == 6_738_415_616 + lora
    assert counts.total_trainable == lora + counts.components["projector"]


def test_stage_one_trains_only_the_projector(tmp_path):
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps(CLIP_L_336))
    config = LlavaConfig(vision_tower=str(clip), llm=LlamaConfig.from_hf_config(LLAMA2_7B), template="plain")
    counts = memory.count_params(memory.meta_model(config))
    assert counts.total_trainable == counts.components["projector"] == 20_979_712
