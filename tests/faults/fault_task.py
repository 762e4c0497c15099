"""A tiny language-modelling run through the real trainer (stages/trainer.py), with switchable faults.

In-process: `train(out_dir, **settings)`. As a subprocess (the kill tests): `python fault_task.py OUT key=value ...`,
usually under `kill_at.py`, which SIGKILLs the process at a named point.

Faults (`poison`): "nan" makes the loss NaN for batches holding sample `poison_sample`; "inf_grad" keeps the loss
finite but makes one gradient infinite for them; "huge" multiplies the loss of every batch after the first
`poison_after` micro-batches by 1e6, so fp16 gradients overflow at any loss scale.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from llava.model import Llama
from stages.config import apply_override, bind
from stages.trainer import TrainConfig, Trainer

SEQ_LEN = 16


class RandomTokens(Dataset):
    def __init__(self, samples: int, seed: int = 0):
        self.seqs = torch.randint(0, 64, (samples, SEQ_LEN), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.seqs[i], "id": f"sample-{i}", "index": i}


def collate(samples: list[dict]) -> dict:
    ids = torch.stack([s["input_ids"] for s in samples])
    return {"input_ids": ids, "index": torch.tensor([s["index"] for s in samples]), "ids": [s["id"] for s in samples]}


class _InfiniteGradient(torch.autograd.Function):
    """0 in the forward pass (the loss stays finite); an infinite gradient for its input in the backward pass."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("inf"), dtype=grad.dtype, device=grad.device)


class FaultyLM(nn.Module):
    def __init__(self, poison: str | None, poison_sample: int | None, poison_after: int):
        super().__init__()
        self.llm = Llama.from_name("tiny").init_weights(seed=0)
        self.poison, self.poison_sample, self.poison_after = poison, poison_sample, poison_after
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, index: torch.Tensor) -> dict:
        self.calls += 1
        logits = self.llm(input_ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
        hit = self.poison_sample is not None and bool((index == self.poison_sample).any())
        if hit and self.poison == "nan":
            loss = loss * float("nan")
        elif hit and self.poison == "inf_grad":
            loss = loss + _InfiniteGradient.apply(self.llm.norm.weight)
        elif self.poison == "huge" and self.calls > self.poison_after:
            loss = loss * 1e6
        return {"loss": loss, "logits": logits}


def make_trainer(out_dir: str | Path, *, samples: int = 48, poison: str | None = None, poison_sample: int | None = None,
                 poison_after: int = 0, **settings) -> Trainer:
    cfg = bind(TrainConfig, {"output_dir": str(out_dir), "precision": "fp32", "num_workers": 0, "warmup_ratio": 0.0,
                             "lr": 1e-2, "micro_batch_size": 4, "peak_flops": 1e11, "tensorboard": False,
                             "log_every": 1, **settings}, "fault task train config")
    return Trainer(cfg, FaultyLM(poison, poison_sample, poison_after), RandomTokens(samples), collate_fn=collate)


def train(out_dir: str | Path, **settings):
    trainer = make_trainer(out_dir, **settings)
    return trainer, trainer.fit()


def data_order(samples: int = 48, seed: int = 42) -> list[int]:
    """Epoch 0's sample order as the trainer feeds one rank: its default sampler (DistributedSampler, cfg.seed)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(samples), num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(0)
    return list(sampler)


def main(argv: list[str]) -> int:
    out, *overrides = argv
    settings: dict = {}
    for item in overrides:
        apply_override(settings, item)
    train(out, **settings)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
