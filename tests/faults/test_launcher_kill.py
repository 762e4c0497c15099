"""A launcher stopped or killed by any signal leaves no torchrun agent and no rank behind, the output folder stays
locked while any rank lives, and the rerun resumes to the uninterrupted result (stages/lifeline.py).

Processes are followed through /proc (pid, parent and start time, read here), not through the code under test."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.lifeline import FOLDER_LOCK, FolderInUse, hold_folder

pytestmark = [pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="follows processes through /proc"),
              pytest.mark.timeout(300)]
HERE = Path(__file__).parent
REPO = HERE.parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
GONE_WITHIN_S = 10  # a liveness bound, not a speed claim: a healthy stop takes about a second


def environment(*paths: Path) -> dict:
    """This environment, importable `paths` first, one thread per process, no launcher variables inherited."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([*map(str, paths), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


# ---- processes, as /proc shows them --------------------------------------------------------------------------------

def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every process below `root`."""
    stats = {int(p.name): proc_stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, stat in stats.items():
            if stat is not None and stat[1] == parent and pid not in found:
                found[pid] = stat[2]
                frontier.append(pid)
    return found


def alive(processes: dict[int, int]) -> list[int]:
    """The pids of `processes` still running (a zombie has finished; a reused pid is another process)."""
    return [pid for pid, start in processes.items()
            if (stat := proc_stat(pid)) is not None and stat[0] not in "ZX" and stat[2] == start]


def wait_gone(processes: dict[int, int], within: float = GONE_WITHIN_S) -> list[int]:
    deadline = time.monotonic() + within
    while (left := alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def kill_leftovers(processes: dict[int, int]) -> None:
    """Keep a failing test from leaving training processes on the machine."""
    for pid in alive(processes):
        os.kill(pid, signal.SIGKILL)


def as_from_a_terminal() -> None:
    """In the child, before it runs: Ctrl-C's default action, which a shell gives the job in its foreground. A test run
    started in the background (`make test &`, nohup) ignores SIGINT, and its children would inherit that, so the
    Ctrl-C cases would test an ignored signal (as they should: an ignored signal stays ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(command: list[str], log: Path, env: dict, **popen) -> subprocess.Popen:
    """`command`, its output into `log` (a pipe nobody reads yet would fill up and stall it), as a terminal starts it."""
    with open(log, "wb") as sink:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                preexec_fn=as_from_a_terminal, **popen)


def wait_for(predicate, what: str, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"never saw {what} (launcher exit {process.returncode}):\n"
                                 f"{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.05)


def holders_named(error: FolderInUse) -> set[int]:
    return {int(pid) for pid in re.findall(r"pid (\d+)", str(error))}


# ---- one parent, one child ------------------------------------------------------------------------------------------

CHILD = """
import re, signal, sys, time
from stages.lifeline import die_with_parent
delay, parent, busy = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "busy"
time.sleep(delay)  # the parent may be killed during this: before the child asks to die with it
die_with_parent(parent, signal.SIGKILL)
print("asked", flush=True)
if busy:  # hours of regex backtracking in C, never releasing the GIL: no Python thread of this process runs
    re.match(r"(a+)+$", "a" * 64 + "b")
time.sleep(600)
"""
PARENT = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", *sys.argv[1:3], str(os.getpid()), sys.argv[3]])
print(child.pid, flush=True)
child.wait()
"""


@pytest.mark.parametrize("delay, busy", [(0.0, "busy"), (1.5, "idle")],
                         ids=["child busy in C code", "parent died before the child asked"])
def test_a_child_dies_with_its_parent(delay, busy):
    """SIGKILL of the parent alone takes the child with it: while the child holds the GIL (only the kernel's
    parent-death signal can act), and when the parent died before the child asked (only the watchdog can see it)."""
    if busy == "busy" and not sys.platform.startswith("linux"):
        pytest.skip("the kernel's parent-death signal is Linux's")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(delay), busy], env=environment(),
                              stdout=subprocess.PIPE)
    child = int(parent.stdout.readline())
    processes = {child: proc_stat(child)[2]}
    try:
        if not delay:
            assert parent.stdout.readline() == b"asked\n"
        parent.kill()
        parent.wait()
        assert wait_gone(processes) == []
    finally:
        kill_leftovers(processes)


# ---- the output-folder lock -----------------------------------------------------------------------------------------

def run_config(tmp_path: Path, name: str = "run", **sections) -> Path:
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / name), **sections}))
    return path


def test_a_runner_is_refused_while_another_holds_the_folder(tmp_path, capsys):
    from pipeline.runner import main as run_main

    config = run_config(tmp_path, scenes={"num": 2, "heldout": 0, "size": 32})
    with hold_folder(tmp_path / "run"):  # as a running `llava-pipeline run` holds it
        assert run_main(["--config", str(config)]) == 1
    error = capsys.readouterr().err
    assert f"is in use by pid {os.getpid()} (" in error and "use another folder" in error
    assert run_main(["--config", str(config)]) == 0  # released with the holder


def align_command(tmp_path: Path, out: Path, run):
    """`llava-pipeline align --config ...` as a function (argv -> exit status) writing into `out`, with `run` in
    place of the stage's training (the lock is what is under test), and its config file."""
    import yaml

    from stages import align
    from stages.common import stage_main

    config = tmp_path / "align.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(out), "shards": str(tmp_path / "shards"),
                                      "model": {"llm": str(tmp_path / "llm"), "vision_tower": "ViT-B-32"}}))

    def main(argv):
        return stage_main(argv, name="align", description="", schema=align.SCHEMA,
                          train_sections=align.TRAIN_SECTIONS, entry=main, run=run)
    return main, config


def held_elsewhere(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock, shared, as a running launch holds it (kill it when done)."""
    folder.mkdir(parents=True, exist_ok=True)
    other = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                              "fcntl.flock(f, fcntl.LOCK_SH); print('held', flush=True); time.sleep(60)",
                              str(folder / ".lock")], stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "held"
    return other


def test_a_stage_command_locks_its_output_folder_unless_its_caller_holds_one_around_it(tmp_path, capsys, monkeypatch):
    """`llava-pipeline align ...` run alone holds output_dir/.lock while it runs and is refused while another process
    holds it; inside `llava-pipeline run` (whose lock covers the folder) it takes none. The lock table is read from
    /proc/locks by pid, apart from the code under test."""
    from stages.lifeline import lock_holders

    out = tmp_path / "stage"
    monkeypatch.delenv(FOLDER_LOCK, raising=False)
    held_while_running = []
    main, config = align_command(tmp_path, out, lambda cfg: held_while_running.append(lock_holders(out / ".lock")))

    assert main(["--config", str(config)]) == 0
    assert held_while_running == [[os.getpid()]] and lock_holders(out / ".lock") == []
    other = held_elsewhere(out)
    try:
        assert main(["--config", str(config)]) == 1 and len(held_while_running) == 1
        assert f"is in use by pid {other.pid} (" in capsys.readouterr().err
    finally:
        other.kill()
        other.wait()
    with hold_folder(tmp_path):  # as the runner holds its out_dir: the stage inside it takes no lock of its own
        assert main(["--config", str(config)]) == 0
    assert held_while_running[-1] == []


def test_a_stage_command_and_a_run_refuse_each_other_across_their_folders(tmp_path, capsys, monkeypatch):
    """Locks are per folder, so each side checks the other's: a stage command alone aimed at a stage folder of a
    running run is refused (naming the run's process), and so is a run's stage while a stage command alone holds that
    stage's folder. Another process holds each lock, shared as a running launch holds it; nothing runs meanwhile."""
    run_folder, stage_folder = tmp_path / "run", tmp_path / "run" / "align"
    monkeypatch.delenv(FOLDER_LOCK, raising=False)
    ran = []
    main, config = align_command(tmp_path, stage_folder, ran.append)

    for holder_folder, around in ((run_folder, None), (stage_folder, run_folder)):
        other = held_elsewhere(holder_folder)
        try:
            if around is None:  # the stage command alone, inside the running run's folder
                assert main(["--config", str(config)]) == 1
            else:  # the run (holding its out_dir, as the runner does) reaches the stage a command alone holds
                with hold_folder(around):
                    assert main(["--config", str(config)]) == 1
            assert f"{holder_folder} is in use by pid {other.pid} (" in capsys.readouterr().err
            assert ran == [] and not (stage_folder / "config.yaml").exists()
        finally:
            other.kill()
            other.wait()
    assert main(["--config", str(config)]) == 0 and len(ran) == 1  # both free again
    with hold_folder(run_folder):
        assert main(["--config", str(config)]) == 0 and len(ran) == 2


def test_a_rank_left_alive_keeps_the_folder_and_is_named(tmp_path, capsys):
    """A rank whose launcher is gone still holds its share of the lock: the rerun is refused, naming that rank."""
    from pipeline.runner import main as run_main

    (tmp_path / "run").mkdir()
    env = {**environment(), FOLDER_LOCK: str(tmp_path / "run" / ".lock")}  # as its launcher left it
    rank = subprocess.Popen([sys.executable, "-c", "import time; from stages.lifeline import join_folder; "
                             "join_folder(); print('joined', flush=True); time.sleep(600)"],
                            env=env, stdout=subprocess.PIPE)
    try:
        assert rank.stdout.readline() == b"joined\n"
        config = run_config(tmp_path, scenes={"num": 2, "heldout": 0, "size": 32})
        assert run_main(["--config", str(config)]) == 1
        assert f"is in use by pid {rank.pid} (" in capsys.readouterr().err
        assert not (tmp_path / "run" / "scenes").exists()  # refused before anything was written
    finally:
        rank.kill()
        rank.wait()
    assert run_main(["--config", str(config)]) == 0


# ---- two ranks under torchrun ---------------------------------------------------------------------------------------

LAUNCHER = [sys.executable, "-m", "stages.launch"]
# The same launcher in a program that goes on after an exception left the launcher's wait (as a test runner does after
# a test's timeout): here SIGUSR1 raises it.
RAISING_LAUNCHER = [sys.executable, "-c", "import signal, sys, time; from stages.launch import cli\n"
                    "def fail(*_): raise RuntimeError('the program around the launcher failed')\n"
                    "signal.signal(signal.SIGUSR1, fail)\n"
                    "try: cli(sys.argv[1:])\n"
                    "except RuntimeError: time.sleep(600)"]
STOPS = {  # how the launcher is stopped -> (launcher, how, its exit status); SIGKILL of it alone: the runner's test
    "SIGTERM to the launcher": (LAUNCHER, lambda pid: os.kill(pid, signal.SIGTERM), -signal.SIGTERM),
    "SIGINT to its process group (Ctrl-C)": (LAUNCHER, lambda pid: os.killpg(pid, signal.SIGINT), -signal.SIGINT),
    "SIGKILL to its process group": (LAUNCHER, lambda pid: os.killpg(pid, signal.SIGKILL), -signal.SIGKILL),
    "an exception in the launcher's process": (RAISING_LAUNCHER, lambda pid: os.kill(pid, signal.SIGUSR1), None),
}


@pytest.fixture(scope="module")
def hanging_launches(tmp_path_factory):
    """One `--nproc 2` launch per way to stop it, started together (their imports share the cores), each with two
    ranks that hang at step 3, so they would train forever: {stop: (launcher, output folder, {pid: start time} of
    the agent and ranks)}."""
    started = {}
    for stop, (launcher, _, _) in STOPS.items():
        out = tmp_path_factory.mktemp("stop") / "out"
        with hold_folder(out):  # as the runner does: the ranks inherit the lock's path and join it
            started[stop] = out, start(
                [*launcher, "--nproc", "2", "trainer_task:main", f"output_dir={out}", "max_steps=8", "save_every=2",
                 "--hang-at-step", "3"], out.parent / "log.txt",
                environment(REPO / "tests" / "trainer"), start_new_session=True)  # a process group of its own
    launches = {}
    try:
        for stop, (out, launcher) in started.items():
            wait_for(lambda: (out / "hanging").exists(), "a rank hanging at step 3", launcher, out.parent / "log.txt")
            launches[stop] = launcher, out, descendants(launcher.pid)
        yield launches
    finally:
        for out, launcher in started.values():
            launcher.kill()
            launcher.wait()
        for _, _, processes in launches.values():
            kill_leftovers(processes)


@pytest.mark.slow
@pytest.mark.parametrize("stop", list(STOPS))
def test_every_stop_takes_the_agent_and_the_ranks_with_it(stop, hanging_launches):
    """Whatever stops the launcher stops its torchrun agent and both ranks. Until then the ranks hold the output
    folder: the launcher's share is released here, as a killed launcher's is, and the folder is still refused,
    naming exactly the ranks."""
    _, send, status = STOPS[stop]
    launcher, out, processes = hanging_launches[stop]
    ranks = {pid for pid in processes if proc_stat(pid)[1] != launcher.pid}
    assert len(processes) == 3 and len(ranks) == 2, processes  # the agent and its two ranks
    with pytest.raises(FolderInUse) as refused:
        with hold_folder(out):
            pass
    assert holders_named(refused.value) == ranks

    send(launcher.pid)
    assert wait_gone(processes) == [], f"{stop}: still running"
    if status is None:  # the launcher's process goes on
        assert launcher.poll() is None
        launcher.kill()
    launcher.wait(timeout=60)
    assert launcher.returncode == (status or -signal.SIGKILL), (out.parent / "log.txt").read_text()[-3000:]
    with hold_folder(out):  # free once the last rank is gone
        pass


# ---- `llava-pipeline run --nproc 2`, killed mid-training, then run again ---------------------------------------------

MAX_STEPS = 120
RUN = {
    "nproc": 2,
    "train": {"precision": "fp32", "zero_stage": 0, "num_workers": 0, "tensorboard": False, "log_every": 1,
              "peak_flops": 1e11, "warmup_ratio": 0.0},
    "scenes": {"num": 16, "heldout": 0, "size": 32},
    "base": {
        "tokenizer": {"vocab_size": 400},
        "clip": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "embed_dim": 32,
                 "text_width": 32, "text_heads": 2, "text_layers": 1, "context_length": 40,
                 "train": {"max_steps": 2, "micro_batch_size": 4}},
        "lm": {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_hidden": 64, "block_size": 32,
               "max_seq_len": 256, "train": {"max_steps": MAX_STEPS, "micro_batch_size": 4, "lr": 1e-2,
                                             "save_every": 10}},
    },
}


def pipeline_run(config: Path, log: Path, **popen) -> subprocess.Popen:
    return start([sys.executable, "-m", "pipeline.cli", "run", "--config", str(config)], log, environment(), **popen)


def finish(process: subprocess.Popen, log: Path) -> str:
    process.wait(timeout=240)
    output = log.read_text(errors="replace")
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_sigkill_of_the_runner_alone_stops_its_ranks_and_the_rerun_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    from stages import checkpoint as ckpt

    reference = pipeline_run(run_config(tmp_path, "ref", **RUN), tmp_path / "ref.log")  # alongside the one to kill
    config = run_config(tmp_path, "run", **RUN)
    checkpoints = tmp_path / "run" / "base" / "lm_train" / "checkpoints"
    runner = pipeline_run(config, tmp_path / "killed.log", start_new_session=True)
    processes: dict[int, int] = {}
    try:
        wait_for(lambda: bool(ckpt.complete_checkpoints(checkpoints)), "a language-model checkpoint", runner,
                 tmp_path / "killed.log")
        processes = descendants(runner.pid)
        assert len(processes) == 3, processes  # torchrun's agent and two ranks
        runner.kill()
        assert wait_gone(processes) == []
        runner.wait()
    except BaseException:
        reference.kill()  # its ranks go with it
        raise
    finally:
        kill_leftovers(processes)
    # Nothing trained on after the kill: the stage's outputs were never written
    assert max(ckpt.step_of(p) for p in ckpt.checkpoint_dirs(checkpoints)) < MAX_STEPS
    assert not (tmp_path / "run" / "base" / "llm").exists() and not (tmp_path / "run" / "base" / "DONE.json").exists()

    finish(reference, tmp_path / "ref.log")
    output = finish(pipeline_run(config, tmp_path / "rerun.log"), tmp_path / "rerun.log")
    assert "[base] interrupted earlier: running it again in place" in output
    resumed_at = re.search(r"resumed from \S+/lm_train/checkpoints/step_\d+ at step (\d+)/", output)
    assert resumed_at and int(resumed_at.group(1)) >= 10, output[-4000:]  # from the checkpoint seen before the kill
    for part, weights in (("llm", "model.safetensors"), ("clip", "open_clip_model.safetensors")):
        resumed = load_file(tmp_path / "run" / "base" / part / weights)
        expected = load_file(tmp_path / "ref" / "base" / part / weights)
        assert resumed.keys() == expected.keys()
        assert all(bool((resumed[k] == expected[k]).all()) for k in expected), part  # bit for bit


@pytest.mark.slow
def test_ctrl_c_stops_the_runner_with_a_message_not_a_traceback(tmp_path):
    config = run_config(tmp_path, scenes={"num": 20000, "heldout": 0, "size": 32})  # minutes of rendering
    runner = pipeline_run(config, tmp_path / "log.txt", start_new_session=True)
    try:
        # Once the first shard is written the stage is rendering in pure Python with torch loaded (webdataset's
        # import): a Ctrl-C that lands inside numpy's or torch's own import can be swallowed or abort in their C
        # code, and exits through CPython's "interrupted by KeyboardInterrupt" path (killed by SIGINT, not 130).
        wait_for(lambda: (tmp_path / "run" / "scenes" / "train" / "shards" / "pairs-00000.tar").exists(),
                 "the scenes stage's first shard", runner, tmp_path / "log.txt", timeout=180)
        os.killpg(runner.pid, signal.SIGINT)
        runner.wait(timeout=60)
    finally:
        runner.kill()
    output = (tmp_path / "log.txt").read_text()
    assert runner.returncode == 130, output[-3000:]
    assert "interrupted. The same command resumes" in output and "Traceback" not in output
