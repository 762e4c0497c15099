"""Configuration faults: a typo'd key is an error naming the key and the nearest valid one (never ignored), an unknown
template / projector / adapter / option name is an error listing the valid names. One table, every row a call that must
raise the named error with a message matching the pattern."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

import pytest

from faults_lib import cases
from stages.config import bind, load_config


@dataclass(frozen=True)
class ConfigFault:
    name: str
    call: Callable[[object], object]  # gets tmp_path
    error: str  # exception class name (any class in the MRO matches)
    message: str  # regex


def _train(**section):
    from stages.trainer import TrainConfig

    return bind(TrainConfig, {"output_dir": "x", **section}, "instruct.train")


def _deepspeed_conflict(tmp_path):
    from stages.trainer import TrainConfig, deepspeed_config

    path = tmp_path / "zero2.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    return deepspeed_config(TrainConfig(output_dir="x", micro_batch_size=4, deepspeed_config=str(path)), 1)


def _run_config(tmp_path, text: str):
    from pipeline.runner import RunConfig, validate_sections

    path = tmp_path / "run.yaml"
    path.write_text(text)
    config = bind(RunConfig, load_config(path), str(path))
    validate_sections(config, str(path))


def _adapter(method: str, **options):
    from llava.adapters import apply_adapter
    from llava.model import Llama

    return apply_adapter(Llama.from_name("tiny"), method, **options)


def _llava_config(key: str):
    from llava.model.llava import LlavaConfig

    return LlavaConfig.from_dict({key: "mlp2x_gelu"}, where="model/llava_config.json")


def _hf_config_missing_key(tmp_path):
    from llava.model.llama import LlamaConfig

    hf = LlamaConfig.from_name("tiny").to_hf_config()
    del hf["num_attention_heads"]
    return LlamaConfig.from_hf_config(hf, where="llm/config.json")


CONFIG_FAULTS = [
    ConfigFault("typo'd train key", lambda t: _train(micro_batchsize=2), "ConfigError",
                r"instruct\.train: unknown key 'micro_batchsize' \(did you mean 'micro_batch_size'\?\)"),
    ConfigFault("wrong value type", lambda t: _train(lr="fast"), "ConfigError",
                r"instruct\.train\.lr: expected (float|a number), got .*'fast'"),
    ConfigFault("unknown precision", lambda t: _train(precision="fp8").check(), "ConfigError",
                r"precision 'fp8' is not one of bf16, fp16, fp32"),
    ConfigFault("DeepSpeed JSON disagrees with the train config", _deepspeed_conflict, "ConfigError",
                r"zero2\.json: train_micro_batch_size_per_gpu is 8 but the train config gives 4 \(micro_batch_size\)"),
    ConfigFault("typo'd top-level run key", lambda t: _run_config(t, "out_dir: x\ninstrcut: {}\n"), "ConfigError",
                r"run\.yaml: unknown key 'instrcut' \(did you mean 'instruct'\?\)"),
    ConfigFault("typo'd key in a run section", lambda t: _run_config(t, "scenes:\n  nmu: 5\n"), "ConfigError",
                r"run\.yaml: scenes: unknown key 'nmu' \(did you mean 'num'\?\)"),
    ConfigFault("config file is not YAML", lambda t: _run_config(t, "scenes: [unclosed\n"), "ConfigError",
                r"run\.yaml: not valid YAML"),
    ConfigFault("override without =", lambda t: load_config(None, ["instruct.lr"]), "ConfigError",
                r"override 'instruct\.lr' is not of the form key=value"),
    ConfigFault("unknown template", lambda t: __import__("llava.conversation").conversation.get_template("vicuna"),
                "KeyError", r"unknown conversation template 'vicuna'; valid templates: plain, vicuna_v1, llava_v1"),
    ConfigFault("unknown projector", lambda t: __import__("llava.model.projector").model.projector.build_projector(
        "mlp2x_relu", 8, 8), "ValueError", r"unknown projector type 'mlp2x_relu'; valid: linear, mlp\{N\}x_gelu"),
    ConfigFault("unknown adapter method", lambda t: _adapter("lorra"), "AdapterError",
                r"unknown adapter method 'lorra'.*lora.*valid methods:\s+(.|\n)*\blora:"),
    ConfigFault("typo'd adapter option", lambda t: _adapter("lora", rnak=4), "AdapterError",
                r"adapter 'lora' has no option 'rnak'.*r\b"),
    ConfigFault("typo'd key in a saved model config", lambda t: _llava_config("projecter_type"), "ValueError",
                r"llava_config\.json: unknown key 'projecter_type' \(did you mean 'projector_type'\?\)"),
    ConfigFault("typo'd vision tower key", lambda t: __import__("llava.model.vision").model.vision.arch_from_dict(
        {"image_size": 32, "patch_sise": 8}), "VisionTowerError", r"unknown key 'patch_sise' \(did you mean 'patch_size'\?\)"),
    ConfigFault("unknown open_clip model", lambda t: __import__("llava.model.vision").model.vision.open_clip_arch(
        "ViT-L-14-337"), "VisionTowerError", r"unknown open_clip model 'ViT-L-14-337' \(did you mean .*ViT-L-14-336"),
    ConfigFault("HF config missing a key", _hf_config_missing_key, "CheckpointError",
                r"llm/config\.json: missing required key 'num_attention_heads'"),
    ConfigFault("typo'd OpenAI option", lambda t: bind(__import__("data_gen.openai_backend").openai_backend.OpenAIConfig,
                                                        {"temprature": 0.2}, "generate.openai"), "ConfigError",
                r"generate\.openai: unknown key 'temprature' \(did you mean 'temperature'\?\)"),
]


@pytest.mark.parametrize("fault", cases(CONFIG_FAULTS))
def test_config_fault_is_a_named_error(tmp_path, fault):
    with pytest.raises(Exception) as info:
        fault.call(tmp_path)
    names = [cls.__name__ for cls in type(info.value).__mro__]
    assert fault.error in names, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value.args[0]) if isinstance(info.value, KeyError) else str(info.value)
    assert re.search(fault.message, message), message


def test_run_command_exits_2_on_a_typo_before_running_anything(tmp_path, capsys):
    from pipeline.runner import main

    config = tmp_path / "run.yaml"
    config.write_text(f"out_dir: {tmp_path / 'out'}\nscenes:\n  num: 2\n  heldot: 1\n")
    assert main(["--config", str(config)]) == 2
    assert "unknown key 'heldot' (did you mean 'heldout'?)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing started
