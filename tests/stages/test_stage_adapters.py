"""Stage 2 trains through each of the ten adapter methods when the config file names it, and the saved final directory
loads back (base + adapter) as a model whose output the training changed."""
import json
from dataclasses import asdict

import pytest
import torch
import yaml

from stage_helpers import instruct_config

# Small options that fit the micro LLM (dim 32, 2 layers, 2 heads, 1 KV head).
METHOD_OPTIONS = {
    "lora": {"r": 2, "alpha": 4},
    "adalora": {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1},
    "loftq": {"r": 2, "alpha": 4, "bits": 4},
    "oft": {"block_size": 16},
    "ia3": {},
    "krona": {},
    "prompt_tuning": {"num_tokens": 3},
    "p_tuning": {"num_tokens": 3, "encoder_hidden": 16},
    "prefix_tuning": {"num_tokens": 3, "encoder_hidden": 16},
    "prefix_tuning_v2": {"num_tokens": 3},
}


def test_the_table_covers_every_registered_method():
    from llava.adapters import METHODS

    assert set(METHOD_OPTIONS) == set(METHODS)


def _as_plain(value):
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_stage_two_trains_with_the_method_named_in_the_config_file(method, align_run, scene_data, probe_batch,
                                                                    tmp_path):
    from llava.loading import load_model
    from stages import instruct

    out = tmp_path / method
    bound = instruct_config(align_run, scene_data, out, adapter={"method": method, **METHOD_OPTIONS[method]},
                            train={"max_steps": 3, "lr": 2e-2})
    config = {k: _as_plain(v) for k, v in asdict(bound).items()}
    config["train"] = {k: v for k, v in config["train"].items() if k != "output_dir"}
    config_file = tmp_path / "instruct.yaml"
    config_file.write_text(yaml.safe_dump(config))
    assert instruct.main(["--config", str(config_file)]) == 0

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 3 and all(
        torch.isfinite(torch.tensor(m["loss"])) for m in metrics if "loss" in m)
    saved = json.loads((out / "final" / "adapter_config.json").read_text())
    assert saved["method"] == method

    loaded = load_model(out / "final")
    assert loaded.adapter == method
    base = load_model(out / "base_model")
    batch = probe_batch(loaded.model, loaded.tokenizer)
    with torch.no_grad():
        tuned = loaded.model.eval()(**batch, return_logits=True)["logits"]
        original = base.model.eval()(**batch, return_logits=True)["logits"]
    assert tuned.shape[-1] == original.shape[-1]
    # prompt methods add virtual positions; compare the text positions at the end of each sequence
    assert not torch.allclose(tuned[:, -8:], original[:, -8:], atol=1e-4)
