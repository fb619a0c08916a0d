"""Blockwise 8- and 4-bit codes for Adam moments, with an encoder that fuses and compiles.

A moment of n values is stored as codes into a small map of values in [-1, 1] and one fp32 scale (the absolute
maximum) per block: value ≈ map[code] · absmax. 8-bit: one code per byte, blocks of 256, bitsandbytes' dynamic
maps (`create_dynamic_map`: signed for the first moment, unsigned for the second), so the bytes are those
bitsandbytes reads and writes. 4-bit: two codes per byte (the first in the high half), blocks of 128, the 4-bit
optimizer-states paper's dynamic-exponent maps (arXiv 2309.01507): signed for the first moment and, for the
second, unsigned with its zero replaced by half its smallest value (the paper's DE-0: Adam divides by the second
moment's square root, and a zero there turns a first moment into M/eps). On the tiny LLaMA test it learns closer
to 32-bit than the linear 1/16 … 16/16 map torchao uses (GaLore's loss after 60 steps 1.36 against 1.73; 32-bit
1.20).

Encoding takes the nearest code to value/absmax. Instead of a search over the map, a table indexed by the
value's top 16 bits (its bfloat16 pattern) gives the nearest code of the bucket's lowest value; a bucket is
0.8% of its value wide and the maps are never finer than 1.4%, so at most one midpoint between codes lies
inside, and one comparison with it finishes the job. That is two gathers and a compare per value, with no
loop, so `torch.compile` fuses it with Adam's update into a single pass (kernels.py).

Two choices differ from bitsandbytes' CPU encoder, whose table search returns a code several steps from the
nearest for values under about 1e-4 of their block's maximum: ours is always the nearest; and a positive
8-bit second-moment value never takes the zero code (it takes the smallest non-zero one), for the same reason
the 4-bit map has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

BLOCKSIZE = {8: 256, 4: 128}  # values per block (one fp32 scale each)
_BUCKETS = 1 << 16  # one per bfloat16 pattern


@dataclass(frozen=True)
class CodeMap:
    """A map's values and the tables that encode into it, on one device."""

    values: torch.Tensor  # 256 or 16 sorted fp32 values in [-1, 1]
    base: torch.Tensor  # int32, one per bucket: the nearest code to the bucket's lowest value
    midpoints: torch.Tensor  # fp32, between consecutive values, then +inf (so base + 1 never overflows)
    zero: int  # the code nearest 0.0, for padding a partial block

    @property
    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, base, midpoints): what `decode` and `encode` take, as tensors a compiled kernel can read."""
        return self.values, self.base, self.midpoints


def map_values(signed: bool, bits: int) -> torch.Tensor:
    """The sorted values a moment's codes stand for (module docstring)."""
    from bitsandbytes.functional import create_dynamic_map

    if bits == 4:
        values = torch.unique(create_dynamic_map(signed=signed, max_exponent_bits=3, total_bits=4).float())
        if not signed:  # no zero: it becomes half the smallest positive value (the paper's DE-0, 16 codes kept)
            values[0] = values[1] / 2
        return values
    values = create_dynamic_map(signed=signed).float()
    if signed:
        # bitsandbytes' map stops at -0.993 while it reaches +1; its CPU encoder sets -1 in place, and so do we,
        # so a block whose maximum is negative stores that maximum exactly, as it does a positive one.
        values[0] = -1.0
    return values


@cache
def code_map(signed: bool, device: torch.device | str = "cpu", bits: int = 8) -> CodeMap:
    """The map for the first (signed) or second (unsigned) moment at `bits`, with its encoding tables."""
    values = map_values(signed, bits)
    midpoints = (values[1:] + values[:-1]) / 2
    patterns = (torch.arange(_BUCKETS, dtype=torch.int64) - _BUCKETS // 2).to(torch.int32) << 16
    # The bucket's lowest value: the pattern itself when positive, with every lower bit set when negative.
    lowest = torch.where(patterns < 0, patterns | 0xFFFF, patterns).view(torch.float32)
    finite = torch.isfinite(lowest)
    base = torch.searchsorted(midpoints, torch.where(finite, lowest, 0.0))  # midpoints below the lowest value
    if not signed and values[0] == 0:
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
        zero=int(values.abs().argmin()),
    )


def decode(codes: torch.Tensor, absmax: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """fp32 values of whole blocks of codes, shaped (blocks, block size); 4-bit when `tables` hold 16 values."""
    values = tables[0]
    if values.numel() == 16:  # two codes per byte, the first in the high half
        packed = codes.view(absmax.shape[0], -1)
        codes = torch.stack([packed >> 4, packed & 15], dim=-1)
    return values[codes.reshape(absmax.shape[0], -1).int()] * absmax[:, None]


def encode(values: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8; 4-bit ones packed two a byte) and per-block absmax of `values`, shaped (blocks, block size)."""
    map_, base, midpoints = tables
    absmax = values.abs().amax(dim=1)
    normalized = values / torch.where(absmax > 0, absmax, 1.0)[:, None]
    bucket = (normalized.view(torch.int32) >> 16) + _BUCKETS // 2
    code = base[bucket]
    code = code + (normalized > midpoints[code]).int()
    if map_.numel() == 16:
        code = (code[:, 0::2] << 4) | code[:, 1::2]
    return code.to(torch.uint8), absmax
