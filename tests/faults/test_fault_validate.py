"""`llava-pipeline validate`: truncation after the image splice (checked against the model's own splice), the length
histogram, padding waste of the sampler training uses, sampling, parallel workers, the JSON report, `--model`."""
from __future__ import annotations

import json

import pytest
import torch

from faults_lib import image_bytes, sample, write_json
from llava.constants import IGNORE_INDEX
from llava.data.instruct import InstructDataset
from pipeline.validate import EXIT_BAD_ROWS, EXIT_CLEAN, EXIT_USAGE, SHOWN_ROWS, ValidateSettings, main, scan

TOWER = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}  # 16 patches


@pytest.fixture(scope="module")
def tiny_llava():
    from llava.model.llama import LlamaConfig
    from llava.model.llava import LlavaConfig, LlavaModel
    from llava.model.vision import arch_from_dict

    torch.manual_seed(0)
    return LlavaModel(LlavaConfig(vision_tower=arch_from_dict(TOWER), llm=LlamaConfig.from_name("tiny"),
                                  projector_type="linear", max_len=10_000))


def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(image_bytes("RGB", (40, 30)))
    return images


def long_text(words: int) -> str:
    return " ".join(["red square blue circle"] * words)


def test_truncation_counts_match_the_models_own_splice(tmp_path, tokenizer, tiny_llava):
    """Three samples cut by max_len: one loses part of its answer, one has its image features cut, one loses every
    answer token (a bad row). The counts must equal what LlavaModel.prepare_inputs_embeds keeps."""
    images = folder(tmp_path)
    tokens = tiny_llava.num_image_tokens
    late_image = {"id": "late-image", "image": "ok.png", "conversations": [
        {"from": "human", "value": "Tell me a story."}, {"from": "gpt", "value": long_text(6)},
        {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "A square."}]}
    entries = [sample("short", None), sample("long-answer", "ok.png", answer=long_text(30)), late_image,
               sample("all-cut", None, question=long_text(40), answer="Yes.")]
    data = write_json(tmp_path / "data.json", entries)
    probe = InstructDataset(data, tokenizer, image_folder=images, image_processor=tiny_llava.image_processor(),
                            max_len=100_000, num_image_tokens=tokens, lengths="exact")
    full = [int(n) for n in probe.lengths]
    image_at = probe[2]["input_ids"].tolist().index(-200)
    max_len = image_at + tokens // 2  # the late image is cut half way
    assert full[0] < max_len < min(full[1:]), full

    report = scan(ValidateSettings(data=str(data), tokenizer=str(tokenizer.model_file), image_folder=str(images),
                                   max_len=max_len, image_tokens=tokens, batch_size=2, workers=0))
    truncated = {r["id"]: r for r in report["truncated"]["rows"]}
    assert set(truncated) == {"long-answer", "late-image", "all-cut"}
    assert report["truncated"]["images_cut"] == 1 and truncated["late-image"]["images_cut"] == 1
    assert [r["id"] for r in report["bad_rows"]] == ["all-cut"]
    assert "cuts every answer token" in report["bad_rows"][0]["reason"]

    # Oracle: the model's splice and cut, on what training loads.
    train = InstructDataset(data, tokenizer, image_folder=images, image_processor=tiny_llava.image_processor(),
                            max_len=max_len, num_image_tokens=tokens)
    lost = 0
    for i in range(len(train)):
        item = train[i]
        pixels = torch.stack(item["images"]) if item["images"] else None
        with torch.no_grad():
            embeds, labels = tiny_llava.prepare_inputs_embeds([item["input_ids"]], pixels,
                                                              labels=[item["labels"]], max_len=max_len)
        assert len(embeds[0]) == min(full[i], max_len)
        kept = int((labels[0] != IGNORE_INDEX).sum())
        supervised = int((probe[i]["labels"] != IGNORE_INDEX).sum())
        lost += supervised - kept
        assert (kept == 0) == (item["id"] == "all-cut")
    assert report["truncated"]["answer_tokens_lost"] == lost > 0


def mixed_dataset(tmp_path, n: int = 48):
    images = folder(tmp_path)
    entries = [sample(f"s{i}", "ok.png" if i % 3 else None, answer=long_text(1 + (i * 7) % 13)) for i in range(n)]
    return write_json(tmp_path / "data.json", entries), images


def settings(data, images, tokenizer, **kw) -> ValidateSettings:
    base = dict(data=str(data), tokenizer=str(tokenizer.model_file), image_folder=str(images), max_len=4096,
                image_tokens=8, batch_size=2, workers=0)
    return ValidateSettings(**{**base, **kw})


def test_histogram_and_padding_waste(tmp_path, tokenizer):
    data, images = mixed_dataset(tmp_path)
    report = scan(settings(data, images, tokenizer, world_size=2, grad_accum=4))
    lengths = report["lengths"]
    assert sum(b["count"] for b in lengths["histogram"]) == report["checked"] == 48
    assert lengths["min"] <= lengths["median"] <= lengths["p95"] <= lengths["max"] <= 4096
    waste = report["padding_waste"]
    assert 0.0 <= waste["length_grouped"] < waste["random"] < 1.0  # mega-batches of 16 sorted by length pad less


def test_sample_probes_a_random_subset_and_workers_agree(tmp_path, tokenizer):
    data, images = mixed_dataset(tmp_path)
    (images / "ok.png").write_bytes(b"broken")  # every image row is bad now
    everything = scan(settings(data, images, tokenizer, workers=2))
    assert everything["num_bad"] == 32 and not everything["sampled"]
    serial = scan(settings(data, images, tokenizer, workers=0))
    assert serial["bad_rows"] == everything["bad_rows"]
    subset = scan(settings(data, images, tokenizer, sample=12, seed=3))
    assert subset["checked"] == 12 and subset["sampled"]
    assert {r["index"] for r in subset["bad_rows"]} <= {r["index"] for r in everything["bad_rows"]}
    assert subset["bad_rows"] == scan(settings(data, images, tokenizer, sample=12, seed=3))["bad_rows"]


def test_cli_report_file_holds_every_bad_row(tmp_path, tokenizer, capsys):
    data, images = mixed_dataset(tmp_path)
    (images / "ok.png").write_bytes(b"broken")
    out = tmp_path / "report.json"
    code = main(["--data", str(data), "--image-folder", str(images), "--tokenizer", str(tokenizer.model_file),
                 "--image-tokens", "8", "--workers", "0", "--report", str(out)])
    printed = capsys.readouterr().out
    assert code == EXIT_BAD_ROWS
    assert f"BAD ROWS: 32" in printed and f"{32 - SHOWN_ROWS} more" in printed
    report = json.loads(out.read_text())
    assert len(report["bad_rows"]) == 32 and all("cannot decode image" in r["reason"] for r in report["bad_rows"])


def test_model_directory_gives_image_tokens_and_checks_the_tokenizer(tmp_path, tokenizer, tiny_llava, capsys):
    import dataclasses

    from llava.model.llava import CONFIG_FILE

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    config = dataclasses.replace(tiny_llava.config, select_feature="cls_patch")
    (model_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    data, images = mixed_dataset(tmp_path)
    args = ["--data", str(data), "--image-folder", str(images), "--tokenizer", str(tokenizer.model_file),
            "--model", str(model_dir), "--workers", "0", "--report", str(tmp_path / "r.json")]
    assert main(args) == EXIT_CLEAN
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["image_tokens"] == 17  # 16 patches + CLS

    small = dataclasses.replace(config, llm=dataclasses.replace(config.llm, vocab_size=300))
    (model_dir / CONFIG_FILE).write_text(json.dumps(small.to_dict()))
    capsys.readouterr()
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "has 400 pieces but the model's embedding has 300 rows" in err and "tokenizer.model" in err


def test_unknown_template_is_a_usage_error(tmp_path, tokenizer, capsys):
    data, images = mixed_dataset(tmp_path, 3)
    assert main(["--data", str(data), "--tokenizer", str(tokenizer.model_file), "--template", "vicuna"]) == EXIT_USAGE
    assert "unknown template 'vicuna'; valid: plain, vicuna_v1, llava_v1, llama_2" in capsys.readouterr().err


# ---- --config: the instruct stage's own settings ----------------------------------------------------------------------

def model_parts(tmp_path, tokenizer) -> dict:
    """A `model:` section of real parts: a saved tiny LLaMA with the test tokenizer, and a tower config."""
    import shutil

    from llava.model import Llama

    llm = tmp_path / "llm"
    Llama.from_name("tiny").save_hf(llm)
    shutil.copyfile(tokenizer.model_file, llm / "tokenizer.model")
    return {"llm": str(llm), "vision_tower": TOWER, "projector_type": "linear"}


def test_config_mode_reads_the_run_configs_instruct_section(tmp_path, tokenizer):
    import yaml

    data, images = mixed_dataset(tmp_path)
    (images / "ok.png").write_bytes(b"broken")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "run"), "nproc": 2, "instruct": {
        "data": str(data), "image_folder": str(images), "max_len": 4096, "model": model_parts(tmp_path, tokenizer),
        "train": {"micro_batch_size": 3, "grad_accum": 2}}}))
    out = tmp_path / "report.json"
    assert main(["--config", str(config), "--workers", "0", "--report", str(out)]) == EXIT_BAD_ROWS
    report = json.loads(out.read_text())
    s = report["settings"]
    assert (s["image_tokens"], s["batch_size"], s["grad_accum"], s["world_size"]) == (16, 3, 2, 2)
    assert s["template"] == "vicuna_v1" and s["model_vocab_size"] == 512 and report["num_bad"] == 32
    # overrides work as for `llava-pipeline run`
    assert main(["--config", str(config), "instruct.max_len=64", "--workers", "0", "--report", str(out)]) == 1
    assert json.loads(out.read_text())["settings"]["max_len"] == 64


def test_config_mode_errors_name_the_key_or_the_missing_stage(tmp_path, tokenizer, capsys):
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "run"), "generate": {}, "instruct": {
        "model": model_parts(tmp_path, tokenizer)}}))
    assert main(["--config", str(config)]) == EXIT_USAGE
    assert "needs train_json from stage 'generate', which has not finished" in capsys.readouterr().err
    assert main(["--config", str(config), "instruct.max_lne=5"]) == EXIT_USAGE
    assert "unknown key 'max_lne' (did you mean 'max_len'?)" in capsys.readouterr().err
