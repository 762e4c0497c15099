"""A tiny LLaMA language-modelling run through the real trainer: the workload of the trainer tests.

Used in-process by the fast tests and as a subprocess (`python -m stages.launch --nproc N trainer_task:main ...`,
with this folder on PYTHONPATH) by the resume and multi-rank tests. The data is a fixed random sparse Markov chain
over 64 of the 512 token ids, each with 4 possible successors, so the loss has something to learn: it starts at
log(512) ≈ 6.2 and can fall towards log(4) ≈ 1.4.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from llava.io import atomic_save_safetensors, atomic_write_json
from llava.model import Llama
from stages.config import apply_override, bind
from stages.checkpoint import consolidate_checkpoint
from stages.trainer import TrainConfig, Trainer

VOCAB = 512  # the "tiny" preset's vocabulary
POISON = VOCAB - 1  # never produced by the chain; a sample holding it gets a NaN loss
SUBSET_PREFIX = "llm.layers.1."  # what the subprocess runs also export alone (like a projector or adapter)


class MarkovTokens(Dataset):
    def __init__(self, samples: int, seq_len: int, seed: int = 0, states: int = 64, successors: int = 4):
        table = torch.randint(0, states, (states, successors), generator=torch.Generator().manual_seed(1234))
        gen = torch.Generator().manual_seed(seed)  # which sequences; the chain itself is fixed
        seqs = torch.empty(samples, seq_len, dtype=torch.long)
        seqs[:, 0] = torch.randint(0, states, (samples,), generator=gen)
        for t in range(1, seq_len):
            pick = torch.randint(0, successors, (samples,), generator=gen)
            seqs[:, t] = table[seqs[:, t - 1], pick]
        self.seqs = seqs

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.seqs[i], "id": f"seq-{i}"}


class StreamedMarkovTokens(IterableDataset):
    """The same samples as a stream (like webdataset shards): shuffled per epoch, `claimed_len` may overstate it."""

    def __init__(self, samples: int, seq_len: int, claimed_len: int | None = None):
        self.source = MarkovTokens(samples, seq_len)
        self.claimed_len = claimed_len if claimed_len is not None else samples
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.claimed_len

    def __iter__(self):
        order = torch.randperm(len(self.source), generator=torch.Generator().manual_seed(100 + self.epoch))
        return (self.source[int(i)] for i in order)


def collate(samples: list[dict]) -> dict:
    ids = torch.stack([s["input_ids"] for s in samples])
    return {"input_ids": ids, "labels": ids.clone(), "ids": [s["id"] for s in samples]}


class CausalLM(nn.Module):
    """Next-token loss around our Llama.

    `label_dropout` drops that fraction of the labels at random while training, drawn from the global torch RNG,
    so a resumed run only matches an uninterrupted one if the RNG state was restored too. `poison_token` in a batch
    makes its loss NaN (for the NaN test).
    """

    def __init__(self, llm: Llama, poison_token: int | None = None, label_dropout: float = 0.0):
        super().__init__()
        self.llm = llm
        self.poison_token = poison_token
        self.label_dropout = label_dropout

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self.llm(input_ids)
        targets = labels[:, 1:]
        if self.training and self.label_dropout:
            targets = targets.masked_fill(torch.rand(targets.shape) < self.label_dropout, -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten())
        if self.poison_token is not None and bool((input_ids == self.poison_token).any()):
            loss = loss * float("nan")
        return {"loss": loss, "logits": logits}


def build_model(seed: int = 0, frozen_prefixes: tuple[str, ...] = (), poison_token: int | None = None,
                label_dropout: float = 0.0) -> CausalLM:
    model = CausalLM(Llama.from_name("tiny").init_weights(seed=seed), poison_token, label_dropout)
    for name, p in model.named_parameters():
        if name.startswith(frozen_prefixes):
            p.requires_grad_(False)
    return model


def make_trainer(overrides: dict, *, samples: int = 64, seq_len: int = 32, frozen_prefixes: tuple[str, ...] = (),
                 poison_sample: int | None = None, hang_at_step: int | None = None, label_dropout: float = 0.0,
                 eval_every_loss: bool = False, dataset: Dataset | None = None, sampler=None,
                 collate_fn=collate) -> Trainer:
    cfg = bind(TrainConfig, {"precision": "fp32", "num_workers": 0, "warmup_ratio": 0.0, "lr": 1e-2,
                             "peak_flops": 1e11, "tensorboard": False, **overrides}, "test train config")
    model = build_model(0, frozen_prefixes, POISON if poison_sample is not None else None, label_dropout)
    dataset = dataset if dataset is not None else MarkovTokens(samples, seq_len)
    if poison_sample is not None:
        dataset.seqs[poison_sample, seq_len // 2] = POISON

    def hang(model, step, total_steps):  # stands still so the test can SIGKILL the run mid-way, after a checkpoint
        if step == hang_at_step:
            (Path(cfg.output_dir) / "hanging").write_text(str(step))
            time.sleep(3600)

    held_out = collate([MarkovTokens(8, seq_len, seed=1)[i] for i in range(8)])

    def evaluate(model, step):
        with torch.no_grad():
            device = next(model.parameters()).device
            out = model(held_out["input_ids"].to(device), held_out["labels"].to(device))
        return {"loss": float(out["loss"])}

    return Trainer(cfg, model, dataset, collate_fn=collate_fn, sampler=sampler,
                   after_optimizer_step=hang if hang_at_step is not None else None,
                   eval_fn=evaluate if eval_every_loss else None)


def train(overrides: dict, **options):
    """Build and train; return (trainer, result)."""
    trainer = make_trainer(overrides, **options)
    return trainer, trainer.fit()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("overrides", nargs="*", help="TrainConfig key=value")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--hang-at-step", type=int)
    parser.add_argument("--freeze", default="", help="comma-separated parameter name prefixes to freeze")
    parser.add_argument("--label-dropout", type=float, default=0.0)
    args = parser.parse_args(argv)
    overrides: dict = {}
    for item in args.overrides:
        apply_override(overrides, item)
    frozen = tuple(p for p in args.freeze.split(",") if p)
    trainer, result = train(overrides, samples=args.samples, hang_at_step=args.hang_at_step, frozen_prefixes=frozen,
                            label_dropout=args.label_dropout)
    out = Path(trainer.cfg.output_dir)
    rank = trainer.dist.rank
    atomic_save_safetensors(trainer.state_dict(rank0_only=False), out / f"weights_rank{rank}.safetensors")
    subset = trainer.state_dict(lambda name: name.startswith(SUBSET_PREFIX))  # collective; filled on rank 0
    if rank == 0:
        atomic_save_safetensors(subset, out / "subset.safetensors")
        atomic_save_safetensors(consolidate_checkpoint(result.checkpoint), out / "consolidated.safetensors")
        atomic_write_json(out / "result.json", {"step": result.step, "metrics": result.metrics,
                                                "world_size": trainer.dist.world_size})
    return 0



# ---- running the task as separate processes (resume and multi-rank tests) ------------------------------------

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def process_env() -> dict:
    """This environment minus any launcher variables, with this folder importable and one thread per rank."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(HERE), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def task_command(overrides: list[str], nproc: int = 1, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "stages.launch", "--nproc", str(nproc), "trainer_task:main", *overrides, *extra]


def run_task(overrides: list[str], nproc: int = 1, timeout: float = 300) -> dict:
    """Run to completion; return result.json (raises with the output on failure)."""
    done = subprocess.run(task_command(overrides, nproc), env=process_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"trainer task failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}")
    out = next(item.split("=", 1)[1] for item in overrides if item.startswith("output_dir="))
    return json.loads((Path(out) / "result.json").read_text())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
