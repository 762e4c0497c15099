"""Run a command, and SIGKILL it at a named point of its work: exactly where a power cut or an OOM killer could hit.

    python kill_at.py POINT[:N] -- module arg ...      (the module runs as `python -m module arg ...`)
    python kill_at.py --fork SPECS.json                 (several victims: [[point, module, [args]], ...])

The process kills itself (SIGKILL: no cleanup handler, no `finally`, no flush runs), so each point is hit exactly,
not by a race. POINTS lists them; each names the function it intercepts and what has happened when it dies.

`--fork` imports the modules once and forks one child per victim, so N victims pay one interpreter start and one
import of torch and DeepSpeed (the parent runs nothing but the imports). It prints {"point": exit status} as JSON;
a killed child has status -9.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _generate_after_items(n: int) -> None:
    """data_gen: after the n-th finished item is appended (and fsynced) to the cache."""
    from data_gen.driver import GenerationCache

    original, count = GenerationCache.append, [0]

    def append(self, *args, **kwargs):
        original(self, *args, **kwargs)
        count[0] += 1
        if count[0] == n:
            die()

    GenerationCache.append = append


class _TearingFile:
    """A file whose next write stops half way, as a write cut by the kill does."""

    def __init__(self, file):
        self._file = file

    def write(self, data: bytes) -> int:
        self._file.write(data[: len(data) // 2])
        self._file.flush()
        os.fsync(self._file.fileno())
        die()

    def __getattr__(self, name):
        return getattr(self._file, name)


def _generate_torn_line(n: int) -> None:
    """data_gen: while the n-th cache line is being written (half of it reaches the disk)."""
    from data_gen.driver import GenerationCache

    original, count = GenerationCache.append, [0]

    def append(self, *args, **kwargs):
        count[0] += 1
        if count[0] == n:
            self._file = _TearingFile(self._file)
        original(self, *args, **kwargs)

    GenerationCache.append = append


def _before_rename(name: str):
    """An atomic write of the file called `name`: its temporary is complete, the rename has not happened."""
    original = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            die()
        return original(src, dst, *args, **kwargs)

    os.replace = replace


def _train_after_step(n: int) -> None:
    """trainer: right after optimizer step n (between checkpoints when n is not a save step)."""
    from stages.trainer import Trainer

    original = Trainer._optimizer_step

    def step(self, *args, **kwargs):
        numbers = original(self, *args, **kwargs)
        if self.step == n:
            die()
        return numbers

    Trainer._optimizer_step = step


def _checkpoint_before_marker(n: int) -> None:
    """checkpoint save of step n: every shard and RNG file written, complete.json not yet."""
    from stages import checkpoint

    original = checkpoint.atomic_write_json

    def write(path, *args, **kwargs):
        if Path(path).name == checkpoint.MARKER and Path(path).parent.name == checkpoint.tag_for(n):
            die()
        return original(path, *args, **kwargs)

    checkpoint.atomic_write_json = write


def _checkpoint_mid_shard(n: int) -> None:
    """checkpoint save of step n: half of the model-states file is on disk."""
    import io

    import torch

    from stages import checkpoint

    original = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and checkpoint.tag_for(n) in str(f) and str(f).endswith("states.pt"):
            buffer = io.BytesIO()
            original(obj, buffer, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buffer.getvalue()[: buffer.tell() // 2])
                out.flush()
                os.fsync(out.fileno())
            die()
        return original(obj, f, *args, **kwargs)

    torch.save = save


def _checkpoint_mid_prune(n: int) -> None:
    """pruning after the save of a later step: checkpoint n has lost its marker, its files are still there."""
    from stages import checkpoint

    original = checkpoint.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path).name == checkpoint.tag_for(n):
            die()
        return original(path, *args, **kwargs)

    checkpoint.shutil.rmtree = rmtree


POINTS = {
    "generate-after-items": _generate_after_items,
    "generate-torn-cache-line": _generate_torn_line,
    "before-rename": _before_rename,
    "train-after-step": _train_after_step,
    "checkpoint-before-marker": _checkpoint_before_marker,
    "checkpoint-mid-shard": _checkpoint_mid_shard,
    "checkpoint-mid-prune": _checkpoint_mid_prune,
}


def run(point: str, module: str, args: list[str]) -> None:
    name, _, value = point.partition(":")
    POINTS[name](value if name == "before-rename" else int(value))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def fork_all(specs: list) -> dict[str, int]:
    import importlib
    import json

    for module in {module for _, module, _ in specs}:
        importlib.import_module(module)
    children = {}
    for point, module, args in specs:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                run(point, module, args)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            finally:
                sys.stdout.flush()
                os._exit(code)
        children[pid] = point
    status = {}
    for pid, point in children.items():
        _, raw = os.waitpid(pid, 0)
        status[point] = -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)
    print(json.dumps(status))
    return status


def main() -> None:
    if sys.argv[1] == "--fork":
        import json

        fork_all(json.loads(Path(sys.argv[2]).read_text()))
        return
    point, separator, module, *args = sys.argv[1:]
    assert separator == "--", __doc__
    run(point, module, args)


if __name__ == "__main__":
    main()
