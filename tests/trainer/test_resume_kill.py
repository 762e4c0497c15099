"""A run killed with SIGKILL after a checkpoint and then resumed ends with exactly the weights of a run that was
never interrupted (CPU, fp32, one thread: deterministic)."""
from __future__ import annotations

import json
import subprocess
import time

import pytest
from safetensors.torch import load_file

import trainer_task as task
from stages import checkpoint as ckpt


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


FROZEN = "--freeze=llm.embed_tokens.,llm.layers.0."  # LLaVA-like: most of the model frozen


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, freeze", [(0, ()), (2, (FROZEN,)), (3, (FROZEN,))])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, zero_stage, freeze):
    # label dropout draws from the torch RNG: the resumed run must restore it to match
    settings = ["max_steps=10", "save_every=3", "log_every=1", f"zero_stage={zero_stage}", "--label-dropout=0.2",
                *freeze]
    out = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(task.task_command([f"output_dir={out}", *settings], extra=("--hang-at-step", "8")),
                                env=task.process_env(), cwd=task.REPO, stdout=log, stderr=subprocess.STDOUT)
        task.run_task([f"output_dir={tmp_path / 'reference'}", *settings])  # meanwhile, on the other core
        deadline = time.monotonic() + 240
        while not (out / "hanging").exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the run never reached step 8"
            time.sleep(0.2)
        proc.kill()  # SIGKILL: no cleanup, no final save
        proc.wait()
    assert ckpt.latest_complete(out / "checkpoints").name == "step_00000006"
    assert not (out / "weights_rank0.safetensors").exists()

    result = task.run_task([f"output_dir={out}", *settings])
    assert result["step"] == 10
    assert max_diff(load_file(out / "weights_rank0.safetensors"),
                    load_file(tmp_path / "reference" / "weights_rank0.safetensors")) < 1e-6
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # the killed run's steps 7-8 were dropped and logged again once
    reference_rows = (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()
    resumed_rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["loss"] for r in resumed_rows] == pytest.approx(
        [json.loads(r)["loss"] for r in reference_rows], abs=1e-6)
