"""Run a stage in this process, or as N ranks on this machine through torchrun.

A stage's `main(argv)` calls `run(main_body, argv, nproc)`: with `nproc` 1, or when this process already is a rank
of a launcher (torchrun, `deepspeed`, mpirun), the body runs here; otherwise torchrun starts N copies
of it with the same argv, each joining one process group (gloo on CPU, NCCL on GPUs), and this process waits.

The ranks never outlive this process (stages/lifeline.py): torchrun's agent runs in a session of its own and dies
with this process, the ranks die with the agent. SIGTERM, SIGINT or SIGHUP sent to this process is passed to the
agent, which stops the ranks; once they are gone this process stops as the signal asks (docs/reliability.md).

From the shell, the same thing:

    python -m stages.launch --nproc 2 stages.instruct:main --config run.yaml        # torchrun underneath
    torchrun --nproc-per-node 8 -m stages.launch stages.instruct:main --config run.yaml
    deepspeed --num_gpus 8 --module stages.launch stages.instruct:main --config run.yaml
    deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 --module stages.launch stages.instruct:main ...

(see docs/training.md for multi-node details).
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import threading
from typing import Callable

from stages import lifeline

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # passed on to the ranks before this process stops


def launched_world_size() -> int:
    """Ranks of the launch this process belongs to (1 when started by hand): torchrun and `deepspeed` export
    WORLD_SIZE, mpirun OMPI_COMM_WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or 1)


def launched_rank() -> bool:
    """True inside a multi-rank launch: spawning ranks again would nest launchers."""
    return launched_world_size() > 1


def torchrun_args(nproc: int, target: str, argv: list[str]) -> list[str]:
    return ["--standalone", f"--nproc-per-node={nproc}", "-m", "stages.launch", target, *argv]


def agent_command(nproc: int, target: str, argv: list[str]) -> list[str]:
    """torchrun's agent, started through `agent()` below so that it dies with this process."""
    return [sys.executable, "-m", "stages.launch", "--agent", "--nproc", str(nproc), target, *argv]


def agent(nproc: int, target: str, argv: list[str]) -> int:
    """The torchrun agent, in the process the launcher started: it dies with the launcher (SIGTERM, which torchrun
    answers by stopping its ranks), and its ranks with it (`keep_with_launcher`)."""
    lifeline.die_with_parent(int(os.environ[lifeline.LAUNCHER_PID]), signal.SIGTERM)  # before seconds of imports
    os.environ[lifeline.AGENT_PID] = str(os.getpid())
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun(torchrun_args(nproc, target, argv))
    except SignalException as e:  # the ranks are stopped; torchrun has logged it
        return 128 + int(e.sigval)
    return 0


def keep_with_launcher() -> None:
    """In a rank: die with the agent that started it, and hold the output folder's lock while alive. The agent is
    named in the environment by `agent()`; a rank of a torchrun started by hand watches its parent, that torchrun."""
    if lifeline.AGENT_PID in os.environ:
        lifeline.die_with_parent(int(os.environ[lifeline.AGENT_PID]), signal.SIGKILL)
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        lifeline.die_with_parent(os.getppid(), signal.SIGKILL)
    lifeline.join_folder()


def run_ranks(nproc: int, target: str, argv: list[str]) -> int:
    """Start the agent and wait for it. The agent runs in a session of its own, so the terminal's Ctrl-C and a kill of
    our process group reach this process only: a stop signal here becomes a SIGTERM to the agent (torchrun passes it
    to the ranks, which die at once), and is raised again here once the ranks are gone."""
    command = agent_command(nproc, target, argv)
    print(f"[launch] {' '.join(command)}", file=sys.stderr, flush=True)
    received: list[int] = []
    process: subprocess.Popen | None = None

    def pass_on(signum, frame):
        received.append(signum)
        if process is not None:
            process.send_signal(signal.SIGTERM)

    handled = {}
    if threading.current_thread() is threading.main_thread():
        handled = {sig: signal.signal(sig, pass_on) for sig in STOP_SIGNALS  # an ignored signal stays ignored
                   if signal.getsignal(sig) not in (signal.SIG_IGN, None)}  # None: a handler set outside Python
    try:
        process = subprocess.Popen(command, env={**os.environ, lifeline.LAUNCHER_PID: str(os.getpid())},
                                   start_new_session=True)
        if received:  # stopped while the agent was being started
            process.send_signal(signal.SIGTERM)
        code = process.wait()
    finally:
        for sig, previous in handled.items():
            signal.signal(sig, previous)
        if process is not None and process.poll() is None:  # an exception left the wait (e.g. a test's timeout)
            process.send_signal(signal.SIGTERM)
            process.wait()
    if received:
        print(f"[launch] {signal.Signals(received[0]).name}: ranks stopped (agent exit code {code})",
              file=sys.stderr, flush=True)
        signal.raise_signal(received[0])  # to the handler it had before: by default SIGTERM ends us, SIGINT raises
    return code


def target_of(function: Callable) -> str:
    module = function.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise ValueError("cannot spawn ranks of a function defined in a script run by path; run it with "
                             "`python -m package.module` or put it in an importable module")
        module = spec.name
    return f"{module}:{function.__qualname__}"


def resolve(target: str) -> Callable[[list[str]], int]:
    module, sep, name = target.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"launch target {target!r} must look like package.module:function")
    function = importlib.import_module(module)
    for part in name.split("."):
        function = getattr(function, part)
    return function


def finish_process_group() -> None:
    """After a rank's body returned: wait for every rank, then tear the process group down here, in order. A rank that
    simply exits while rank 0 still writes (consolidation, result files) can abort at interpreter exit ("terminate
    called without an active exception") when gloo's threads are destroyed with the process group still alive."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run(main: Callable[[list[str]], int], argv: list[str], nproc: int = 1) -> int:
    """`main(argv)` here, or in `nproc` torchrun ranks (returns the launcher's exit code)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if nproc == 1 or launched_rank():
        world = launched_world_size()
        if nproc > 1 and world != nproc and int(os.environ.get("RANK", "0")) == 0:
            print(f"[launch] already running as one of {world} ranks of a launcher; ignoring --nproc {nproc}",
                  file=sys.stderr)
        code = int(main(argv) or 0)
        finish_process_group()
        return code
    return run_ranks(nproc, target_of(main), argv)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=1, help="ranks to start on this machine (torchrun)")
    # The `deepspeed` launcher passes --local_rank=N to each rank (LOCAL_RANK is in the environment as well).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)  # run_ranks' torchrun agent
    parser.add_argument("target", help="package.module:function taking argv (list[str]) and returning an exit code")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed to the function unchanged")
    args = parser.parse_args(argv)
    if args.agent:
        return agent(args.nproc, args.target, args.args)
    if launched_rank():
        keep_with_launcher()  # before the stage's imports, which take seconds
    return run(resolve(args.target), args.args, args.nproc)


if __name__ == "__main__":
    sys.exit(cli())
