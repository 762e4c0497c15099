"""Adapters under DeepSpeed ZeRO-3 (one CPU rank, so parameters really are partitioned): adapter_state_dict needs and
works inside GatheredParameters, AdaLoRA's masking survives the gather, and a saved adapter reloads exactly."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_adapters_under_zero3(tmp_path):
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parents[1])]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(here / "zero3_task.py"), str(_free_port()), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines() if ": " in line)
    assert lines["outside-gather"] == "error"
    assert lines["kept after final allocation"] == "4"  # target_r 2 × 2 modules
    assert float(lines["reload max diff"]) < 1e-5
