"""Ranks never outlive the process that launched them, and hold their output folder's lock while they run.

`--nproc N` starts three levels of processes: the launcher (the stage command or `llava-pipeline run`), torchrun's
agent, and the N ranks. torchrun starts each rank in a session of its own, so a signal to the launcher's process group
(a scheduler's SIGKILL of the job step, a closed ssh session) never reaches the ranks; and a launcher that simply dies
(`kill -9`, the OOM killer) leaves its agent and ranks training on. Each level below the launcher therefore dies with
its parent (`die_with_parent`), by two mechanisms:

- the kernel's parent-death signal (Linux `prctl(PR_SET_PDEATHSIG)`), sent the moment the parent exits, even while
  this process is busy in C code. It is tied to the parent *thread* that started the process: the launcher and
  torchrun both start their children from the thread that then waits for them, so it fires exactly on their exit;
- a watchdog thread that sees its parent pid change within `WATCH_PERIOD_S` (also where prctl does not exist).

The agent gets SIGTERM (torchrun then stops its ranks itself, in order), a rank SIGKILL (nothing is left to stop in
order; checkpoints are complete only once marked, so a kill at any point loses nothing finished).

The folder lock (`hold_folder`): the launcher takes an exclusive `flock` on `<out_dir>/.lock` to be sure nobody else
uses the folder, then turns it into a shared one that each rank joins (`join_folder`, from the path in the
environment). The kernel drops each process's share when that process ends, however it ends, so the folder stays
locked while any rank of the run is alive, and another launcher is refused with the pids that still hold it.
Locks are per folder, so a stage command also checks the folders around its own (`check_free`): one aimed at a stage
folder of a running `llava-pipeline run` is refused, as is the run's stage while a stage command writes there.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Iterator

LAUNCHER_PID = "LLAVA_LAUNCHER_PID"  # in the agent's environment: the process it must not outlive
AGENT_PID = "LLAVA_AGENT_PID"  # in the ranks' environment: the torchrun agent they must not outlive
FOLDER_LOCK = "LLAVA_FOLDER_LOCK"  # in the ranks' environment: the lock file of the folder they write into
WATCH_PERIOD_S = 0.5
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_joined: list[IO] = []  # this rank's open lock file: its share of the lock lasts as long as the file stays open


def die_with_parent(parent: int, sig: signal.Signals) -> None:
    """Receive `sig` as soon as process `parent`, this process's parent, is gone (at once if it already is)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    threading.Thread(target=_watch_parent, args=(parent, sig), name="parent-watch", daemon=True).start()


def _watch_parent(parent: int, sig: signal.Signals) -> None:
    # Checked once before sleeping: a parent that died before prctl above was set sends no signal.
    while os.getppid() == parent:
        time.sleep(WATCH_PERIOD_S)
    print(f"[launch] pid {os.getpid()}: the process that started it ({parent}) is gone; stopping with "
          f"{sig.name}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), sig)


def lock_holders(path: Path) -> list[int]:
    """Pids holding a `flock` on `path`, from the kernel's table (/proc/locks; empty where there is none)."""
    stat = os.stat(path)
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids = set()
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:  # "->" lines (waiters) are skipped
            pids.add(int(fields[4]))
    return sorted(pids)


def describe(pid: int) -> str:
    """`pid 123 (python -m stages.launch stages.base:main ...)`: which process that is, for an error message."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return f"pid {pid}"
    return f"pid {pid} ({command[:100] + ' ...' if len(command) > 100 else command})"


class FolderInUse(RuntimeError):
    """Another launcher, or a rank of one, still holds the folder's lock. The message names the pids."""


def _refuse(path: Path) -> FolderInUse:
    holders = lock_holders(path)
    who = ", ".join(describe(pid) for pid in holders) if holders else "another process"
    return FolderInUse(f"{path.parent} is in use by {who}: wait for {'them' if len(holders) > 1 else 'it'} to "
                       f"finish (or stop {'them' if len(holders) > 1 else 'it'}), or use another folder. Ranks of a "
                       "stopped launcher stop within a second of it")


@contextlib.contextmanager
def hold_folder(folder: Path) -> Iterator[None]:
    """Lock `folder` for this launcher and the ranks it starts (they inherit `FOLDER_LOCK` and join); raise
    FolderInUse if any process of another launch still holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    previous = os.environ.get(FOLDER_LOCK)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else, not even a leftover rank
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # now shared, for our own ranks to join
        except BlockingIOError:
            raise _refuse(path) from None
        os.environ[FOLDER_LOCK] = str(path.resolve())
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(FOLDER_LOCK, None)
            else:
                os.environ[FOLDER_LOCK] = previous


def check_free(folder: Path) -> None:
    """Raise FolderInUse if a process holds `folder`'s lock (a launch writing into it); touch nothing otherwise. The
    lock is tried exclusively and let go at once: a shared try would succeed beside a running launch."""
    path = folder / ".lock"
    try:
        handle = open(path)
    except OSError:  # none (never locked this way), or not ours to read: nothing to check
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refuse(path) from None
        fcntl.flock(handle, fcntl.LOCK_UN)


def join_folder() -> None:
    """In a rank: share the lock of the folder named by `FOLDER_LOCK` until this process ends (no-op without it).
    Its launcher holds the lock already; failing to join means another launch took the folder: stop."""
    path = os.environ.get(FOLDER_LOCK)
    if not path or _joined:
        return
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise _refuse(Path(path)) from None
    _joined.append(handle)
