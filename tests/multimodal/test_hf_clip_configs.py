"""HF CLIP directories of many shapes: each config transformers instantiates either loads with transformers' features
on every selected layer (and its image embedding through the projection), or is refused naming the field.

The oracle is transformers itself: each directory is built and saved by its CLIP classes, never by our converter."""
import random

import pytest
import torch

from llava.model.vision import _HF_CLIP_DEFAULTS, VisionTowerError, build_vision_tower, exact_mlp_ratio

transformers = pytest.importorskip("transformers")

# Widths and MLP sizes where intermediate_size / hidden_size, multiplied back, lands one unit short (28 * (61 / 28)
# = 60.999...), so a plain ratio would build a smaller MLP than the checkpoint's.
CONFIGS = {
    "vision-gelu_new-odd-grid": dict(kind="vision", hidden_size=28, num_attention_heads=4, intermediate_size=61,
                                     num_hidden_layers=3, image_size=30, patch_size=6, hidden_act="gelu_new",
                                     layer_norm_eps=1e-6),
    "clip-top-level-projection": dict(kind="clip", hidden_size=44, num_attention_heads=11, intermediate_size=109,
                                      num_hidden_layers=2, image_size=24, patch_size=8, hidden_act="quick_gelu",
                                      layer_norm_eps=1e-5, top_projection_dim=20),
    "with-projection-remainder-pixels": dict(kind="with_projection", hidden_size=52, num_attention_heads=2,
                                             intermediate_size=113, num_hidden_layers=4, image_size=34, patch_size=8,
                                             hidden_act="gelu", layer_norm_eps=1e-3, projection_dim=36),
    "clip-one-patch-conflicting-projection": dict(kind="clip", hidden_size=76, num_attention_heads=4,
                                                  intermediate_size=155, num_hidden_layers=1, image_size=16,
                                                  patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                                                  projection_dim=100, top_projection_dim=8),
    "vision-ratio-one-tiny-eps": dict(kind="vision", hidden_size=32, num_attention_heads=8, intermediate_size=32,
                                      num_hidden_layers=2, image_size=28, patch_size=14, hidden_act="quick_gelu",
                                      layer_norm_eps=1e-12),
}

GELU_SPELLINGS = ["quick_gelu", "gelu", "gelu_python", "gelu_new", "gelu_fast", "gelu_accurate", "gelu_pytorch_tanh",
                  "gelu_python_tanh"]


def random_configs(n: int, seed: int = 11) -> dict[str, dict]:
    """Seeded random shapes on every axis, beside the hand-picked ones above."""
    rng = random.Random(seed)
    configs = {}
    for i in range(n):
        heads, patch = rng.randint(1, 6), rng.randint(2, 8)
        width = heads * rng.choice([2, 4, 6, 8])
        kind = rng.choice(["vision", "with_projection", "clip"])
        config = dict(kind=kind, hidden_size=width, num_attention_heads=heads,
                      intermediate_size=rng.randint(1, 5 * width), num_hidden_layers=rng.randint(1, 3),
                      image_size=patch * rng.randint(1, 4) + rng.randint(0, patch - 1), patch_size=patch,
                      hidden_act=rng.choice(GELU_SPELLINGS), layer_norm_eps=rng.choice([1e-5, 1e-6, 1e-12]),
                      projection_dim=rng.randint(1, 40))
        if kind == "clip":
            config["top_projection_dim"] = rng.randint(1, 40)
        configs[f"random-{i}-{kind}"] = config
    return configs


CONFIGS.update(random_configs(6))


def save_hf_clip(path, kind="vision", top_projection_dim=None, seed=0, **vision):
    """Build a random transformers CLIP model (`vision`: CLIPVisionModel, `with_projection`:
    CLIPVisionModelWithProjection, `clip`: CLIPModel), save it to `path`, return it in eval mode."""
    from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel,
                              CLIPVisionModelWithProjection)

    torch.manual_seed(seed)
    vision_config = CLIPVisionConfig(**vision)
    if kind == "clip":
        text = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, vocab_size=40,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)
        top = {} if top_projection_dim is None else {"projection_dim": top_projection_dim}
        model = CLIPModel(CLIPConfig(vision_config=vision_config.to_dict(), text_config=text, **top))
    else:
        model = (CLIPVisionModel if kind == "vision" else CLIPVisionModelWithProjection)(vision_config)
    with torch.no_grad():  # non-trivial norms and biases, so a swapped, missing or mis-sized one shows
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    return model.eval()


def hf_features(model, kind, images):
    """(hidden_states, image embedding after the projection) from the transformers model."""
    with torch.no_grad():
        if kind == "clip":
            hidden = model.vision_model(images, output_hidden_states=True).hidden_states
            return hidden, model.get_image_features(pixel_values=images).pooler_output
        out = model(images, output_hidden_states=True)
        return out.hidden_states, getattr(out, "image_embeds", None)


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_clip_config_loads_with_transformers_features(tmp_path, name):
    config = dict(CONFIGS[name])
    kind = config["kind"]
    model = save_hf_clip(tmp_path, **config)
    size = config["image_size"]
    images = torch.randn(2, 3, size, size)
    hidden_states, embedding = hf_features(model, kind, images)
    layers = config["num_hidden_layers"]
    for select_layer in sorted({0, 1, layers - 1, -2, -1} & set(range(-layers - 1, layers + 1))):
        for feature in ("patch", "cls_patch"):
            tower = build_vision_tower(tmp_path, select_layer=select_layer, select_feature=feature)
            expected = hidden_states[select_layer]
            torch.testing.assert_close(tower(images), expected[:, 1:] if feature == "patch" else expected,
                                       atol=2e-5, rtol=1e-5)
    assert tower.visual.transformer.resblocks[0].mlp.c_fc.out_features == config["intermediate_size"]
    assert tower.num_patches == (size // config["patch_size"]) ** 2
    if embedding is not None:  # the projection: top-level projection_dim for a CLIPModel, as transformers sizes it
        assert tower.visual.proj.shape == (config["hidden_size"], embedding.shape[-1])
        assert embedding.shape[-1] == config.get("top_projection_dim", config.get("projection_dim"))
        with torch.no_grad():
            torch.testing.assert_close(tower.visual(images), embedding, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("act", GELU_SPELLINGS)
def test_every_gelu_spelling_gives_transformers_features(tmp_path, act):
    model = save_hf_clip(tmp_path, hidden_size=16, num_attention_heads=2, intermediate_size=40, num_hidden_layers=2,
                         image_size=16, patch_size=8, hidden_act=act, seed=3)
    images = torch.randn(2, 3, 16, 16) * 2
    hidden_states, _ = hf_features(model, "vision", images)
    tower = build_vision_tower(tmp_path, select_layer=-1, select_feature="cls_patch")
    torch.testing.assert_close(tower(images), hidden_states[-1], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,vision,message", [
    ("vision", dict(hidden_act="relu"), r"hidden_act='relu' is not supported"),
    ("vision", dict(hidden_act="gelu_10"), r"hidden_act='gelu_10' is not supported"),
    ("clip", dict(hidden_act="silu"), r"vision_config\.hidden_act='silu' is not supported"),
    ("vision", dict(num_channels=1), r"num_channels=1 is not supported: the tower takes RGB images"),
])
def test_hf_clip_config_without_an_open_clip_equivalent_is_refused_by_field(tmp_path, kind, vision, message):
    save_hf_clip(tmp_path, kind, **{**dict(hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                           num_hidden_layers=1, image_size=16, patch_size=8), **vision})
    with pytest.raises(VisionTowerError, match=message):
        build_vision_tower(tmp_path)


def test_defaults_for_missing_fields_are_transformers_defaults():
    defaults = transformers.CLIPVisionConfig().to_dict()
    assert _HF_CLIP_DEFAULTS == {key: defaults[key] for key in _HF_CLIP_DEFAULTS}
    assert transformers.CLIPConfig().projection_dim == 512  # the top-level default hf_clip_arch falls back to


def test_exact_mlp_ratio_rebuilds_every_width():
    rng = random.Random(0)
    pairs = [(width, size) for width in range(1, 160) for size in range(1, 6 * width)]
    pairs += [(1152, 4304), (1280, 5120)] + [(w, rng.randint(w, 8 * w)) for w in rng.sample(range(160, 8192), 2000)]
    assert all(int(width * exact_mlp_ratio(size, width)) == size for width, size in pairs)
    assert exact_mlp_ratio(3072, 768) == 4.0  # plain ratios stay plain


def test_half_precision_checkpoint_loads_as_transformers_reads_it_in_float32(tmp_path):
    model = save_hf_clip(tmp_path / "fp32", kind="clip", hidden_size=24, num_attention_heads=3, intermediate_size=50,
                         num_hidden_layers=2, image_size=20, patch_size=5, hidden_act="gelu", top_projection_dim=10)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    reference = transformers.CLIPModel.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    images = torch.randn(2, 3, 20, 20)
    hidden_states, embedding = hf_features(reference, "clip", images)
    tower = build_vision_tower(tmp_path / "bf16", select_layer=-2, select_feature="cls_patch")
    assert tower.visual.conv1.weight.dtype == torch.float32
    torch.testing.assert_close(tower(images), hidden_states[-2], atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(tower.visual(images), embedding, atol=2e-5, rtol=1e-5)
