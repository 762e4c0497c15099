"""Bad data through a whole training stage (stage 2, `llava-pipeline instruct`) rather than the loader alone: with
on_error=stop the stage exits 1 with the row named and no final model; with on_error=skip it finishes and the skipped
rows are counted where a user looks (metrics.jsonl), not only in scattered warnings."""
from __future__ import annotations

import json

import pytest
import yaml

from faults_lib import CORRUPT_BYTES, image_bytes, sample, write_json

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
TOWER = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}


def stage_config(tmp_path, tokenizer, on_error: str):
    import shutil

    from llava.model import Llama

    llm = tmp_path / "llm"
    Llama.from_name("tiny").init_weights(seed=0).save_hf(llm)
    shutil.copyfile(tokenizer.model_file, llm / "tokenizer.model")
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(image_bytes("RGB", (40, 30)))
    (images / "bad.png").write_bytes(CORRUPT_BYTES)
    entries = [sample(f"s{i}", "bad.png" if i == 5 else "ok.png") for i in range(8)]
    data = write_json(tmp_path / "data.json", entries)
    config = tmp_path / "instruct.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "data": str(data), "image_folder": str(images), "max_len": 256,
        "on_error": on_error, "model": {"llm": str(llm), "vision_tower": TOWER, "projector_type": "linear"},
        "train": {"precision": "fp32", "zero_stage": 0, "micro_batch_size": 4, "epochs": 1, "num_workers": 0,
                  "log_every": 1, "tensorboard": False, "gradient_checkpointing": False, "peak_flops": 1e11}}))
    return config


def test_stop_exits_1_naming_the_row_and_writes_no_final_model(tmp_path, tokenizer, capsys):
    from stages.instruct import main

    config = stage_config(tmp_path, tokenizer, "stop")
    assert main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "data.json: entry 5 (id 's5')" in err and "bad.png: cannot decode image" in err
    assert not (tmp_path / "out" / "final").exists()


def test_skip_finishes_and_counts_the_skipped_rows_in_metrics(tmp_path, tokenizer):
    from stages.instruct import main

    config = stage_config(tmp_path, tokenizer, "skip")
    assert main(["--config", str(config)]) == 0
    assert (tmp_path / "out" / "final").is_dir()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1].get("skipped_samples") == 1, rows[-1]
