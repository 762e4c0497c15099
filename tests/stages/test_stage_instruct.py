"""Stage 2: full tuning and adapter tuning; what trains, what is saved, and that the saved model is the trained one."""
import json

import pytest
import torch

from stage_helpers import instruct_config
from stage_helpers import changed, snapshot


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch, return_logits=True)["logits"]


@pytest.fixture(scope="module")
def full_run(align_run, scene_data, tmp_path_factory):
    from stages import instruct

    cfg = instruct_config(align_run, scene_data, tmp_path_factory.mktemp("instruct_full"),
                          eval={"question_file": str(scene_data.questions), "image_folder": str(scene_data.images)},
                          train={"eval_every": 2})
    model, tokenizer = instruct.build(cfg)
    before = snapshot(model)
    outputs = instruct.train(cfg, model, tokenizer)
    return model, tokenizer, before, outputs, cfg


def test_full_tuning_trains_llm_and_projector_and_never_the_frozen_tower(full_run, align_run):
    model, _, before, _, _ = full_run
    assert changed(before, model, "vision.") == []
    assert len(changed(before, model, "llm.")) > 0.9 * len([n for n in before if n.startswith("llm.")])
    assert changed(before, model, "projector.")
    # it started from stage 1's projector, not a fresh one
    for name, tensor in before.items():
        if name.startswith("projector."):
            assert torch.equal(tensor, dict(align_run.model.named_parameters())[name].detach())


def test_full_final_reloads_with_the_same_logits(full_run, probe_batch):
    from llava.model.llava import LlavaModel

    model, tokenizer, _, outputs, _ = full_run
    reloaded = LlavaModel.load(outputs["model"])
    assert reloaded.config.template == "vicuna_v1" and reloaded.load_tokenizer().vocab_size == tokenizer.vocab_size
    batch = probe_batch(model, tokenizer)
    assert batch["images"].shape[0] == 1 and batch["input_ids"].shape[0] == 2  # one image sample, one text-only
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch), atol=1e-5, rtol=1e-5)


def test_periodic_question_file_eval_is_logged_with_the_training_metrics(full_run):
    _, _, _, _, cfg = full_run
    records = [json.loads(line) for line in open(f"{cfg.output_dir}/metrics.jsonl")]
    evaluated = [r["step"] for r in records if "eval/accuracy" in r]
    assert evaluated == [2, 4]
    assert all(0.0 <= r["eval/accuracy"] <= 1.0 and "loss" in r for r in records if "eval/accuracy" in r)


def test_lora_saves_only_adapter_and_projector_and_reloads_with_the_same_logits(align_run, scene_data, probe_batch,
                                                                                tmp_path):
    from safetensors.torch import load_file

    from llava.model.llama import Llama
    from llava.loading import load_model
    from stages import instruct

    calls = []
    cfg = instruct_config(align_run, scene_data, tmp_path / "lora", adapter={"method": "lora", "r": 4, "alpha": 8},
                          train={"projector_lr": 1e-3, "eval_every": 3})
    model, tokenizer = instruct.build(cfg)
    before = snapshot(model)
    outputs = instruct.train(cfg, model, tokenizer, eval_fn=lambda m, step: calls.append(step) or {"probe": 1.0})
    assert calls == [3, 4]  # every eval_every steps and after the last one

    assert changed(before, model, "vision.") == []
    frozen_llm = [n for n in before if n.startswith("llm.") and "lora_" not in n]
    assert changed(before, model, "llm.") and not [n for n in changed(before, model, "llm.") if n in frozen_llm]
    final = tmp_path / "lora" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "training_config.yaml"]
    saved = load_file(str(final / "adapter_model.safetensors"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable
    assert {n.split(".")[0] for n in saved} == {"llm", "projector"} and all(
        "lora_" in n for n in saved if n.startswith("llm."))
    assert all(t.numel() > 0 for t in saved.values())

    # the base it names is the untouched starting model
    base_llm = Llama.from_hf(outputs["base_model"] + "/llm")
    original = Llama.from_hf(align_run.cfg.model.llm)
    assert all(torch.equal(a, b) for a, b in zip(base_llm.state_dict().values(), original.state_dict().values()))

    loaded = load_model(final)  # base + adapter, no options repeated
    assert loaded.adapter == "lora" and loaded.template == "vicuna_v1"
    batch = probe_batch(model, tokenizer)
    torch.testing.assert_close(_logits(loaded.model, batch), _logits(model, batch), atol=1e-5, rtol=1e-5)


def test_adalora_hooks_run_inside_training(align_run, scene_data, tmp_path):
    from stages.config import ConfigError
    from stages import instruct

    adalora = {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1}
    zero2 = instruct_config(align_run, scene_data, tmp_path / "zero2", adapter=adalora, train={"zero_stage": 2})
    with pytest.raises(ConfigError, match="adalora needs train.zero_stage=0"):
        instruct.build(zero2)  # refused before any work, not after the first step

    cfg = instruct_config(align_run, scene_data, tmp_path / "adalora",
                          adapter=adalora,
                          train={"max_steps": 3})
    model, tokenizer = instruct.build(cfg)
    instruct.train(cfg, model, tokenizer)
    records = [json.loads(line) for line in (tmp_path / "adalora" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["extra_loss"] > 0 for r in records)  # the orthogonality regulariser was added
    config = json.loads((tmp_path / "adalora" / "final" / "adapter_config.json").read_text())
    assert config["method"] == "adalora" and config["base_model"] == "../base_model"
    # after_optimizer_step ran with gradients: the budget fell to target_r per module and the pattern was fixed
    pattern = config["state"]["rank_pattern"]
    assert sum(sum(kept) for kept in pattern.values()) == 2 * len(pattern)
