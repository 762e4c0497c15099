"""The runner's bookkeeping on the two data stages (real scenes and offline generation, a few seconds): skipping,
rerunning after a deleted marker, a changed setting or --from/--only, resuming an interrupted stage, strict config
errors and missing-input errors."""
import json

import pytest
import yaml

from pipeline.runner import main


def _config(tmp_path, **sections):
    data = {"out_dir": str(tmp_path / "run"), "scenes": {"num": 12, "heldout": 4, "size": 64},
            "generate": {"types": ["conversation", "short_answer"]}, **sections}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _status(output: str, stage: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(f"[{stage}] ")]
    if any("up to date" in line for line in lines):
        return "skipped"
    if any(line.startswith(f"[{stage}] done in") for line in lines):
        return "ran"
    return "absent"


def test_second_run_skips_and_deleted_marker_reruns_that_stage_and_later(tmp_path, capsys):
    config = _config(tmp_path)
    run = tmp_path / "run"
    code, out = _run(capsys, "--config", config)
    assert code == 0, out
    assert (_status(out, "scenes"), _status(out, "generate")) == ("ran", "ran")
    assert "resolved config" in out and (run / "config.yaml").is_file()
    done = json.loads((run / "data" / "DONE.json").read_text())
    assert done["outputs"]["questions"].endswith("questions.jsonl") and done["upstream"]["scenes"]
    train_json = run / "data" / "train.json"
    assert len(json.loads(train_json.read_text())) == done["outputs"]["samples"] > 0

    code, out = _run(capsys, "--config", config)
    assert code == 0 and (_status(out, "scenes"), _status(out, "generate")) == ("skipped", "skipped")

    (run / "data" / "DONE.json").unlink()
    code, out = _run(capsys, "--config", config)
    assert (_status(out, "scenes"), _status(out, "generate")) == ("skipped", "ran")

    (run / "scenes" / "DONE.json").unlink()
    code, out = _run(capsys, "--config", config)
    assert (_status(out, "scenes"), _status(out, "generate")) == ("ran", "ran")  # later stages follow


def test_changed_setting_reruns_from_that_stage_and_clears_it(tmp_path, capsys):
    config = _config(tmp_path)
    assert _run(capsys, "--config", config)[0] == 0
    stray = tmp_path / "run" / "data" / "stray.txt"
    stray.write_text("from the old settings")
    code, out = _run(capsys, "--config", config, "generate.seed=1")
    assert code == 0
    assert (_status(out, "scenes"), _status(out, "generate")) == ("skipped", "ran")
    assert "settings or inputs changed" in out and not stray.exists()
    code, out = _run(capsys, "--config", config, "generate.seed=1")
    assert _status(out, "generate") == "skipped"


def test_interrupted_stage_runs_again_in_place(tmp_path, capsys):
    config = _config(tmp_path)
    assert _run(capsys, "--config", config)[0] == 0
    data = tmp_path / "run" / "data"
    (data / "DONE.json").unlink()  # as if killed after STARTED.json was written
    partial = data / "partial.txt"
    partial.write_text("work in progress")
    code, out = _run(capsys, "--config", config)
    assert code == 0 and _status(out, "generate") == "ran"
    assert "interrupted earlier" in out and partial.exists()


def test_from_and_only(tmp_path, capsys):
    config = _config(tmp_path)
    assert _run(capsys, "--config", config)[0] == 0
    code, out = _run(capsys, "--config", config, "--only", "scenes")
    assert (_status(out, "scenes"), _status(out, "generate")) == ("ran", "absent")
    code, out = _run(capsys, "--config", config, "--from", "data")  # the generate stage's folder name works too
    assert (_status(out, "scenes"), _status(out, "generate")) == ("skipped", "ran")


def test_config_typos_fail_before_anything_runs(tmp_path, capsys):
    config = _config(tmp_path)
    code, out = _run(capsys, "--config", config, "generate.sed=3")
    assert code == 2 and "generate: unknown key 'sed' (did you mean 'seed'?)" in out
    code, out = _run(capsys, "--config", config, "eval.batch_sise=3")
    assert code == 2 and "eval: unknown key 'batch_sise' (did you mean 'batch_size'?)" in out
    code, out = _run(capsys, "--config", config, "base.clip.widht=3")
    assert code == 2 and "base.clip: unknown key 'widht' (did you mean 'width'?)" in out
    code, out = _run(capsys, "--config", config, "scenes.heldot=3")
    assert code == 2 and "(did you mean 'heldout'?)" in out
    code, out = _run(capsys, "--config", config, "generate.types=[conversation,complex]")
    assert code == 2 and "unknown response type(s) ['complex']" in out
    code, out = _run(capsys, "--config", config, "out_dri=x")
    assert code == 2 and "(did you mean 'out_dir'?)" in out
    code, out = _run(capsys, "--config", config, "generate.short_answer_turns=[5,3]")
    assert code == 2 and "generate.short_answer_turns: expected [fewest, most]" in out
    code, out = _run(capsys, "--config", config, "generate.short_answer_paraphrases=1.5")
    assert code == 2 and "generate.short_answer_paraphrases: short-answer paraphrase fraction must be" in out
    assert not (tmp_path / "run").exists()


def test_missing_inputs_say_what_to_run_or_set(tmp_path, capsys):
    config = _config(tmp_path, eval={})
    code, out = _run(capsys, "--config", config, "--only", "generate")
    assert code == 1 and "run `llava-pipeline run --config" in out and "--from scenes` first" in out
    code, out = _run(capsys, "--config", config, "--only", "eval")
    assert code == 1 and "add the 'instruct' section or set eval.model in the config" in out
    path = tmp_path / "nodata.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "run2"), "generate": {}}))
    code, out = _run(capsys, "--config", str(path))
    assert code == 1 and "add the 'scenes' section or set generate.input in the config" in out


def test_data_mix_fractions(tmp_path, capsys):
    config = _config(tmp_path, generate={"types": {"conversation": 0.5, "short_answer": 1.5}})
    code, out = _run(capsys, "--config", config)
    assert code == 0, out
    samples = json.loads((tmp_path / "run" / "data" / "train.json").read_text())
    assert len({s["id"] for s in samples}) == len(samples) == 6 + 12 + 6
    assert sum(s["id"].endswith("_conversation") for s in samples) == 6
    short = {s["id"]: s["conversations"] for s in samples if "_short_answer" in s["id"]}
    assert len(short) == 18
    assert short["scene_000000_short_answer"] != short["scene_000000_short_answer.1"]  # other questions
    code, out = _run(capsys, "--config", config, "generate.types={detail: 0}")
    assert code == 2 and "samples per image must be positive numbers" in out
