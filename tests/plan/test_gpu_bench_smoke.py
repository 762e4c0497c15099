"""bench/gpu.py must still run the day a GPU is lent: its CPU smoke run (`--device cpu --tiny`) goes through every
section (bf16 logits, fused attention kernel, stage-2 step through the trainer, decoding) and writes both reports."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cpu_smoke_run(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "bench/gpu.py", "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "report.json").read_text())
    assert done.returncode == 0 and report["passed"], done.stdout[-3000:] + done.stderr[-3000:]
    sections = report["sections"]
    assert set(sections) == {"bf16_logits", "sdpa_kernel", "stage2", "decode"}
    assert sections["bf16_logits"]["relative_error"] < sections["bf16_logits"]["tolerance"]
    assert sections["sdpa_kernel"]["allowed"] == ["FLASH_ATTENTION"]
    assert sections["stage2"]["tokens_per_s"] > 0 and 0 < sections["stage2"]["mfu"] < 1
    assert sections["stage2"]["predicted_bytes"] > 0 and sections["decode"]["tokens_per_s"] > 0
    assert (tmp_path / "report.md").read_text().startswith("# GPU bench")
