"""Block-wise absmax quantisation in plain torch (no CUDA-only library): NF4 (4-bit NormalFloat, two codes per byte)
and symmetric 8-bit, as used by LoftQ / QLoRA.

The weight is flattened, cut into blocks of `block_size` values, each block divided by its largest magnitude and every
value replaced by the index of the nearest code-book entry. Storage: uint8 codes (packed two per byte for 4 bits) plus
one float32 absmax per block — for NF4 with blocks of 64 that is 0.5 + 4/64 bytes per weight, 14 % of float32.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

_CHUNK = 1 << 22  # values quantised at a time, bounding the temporary int64 index tensor


def nf4_code_book() -> torch.Tensor:
    """The 16 NF4 levels: quantiles of N(0, 1) (8 positive, 7 negative, and an exact zero) scaled to [-1, 1]
    (QLoRA, Dettmers et al. 2023; bitsandbytes' `create_normal_map` with offset 0.9677083)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat((negative, torch.zeros(1, dtype=torch.float64), positive)).sort().values
    return (levels / levels.max()).float()


def int8_code_book() -> torch.Tensor:
    """255 evenly spaced levels in [-1, 1] (symmetric int8: code k means k/127)."""
    return torch.arange(-127, 128, dtype=torch.float32) / 127


@functools.lru_cache(maxsize=None)
def _cpu_code_book(bits: int) -> torch.Tensor:
    if bits == 4:
        return nf4_code_book()
    if bits == 8:
        return int8_code_book()
    raise ValueError(f"bits={bits} is not supported (4: NF4, 8: int8)")


def code_book(bits: int, device=None) -> torch.Tensor:
    book = _cpu_code_book(bits)
    return book if device is None else book.to(device)


@dataclass
class Quantized:
    codes: torch.Tensor  # uint8; for 4 bits two codes per byte (high nibble first)
    absmax: torch.Tensor  # float32 [n_blocks]
    shape: tuple[int, ...]
    bits: int
    block_size: int

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.absmax.numel() * self.absmax.element_size()


def quantize(weight: torch.Tensor, bits: int = 4, block_size: int = 64) -> Quantized:
    book = code_book(bits, weight.device)
    flat = weight.detach().float().reshape(-1)
    pad = (-flat.numel()) % block_size
    if bits == 4:
        pad += (-(flat.numel() + pad)) % 2
    blocks = torch.cat((flat, flat.new_zeros(pad))).view(-1, block_size) if pad else flat.view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).reshape(-1)
    midpoints = (book[1:] + book[:-1]) / 2
    codes = torch.empty(scaled.numel(), dtype=torch.uint8, device=weight.device)
    for start in range(0, scaled.numel(), _CHUNK):
        codes[start:start + _CHUNK] = torch.bucketize(scaled[start:start + _CHUNK], midpoints).to(torch.uint8)
    if bits == 4:
        codes = (codes[0::2] << 4) | codes[1::2]
    return Quantized(codes, absmax, tuple(weight.shape), bits, block_size)


def dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_tensors(q.codes, q.absmax, code_book(q.bits, q.absmax.device), q.shape, q.block_size, dtype)


def dequantize_tensors(codes: torch.Tensor, absmax: torch.Tensor, book: torch.Tensor, shape, block_size: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`book` has 16 entries for packed 4-bit codes, 255 for 8-bit ones."""
    if book.numel() == 16:
        codes = torch.stack((codes >> 4, codes & 0x0F), dim=1).reshape(-1)
    values = book[codes.long()].view(-1, block_size) * absmax[:, None]
    numel = 1
    for d in shape:
        numel *= d
    return values.reshape(-1)[:numel].view(shape).to(dtype)
