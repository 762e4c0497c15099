"""SIGKILL at named points of data generation, training, checkpoint saving and the pipeline runner (kill_at.py), then
the same command again. At every point: what was finished before the kill is still there and is not redone, nothing
half-written looks complete, and the resumed result equals an uninterrupted run's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import fault_task
from faults_lib import TRAIN_RUN, tree_digest
from stages import checkpoint as ckpt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
HERE = Path(__file__).parent
REPO = HERE.parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)]), "OMP_NUM_THREADS": "1"}


def killed(point: str, module: str, *args: str, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "kill_at.py"), point, "--", module, *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_killed(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    text = output.decode(errors="replace")
    assert process.returncode == -signal.SIGKILL, text[-3000:]
    return text


# ---- training and checkpoint saving ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainKill:
    point: str
    settings: dict  # on top of TRAIN_RUN
    complete_at_kill: list  # steps of the complete checkpoints the kill leaves
    incomplete_at_kill: list  # steps of checkpoint directories without a marker


TRAIN_KILLS = [
    TrainKill("train-after-step:3", {}, [2], []),
    TrainKill("checkpoint-mid-shard:4", {}, [2], [4]),
    TrainKill("checkpoint-before-marker:4", {}, [2], [4]),
    TrainKill("checkpoint-mid-prune:2", {"keep_last": 1}, [4], [2]),
]


@pytest.fixture(scope="module")
def train_victims(tmp_path_factory):
    """Every training kill point, each in its own process forked from one that imported torch and DeepSpeed:
    {point: output dir}."""
    outs, specs = {}, []
    for kill in TRAIN_KILLS:
        outs[kill.point] = out = tmp_path_factory.mktemp("kill")
        specs.append([kill.point, "fault_task", [str(out)] + [f"{k}={v}" for k, v in
                                                              {**TRAIN_RUN, **kill.settings}.items()]])
    spec_file = tmp_path_factory.mktemp("specs") / "specs.json"
    spec_file.write_text(json.dumps(specs))
    done = subprocess.run([sys.executable, str(HERE / "kill_at.py"), "--fork", str(spec_file)], cwd=REPO, env=ENV,
                          capture_output=True, timeout=300)
    output = done.stdout.decode(errors="replace")
    assert done.returncode == 0, output[-3000:] + done.stderr.decode(errors="replace")[-3000:]
    status = json.loads(output.strip().splitlines()[-1])
    assert status == {kill.point: -signal.SIGKILL for kill in TRAIN_KILLS}, output[-3000:]
    return outs


@pytest.mark.parametrize("kill", TRAIN_KILLS, ids=lambda k: k.point)
def test_training_killed_resumes_to_the_uninterrupted_result(kill, train_victims, reference_run, capsys):
    out = train_victims[kill.point]
    weights, rows, reference_dir = reference_run
    root = out / "checkpoints"
    assert [ckpt.step_of(p) for p in ckpt.complete_checkpoints(root)] == kill.complete_at_kill
    incomplete = [p for p in ckpt.checkpoint_dirs(root) if not (p / ckpt.MARKER).is_file()]
    assert [ckpt.step_of(p) for p in incomplete] == kill.incomplete_at_kill  # left, but not marked complete
    for path in ckpt.complete_checkpoints(root):  # what was finished is intact: equal to the reference's
        saved = ckpt.consolidate_checkpoint(path)
        expected = ckpt.consolidate_checkpoint(reference_dir / "checkpoints" / path.name)
        assert all(bool((saved[k] == expected[k]).all()) for k in expected)

    trainer, result = fault_task.train(out, **{**TRAIN_RUN, **kill.settings})
    printed = capsys.readouterr().out
    assert f"resumed from {root / ckpt.tag_for(kill.complete_at_kill[-1])}" in printed
    assert all(f"removed incomplete checkpoint {root / ckpt.tag_for(s)}" in printed for s in kill.incomplete_at_kill)
    assert result.step == TRAIN_RUN["max_steps"]
    state = trainer.state_dict()
    assert max(float((state[k] - weights[k]).abs().max()) for k in weights) < 1e-6
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == [r["step"] for r in rows]  # one history, no step logged twice
    assert all((p / ckpt.MARKER).is_file() for p in ckpt.checkpoint_dirs(root))


# ---- data generation ----------------------------------------------------------------------------------------------

GENERATE_KILLS = [
    ("generate-after-items:5", 5, 0),  # (point, finished items that survive, torn lines dropped on resume)
    ("generate-torn-cache-line:5", 4, 1),
    ("before-rename:out.json", 12, 0),
]


def generate_args(captions: Path, out: Path) -> list[str]:
    return ["generate", "--backend", "offline", "--input", str(captions), "--out", str(out), "--types",
            "conversation,detail", "--no-progress"]


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> tuple[Path, bytes]:
    """Captions of 6 images (12 items), and the output of an uninterrupted run on them."""
    from datagen_fixtures import photo_records, write_jsonl

    from data_gen.cli import generate_main

    root = tmp_path_factory.mktemp("captions")
    path = write_jsonl(root / "captions.jsonl", photo_records(6))
    assert generate_main(generate_args(path, root / "ref" / "out.json")[1:]) == 0
    return path, (root / "ref" / "out.json").read_bytes()


@pytest.mark.parametrize("point, survived, torn", GENERATE_KILLS, ids=[k[0] for k in GENERATE_KILLS])
def test_generation_killed_resumes_without_redoing_finished_items(tmp_path, captions, point, survived, torn):
    path, reference = captions
    out = tmp_path / "out.json"
    wait_killed(killed(point, "pipeline.cli", *generate_args(path, out)))
    assert not out.exists()  # no output until every item is done: nothing partial looks complete
    cache = tmp_path / "out.cache.jsonl"
    whole_lines = [line for line in cache.read_bytes().split(b"\n")[:-1]]
    assert len(whole_lines) == survived

    from data_gen.cli import generate_main

    assert generate_main(generate_args(path, out)[1:]) == 0
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["already_done"] == survived and summary["generated"] == 12 - survived
    assert summary["torn_cache_lines_dropped"] == torn
    assert out.read_bytes() == reference


# ---- the pipeline runner ----------------------------------------------------------------------------------------------

RUNNER_KILLS = ["before-rename:DONE.json"]  # the stage's work is done, its DONE.json not yet renamed into place


@pytest.mark.parametrize("point", RUNNER_KILLS)
def test_runner_killed_before_a_stage_is_marked_done_runs_it_again(tmp_path, capsys, point):
    from pipeline.runner import main as run_main

    configs = {}
    for name in ("run", "ref"):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(f"out_dir: {tmp_path / name}\nscenes: {{num: 3, heldout: 0, size: 32}}\n")
    assert run_main(["--config", str(configs["ref"])]) == 0

    wait_killed(killed(point, "pipeline.cli", "run", "--config", str(configs["run"])))
    assert not (tmp_path / "run" / "scenes" / "DONE.json").exists()
    capsys.readouterr()
    assert run_main(["--config", str(configs["run"])]) == 0
    assert "interrupted earlier: running it again in place" in capsys.readouterr().out
    images = lambda root: tree_digest(root / "scenes" / "train" / "images")  # noqa: E731
    assert images(tmp_path / "run") == images(tmp_path / "ref")
