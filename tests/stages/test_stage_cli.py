"""`llava-pipeline align|instruct|base`: strict configs, the resolved config printed and saved, resume flags."""
from pathlib import Path

import yaml

from stage_helpers import MICRO_TRAIN, bound


def _align_file(tmp_path, base_run, scene_data, **train):
    config = {"output_dir": str(tmp_path / "out"), "shards": str(scene_data.shards), "max_len": 128,
              "model": {"llm": base_run.outputs["llm"], "vision_tower": base_run.outputs["vision_tower"],
                        "projector_type": "linear"},
              "train": {**MICRO_TRAIN, "max_steps": 2, "micro_batch_size": 4, **train}}
    path = tmp_path / "align.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_typo_in_a_key_is_an_error_with_a_suggestion(tmp_path, base_run, scene_data, capsys):
    from pipeline.cli import main

    path = _align_file(tmp_path, base_run, scene_data)
    assert main(["align", "--config", str(path), "train.lrr=0.1"]) == 2
    assert "unknown key 'lrr' (did you mean 'lr'?)" in capsys.readouterr().err
    assert main(["align", "--config", str(path), "model.projecter_type=linear"]) == 2
    assert "did you mean 'projector_type'" in capsys.readouterr().err
    assert main(["instruct", "--config", str(path)]) == 2  # an align file is not an instruct config
    assert "unknown key 'shards'" in capsys.readouterr().err
    assert main(["align", "--config", str(path), "train.output_dir=/elsewhere"]) == 2
    assert "set the stage's output_dir instead" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_overrides_resolve_print_save_and_resume_flags(tmp_path, base_run, scene_data, capsys):
    from pipeline.cli import main

    path = _align_file(tmp_path, base_run, scene_data)
    assert main(["align", "--config", str(path), "train.lr=0.05", "max_len=96"]) == 0
    printed = capsys.readouterr().out
    assert "[config] resolved:" in printed and "lr: 0.05" in printed
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["max_len"] == 96 and saved["train"]["lr"] == 0.05 and saved["train"]["warmup_ratio"] == 0.0
    assert saved["train"]["zero_stage"] == 2  # stage 1's default (LLaVA: ZeRO-2), not in the file
    projector = (tmp_path / "out" / "mm_projector.safetensors").read_bytes()

    assert main(["align", "--config", str(path), "train.lr=0.05", "max_len=96", "--no-resume"]) == 1
    assert "resume=False" in capsys.readouterr().err
    assert main(["align", "--config", str(path), "train.lr=0.05", "max_len=96", "--resume"]) == 0
    assert (tmp_path / "out" / "mm_projector.safetensors").read_bytes() == projector  # finished run: same result


def test_real_recipe_configs_bind_with_llava_15_hyperparameters(monkeypatch):
    from stages.config import load_config
    from stages import align, instruct
    from stages.trainer import deepspeed_config

    monkeypatch.chdir(Path(__file__).parents[2])  # the configs name configs/deepspeed/*.json from the repo root
    def load(stage, name):
        cfg = bound(stage, load_config(f"configs/{name}.yaml"))
        deepspeed_config(cfg.train, world_size=8)  # the DeepSpeed JSON agrees with the train section
        return cfg

    stage1 = load(align, "vicuna-7b-align")
    t = stage1.train
    assert (t.lr, t.micro_batch_size * t.grad_accum * 8, t.zero_stage, t.epochs, t.weight_decay, t.warmup_ratio,
            t.lr_schedule, t.precision) == (1e-3, 256, 2, 1, 0.0, 0.03, "cosine", "bf16")
    assert stage1.model.projector_type == "mlp2x_gelu" and stage1.model.select_layer == -2 and stage1.max_len == 2048

    stage2 = load(instruct, "vicuna-7b-instruct")
    t = stage2.train
    assert (t.lr, t.micro_batch_size * t.grad_accum * 8, t.zero_stage, t.epochs, t.warmup_ratio, t.lr_schedule,
            t.precision, t.gradient_checkpointing) == (2e-5, 128, 3, 1, 0.03, "cosine", "bf16", True)
    assert stage2.max_len == 2048 and stage2.template == "vicuna_v1" and stage2.adapter is None

    lora = load(instruct, "vicuna-7b-instruct-lora")
    assert (lora.adapter["method"], lora.adapter["r"], lora.adapter["alpha"]) == ("lora", 128, 256)
    assert (lora.train.lr, lora.train.projector_lr, lora.train.zero_stage) == (2e-4, 2e-5, 3)
