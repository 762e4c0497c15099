"""Numerical safety of the trainer: a NaN loss or an infinite gradient stops the run with the step and the samples,
leaves every complete checkpoint as it was and no half-written one; a rerun with the data fixed continues exactly.
fp16 overflow must be reported, and an overflow that never clears must stop the run with the same guarantees."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch

import fault_task
from faults_lib import TRAIN_RUN, temp_leftovers
from stages import checkpoint as ckpt
from stages.trainer import NonFiniteLossError, TrainerError

pytestmark = pytest.mark.timeout(300)
STEP = 4  # the poisoned step; checkpoints exist for step 2 only when it fails
BATCH = 4


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def assert_only_complete_checkpoints(out: Path, steps: list[int]) -> None:
    found = ckpt.checkpoint_dirs(out / "checkpoints")
    assert [ckpt.step_of(p) for p in found] == steps
    assert all((p / ckpt.MARKER).is_file() for p in found)
    for path in found:
        assert all(torch.isfinite(w).all() for w in ckpt.consolidate_checkpoint(path).values())
    assert not temp_leftovers(out)


@pytest.mark.parametrize("poison, message", [
    ("nan", r"(?s)non-finite loss at step {step} .*sample-{sample}"),
    ("inf_grad", r"gradient norm is inf at step {step}"),
], ids=["nan-loss", "inf-gradient"])
def test_non_finite_stops_with_step_and_samples_and_keeps_checkpoints(tmp_path, reference_run, poison, message):
    poisoned = fault_task.data_order()[(STEP - 1) * BATCH + 1]
    with pytest.raises(NonFiniteLossError, match=message.format(step=STEP, sample=poisoned)) as info:
        fault_task.train(tmp_path, poison=poison, poison_sample=poisoned, **TRAIN_RUN)
    assert str(tmp_path / "checkpoints") in str(info.value)  # says where the intact checkpoint is
    assert_only_complete_checkpoints(tmp_path, [2])
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, STEP))  # nothing logged from the failed step
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path))

    if poison == "nan":  # the data fixed, the same command continues from step 2 and ends where a clean run ends
        weights, rows, _ = reference_run
        trainer, result = fault_task.train(tmp_path, **TRAIN_RUN)
        assert result.step == TRAIN_RUN["max_steps"] and max_diff(trainer.state_dict(), weights) < 1e-6
        assert [r["step"] for r in metrics(tmp_path)] == [r["step"] for r in rows]


@contextlib.contextmanager
def captured_output(path: Path):
    """Everything this process prints while inside: sys.stdout/stderr (print, tqdm.write) and, for handlers that hold
    the original streams, file descriptors 1 and 2."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w", buffering=1) as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
        finally:
            sink.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@pytest.fixture(scope="module")
def persistent_overflow(tmp_path_factory, fp16_training):
    """fp16 whose gradients overflow at every loss scale from step 5 on (after checkpoints 2 and 4); the loss scale
    starts at 2**4 so it reaches its minimum in a few steps. Returns (error, console output, output dir)."""
    out = tmp_path_factory.mktemp("overflow")
    ds_json = out / "fp16.json"
    ds_json.write_text(json.dumps({"fp16": {"enabled": "auto", "initial_scale_power": 4}}))
    error = None
    with captured_output(out / "console.txt"):
        try:
            fault_task.train(out / "run", max_steps=40, save_every=2, keep_last=0, precision="fp16", zero_stage=2,
                             deepspeed_config=str(ds_json), poison="huge", poison_after=STEP)
        except Exception as e:  # noqa: BLE001 - what it raises is what the tests check
            error = e
    return error, (out / "console.txt").read_text(errors="replace"), out / "run"


def test_persistent_fp16_overflow_stops_and_keeps_checkpoints(persistent_overflow):
    error, _, out = persistent_overflow
    assert error is not None and "loss scale" in str(error)
    steps = [ckpt.step_of(p) for p in ckpt.checkpoint_dirs(out / "checkpoints")]
    assert steps[:2] == [2, 4]
    assert_only_complete_checkpoints(out, steps)
    last = ckpt.consolidate_checkpoint(ckpt.checkpoint_dirs(out / "checkpoints")[-1])
    assert max_diff(last, ckpt.consolidate_checkpoint(out / "checkpoints" / ckpt.tag_for(4))) == 0  # skipped: no update
    rows = metrics(out)
    skipped = [r["skipped_steps"] for r in rows]
    assert skipped == sorted(skipped) and skipped[-1] >= 4  # every overflow is counted in metrics.jsonl
    assert rows[-1]["loss_scale"] <= 2.0


def test_persistent_fp16_overflow_is_a_named_error(persistent_overflow):
    error, _, _ = persistent_overflow
    assert isinstance(error, TrainerError) and re.search(r"step \d+.*checkpoint", str(error))


def test_fp16_overflow_is_reported_on_the_console(persistent_overflow):
    _, console, _ = persistent_overflow
    assert re.search(r"overflow.*step \d+|step \d+.*overflow", console, re.IGNORECASE), console[-2000:]
