"""Length-grouped batching by modality, as LLaVA's `group_by_modality_length`, for one rank of many.

Each epoch (order fixed by seed + epoch): the samples of one modality (with images / text only) are shuffled and cut
into pools; each pool is sorted by length, longest first, and cut into optimizer steps (batch_size x world_size x
grad_accum samples), each step's per-rank batches holding neighbouring lengths, so padding stays small; the optimizer
steps of both modalities are then shuffled together. A step never mixes modalities.

Pool size: LLaVA's mega-batch is one optimizer step (`group_batches=1` here). Padding then depends on how many
per-device batches share a sorted pool: with 8 (16 per GPU x 8 GPUs) a LLaVA-1.5-like length mix wastes ~9 % of the
positions, on one GPU ~37 %. The default pools at least 32 per-device batches (rounded up to whole optimizer steps),
which keeps waste near 2-3 % (bench/data_throughput.py measures it).

Every rank builds the same global order and takes its own batches (batch r of each step goes to rank r), like
DistributedSampler; same-step batches on different ranks have neighbouring lengths, so ranks wait little on each
other. A modality's last, partial pool is filled up to whole steps by repeating its own samples, so all ranks get the
same number of batches. One modality alone works the same.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class ModalityLengthGroupedSampler(Sampler[int]):
    def __init__(self, lengths: Sequence[int], has_image: Sequence[bool] | None = None, *, batch_size: int,
                 world_size: int = 1, rank: int = 0, grad_accum: int = 1, group_batches: int = 32, seed: int = 0):
        if not len(lengths):
            raise ValueError("ModalityLengthGroupedSampler: no samples")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if min(batch_size, grad_accum, group_batches) < 1:
            raise ValueError(f"batch_size ({batch_size}), grad_accum ({grad_accum}) and group_batches "
                             f"({group_batches}) must be >= 1")
        self.lengths = [int(n) for n in lengths]
        self.has_image = [True] * len(self.lengths) if has_image is None else [bool(h) for h in has_image]
        if len(self.has_image) != len(self.lengths):
            raise ValueError(f"{len(self.lengths)} lengths but {len(self.has_image)} modality flags")
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.step_size = batch_size * world_size
        self.optimizer_step_size = self.step_size * grad_accum
        self.pool_size = self.optimizer_step_size * -(-group_batches // (world_size * grad_accum))
        self.seed, self.epoch = seed, 0

    @classmethod
    def from_signed_lengths(cls, modality_lengths: Sequence[int], **kwargs) -> "ModalityLengthGroupedSampler":
        """LLaVA's convention: positive lengths for samples with images, negative for text-only ones."""
        return cls([abs(n) for n in modality_lengths], [n > 0 for n in modality_lengths], **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[list[int]]]:
        """All ranks' batches this epoch, as steps: `[step][rank] -> indices`."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        units: list[list[int]] = []  # optimizer steps: sorted, single-modality runs of samples
        for flag in (True, False):
            group = [i for i, h in enumerate(self.has_image) if h == flag]
            if not group:
                continue
            shuffled = [group[int(k)] for k in torch.randperm(len(group), generator=generator)]
            for start in range(0, len(shuffled), self.pool_size):
                pool = shuffled[start:start + self.pool_size]
                if len(pool) % self.step_size:  # fill to whole steps with this pool's own samples
                    pool += [pool[k % len(pool)] for k in range(self.step_size - len(pool) % self.step_size)]
                pool.sort(key=lambda i: -self.lengths[i])
                units += [pool[k:k + self.optimizer_step_size] for k in range(0, len(pool), self.optimizer_step_size)]
        steps = []
        for unit in (units[k] for k in torch.randperm(len(units), generator=generator).tolist()):
            for start in range(0, len(unit), self.step_size):
                step = unit[start:start + self.step_size]
                steps.append([step[r * self.batch_size:(r + 1) * self.batch_size] for r in range(self.world_size)])
        return steps

    def batches(self) -> list[list[int]]:
        """This rank's batches this epoch, in order."""
        return [step[self.rank] for step in self.global_batches()]

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self.batches() for i in batch])

    def __len__(self) -> int:
        total = 0
        for flag in (True, False):
            full, rest = divmod(sum(1 for h in self.has_image if h == flag), self.pool_size)
            total += full * self.pool_size + -(-rest // self.step_size) * self.step_size
        return total // self.world_size


def padding_waste(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of a right-padded batch's positions that are padding, over all `batches` (0 = none)."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / padded if padded else 0.0
