"""The demo foundation stage: tokenizer, CLIP and LLaMA come out loadable by their own libraries."""
import json
from pathlib import Path

import torch

from stage_helpers import losses


def test_tokenizer_is_trained_on_the_scene_text_and_shipped_with_the_llm(base_run):
    from llava.tokenizer import Tokenizer

    tokenizer = Tokenizer(base_run.outputs["tokenizer"])
    assert 256 < tokenizer.vocab_size <= 400
    text = "USER: What color is the small triangle? ASSISTANT: red"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode("triangle")) == 1  # a scene word is one piece, not bytes
    copied = Path(base_run.outputs["llm"]) / "tokenizer.model"
    assert copied.read_bytes() == Path(base_run.outputs["tokenizer"]).read_bytes()


def test_clip_loads_through_open_clip_and_as_the_llava_vision_tower(base_run):
    import open_clip
    from safetensors.torch import load_file

    from stages.common import ModelSpec, build_model, llava_config

    clip_dir = base_run.outputs["vision_tower"]
    saved = load_file(str(Path(clip_dir) / "open_clip_model.safetensors"))
    reference = open_clip.create_model(f"local-dir:{clip_dir}")  # open_clip's own reader of the layout
    assert all(torch.equal(saved[k], v) for k, v in reference.state_dict().items())
    assert saved["logit_scale"].shape == ()
    config = json.loads((Path(clip_dir) / "open_clip_config.json").read_text())["model_cfg"]
    assert config["vision_cfg"]["image_size"] == 32 and config["text_cfg"]["pool_type"] == "eos"
    fresh = open_clip.CLIP(**config)  # same architecture, untrained: the saved weights must differ from an init
    assert not torch.equal(fresh.visual.conv1.weight, reference.visual.conv1.weight)

    as_dir = ModelSpec(llm=base_run.outputs["llm"], vision_tower=clip_dir, projector_type="linear")
    as_files = ModelSpec(llm=base_run.outputs["llm"], vision_tower=f"{clip_dir}/open_clip_config.json",
                         vision_weights=f"{clip_dir}/open_clip_model.safetensors", projector_type="linear")
    for spec in (as_dir, as_files):
        model, _ = build_model(*llava_config(spec, template="plain", max_len=64), torch.float32)
        assert all(torch.equal(saved[f"visual.{k}"], v) for k, v in model.vision.visual.state_dict().items())
        assert model.num_image_tokens == 16  # 32 px / patch 8


def test_llm_is_a_hugging_face_llama_that_transformers_loads(base_run):
    from transformers import LlamaForCausalLM

    from llava.model.llama import Llama
    from llava.tokenizer import Tokenizer

    ours = Llama.from_hf(base_run.outputs["llm"])
    theirs = LlamaForCausalLM.from_pretrained(base_run.outputs["llm"]).eval()
    assert ours.config.vocab_size == Tokenizer(base_run.outputs["tokenizer"]).vocab_size
    ids = torch.tensor([Tokenizer(base_run.outputs["tokenizer"]).encode("There is a red circle.", bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_both_trainings_ran_on_the_trainer_and_the_lm_learned(base_run):
    lm = losses(base_run.out / "lm_train")
    assert len(lm) == 12 and lm[-1] < lm[0] - 1.0  # from ~ln(vocab) down
    assert len(losses(base_run.out / "clip_train")) == 3
    for sub in ("clip_train", "lm_train"):
        assert list((base_run.out / sub / "checkpoints").glob("step_*/complete.json"))
    assert (base_run.out / "config.yaml").is_file()
