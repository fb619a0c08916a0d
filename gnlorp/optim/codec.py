"""Blockwise 8-bit codes for Adam moments, in bitsandbytes' format, with an encoder that fuses and compiles.

A moment of n values is stored as n uint8 codes into a 256-value map and one fp32 scale (the absolute maximum)
per block of BLOCKSIZE values: value ≈ map[code] · absmax. The maps are bitsandbytes' dynamic maps
(`create_dynamic_map`): signed for the first moment, unsigned for the second, whose values are all ≥ 0. So
the bytes are those bitsandbytes reads and writes, and `dequantize_blockwise` decodes them.

Encoding takes the nearest code to value/absmax. Instead of a search over the map, a table indexed by the
value's top 16 bits (its bfloat16 pattern) gives the nearest code of the bucket's lowest value; a bucket is
0.8% of its value wide and the maps are never finer than 1.4%, so at most one midpoint between codes lies
inside, and one comparison with it finishes the job. That is two gathers and a compare per value, with no
loop, so `torch.compile` fuses it with Adam's update into a single pass (kernels.py).

Two choices differ from bitsandbytes' CPU encoder, whose table search returns a code several steps from the
nearest for values under about 1e-4 of their block's maximum: ours is always the nearest; and a positive
second-moment value never takes the zero code (it takes the smallest non-zero one), because Adam divides by
its square root and a first moment that is not zero would then be divided by eps alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

BLOCKSIZE = 256
_BUCKETS = 1 << 16  # one per bfloat16 pattern


@dataclass(frozen=True)
class CodeMap:
    """A map's values and the tables that encode into it, on one device."""

    values: torch.Tensor  # 256 sorted fp32 values in [-1, 1]
    base: torch.Tensor  # int32, one per bucket: the nearest code to the bucket's lowest value
    midpoints: torch.Tensor  # fp32, between consecutive values, then +inf (so base + 1 never overflows)
    zero: int  # the code of 0.0, for padding a partial block

    @property
    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, base, midpoints): what `decode` and `encode` take, as tensors a compiled kernel can read."""
        return self.values, self.base, self.midpoints


@cache
def code_map(signed: bool, device: torch.device | str = "cpu") -> CodeMap:
    """The dynamic map for the first (signed) or second (unsigned) moment, with its encoding tables."""
    from bitsandbytes.functional import create_dynamic_map

    values = create_dynamic_map(signed=signed).float()
    if signed:
        # bitsandbytes' map stops at -0.993 while it reaches +1; its CPU encoder sets -1 in place, and so do we,
        # so a block whose maximum is negative stores that maximum exactly, as it does a positive one.
        values[0] = -1.0
    midpoints = (values[1:] + values[:-1]) / 2
    patterns = (torch.arange(_BUCKETS, dtype=torch.int64) - _BUCKETS // 2).to(torch.int32) << 16
    # The bucket's lowest value: the pattern itself when positive, with every lower bit set when negative.
    lowest = torch.where(patterns < 0, patterns | 0xFFFF, patterns).view(torch.float32)
    finite = torch.isfinite(lowest)
    base = torch.searchsorted(midpoints, torch.where(finite, lowest, 0.0))  # midpoints below the lowest value
    if not signed:
        base = torch.where(lowest > 0, base.clamp_min(1), base)  # a positive value never takes the zero code
    highest = torch.where(patterns < 0, patterns, patterns | 0xFFFF).view(torch.float32)
    inside = torch.searchsorted(midpoints, torch.where(finite, highest, 0.0)) - torch.searchsorted(
        midpoints, torch.where(finite, lowest, 0.0))
    if int(inside.max()) > 1:
        raise AssertionError("a bfloat16 bucket holds two midpoints of the map; the one-compare encoder needs one")
    return CodeMap(
        values=values.to(device),
        base=base.to(torch.int32).to(device),
        midpoints=torch.cat([midpoints, torch.tensor([float("inf")])]).to(device),
        zero=int((values == 0).nonzero()[0]),
    )


def decode(codes: torch.Tensor, absmax: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """fp32 values of `codes` (a whole number of blocks), shaped (blocks, BLOCKSIZE)."""
    return tables[0][codes.view(-1, BLOCKSIZE).int()] * absmax[:, None]


def encode(values: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8) and per-block absmax of `values`, which is shaped (blocks, BLOCKSIZE)."""
    _, base, midpoints = tables
    absmax = values.abs().amax(dim=1)
    normalized = values / torch.where(absmax > 0, absmax, 1.0)[:, None]
    bucket = (normalized.view(torch.int32) >> 16) + _BUCKETS // 2
    code = base[bucket]
    code = code + (normalized > midpoints[code]).int()
    return code.to(torch.uint8), absmax
