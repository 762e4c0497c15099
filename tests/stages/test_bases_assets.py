"""The shipped tiny bases (assets/tiny-bases/, built by `make bases`): every file is the one the manifest names, the
CLIP loads through open_clip and as the LLaVA vision tower, and the LLaMA is a Hugging Face checkpoint that
transformers loads with the same logits as ours (the loading path a real Vicuna-7B run takes)."""
import json
from pathlib import Path

import pytest
import torch

BASES = Path(__file__).resolve().parents[2] / "assets" / "tiny-bases"


@pytest.fixture(scope="module")
def manifest():
    from stages.base import check_manifest

    return check_manifest(BASES)


def test_every_shipped_file_matches_its_manifest_and_nothing_is_a_pickle(manifest):
    shipped = sorted(str(p.relative_to(BASES)) for p in BASES.rglob("*") if p.is_file())
    assert shipped == sorted([*manifest["files"], "manifest.json"])
    assert not [p for p in shipped if p.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert sum((BASES / p).stat().st_size for p in shipped) <= 30 * 2**20
    assert manifest["command"].startswith("make bases") and manifest["config"]["seed"] == manifest["seed"]
    assert {"probe", "probe_color", "probe_shape"} <= set(manifest["text_probe"])  # numbers in docs/demo.md


def test_the_llama_loads_in_transformers_with_our_logits(manifest):
    from transformers import LlamaForCausalLM

    from llava.conversation import get_template
    from llava.model.llama import Llama
    from llava.tokenizer import Tokenizer

    tokenizer = Tokenizer(BASES / "llama")
    ours = Llama.from_hf(BASES / "llama").eval()
    theirs = LlamaForCausalLM.from_pretrained(BASES / "llama").eval()
    assert ours.config.vocab_size == tokenizer.vocab_size
    text = get_template("vicuna_v1").render([{"from": "human", "value": "Objects: small red circle on the left side."
                                              "\nWhat color is the circle?"}], add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(text, bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_the_clip_loads_through_open_clip_and_as_the_llava_tower(manifest):
    import open_clip
    from safetensors.torch import load_file

    from stages.common import ModelSpec, build_model, llava_config

    saved = load_file(str(BASES / "clip" / "open_clip_model.safetensors"))
    reference = open_clip.create_model(f"local-dir:{BASES / 'clip'}")
    assert all(torch.equal(saved[k], v) for k, v in reference.state_dict().items())
    spec = ModelSpec(llm=str(BASES / "llama"), vision_tower=str(BASES / "clip"))
    model, _ = build_model(*llava_config(spec, template="plain", max_len=64), torch.float32)
    assert all(torch.equal(saved[f"visual.{k}"], v) for k, v in model.vision.visual.state_dict().items())
    config = json.loads((BASES / "clip" / "open_clip_config.json").read_text())["model_cfg"]
    assert model.num_image_tokens == (config["vision_cfg"]["image_size"] // config["vision_cfg"]["patch_size"]) ** 2


def test_the_shipped_bases_are_the_ones_the_recipe_in_configs_builds(manifest):
    """Every value configs/tiny-bases.yaml sets in its base section is the one the manifest's config records: a recipe
    changed without a `make bases` run fails here."""
    import yaml

    recipe = yaml.safe_load((BASES.parents[1] / "configs" / "tiny-bases.yaml").read_text())["base"]

    def leaves(section, path=()):
        for key, value in section.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, (*path, key))
            else:
                yield (*path, key), value

    for path, value in leaves(recipe):
        built = manifest["config"]
        for key in path:
            assert key in built, f"configs/tiny-bases.yaml sets base.{'.'.join(path)}; the shipped bases lack it"
            built = built[key]
        assert built == value, f"base.{'.'.join(path)}: the recipe says {value!r}, the shipped bases {built!r}"
