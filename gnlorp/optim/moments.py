"""Storage of Adam moments: fp32, or 8- or 4-bit blockwise codes (codec.py), read and written a chunk at a time.

A quantized moment is two tensors in the optimizer state, the uint8 codes (`key`; shaped like the moment at 8
bits, flat and two codes a byte at 4) and one fp32 scale per block (`key + "_absmax"`), so the state stays plain
tensors. How a moment is stored is read off those tensors, not kept beside them. As bitsandbytes does, tensors
under `MIN_QUANTIZED_NUMEL` elements stay fp32: their scales would cost more than they save.
"""

from __future__ import annotations

import torch

from .codec import BLOCKSIZE, code_map

MIN_QUANTIZED_NUMEL = 4096

# The first moment is signed; the second is non-negative, so an unsigned map gives it twice the resolution.
SIGNED = {"exp_avg": True, "exp_avg_sq": False}


def init_moments(state: dict, shape: torch.Size, device: torch.device, bits: int, whole_numel: int | None = None
                 ) -> None:
    """Zero first and second moments of `shape`, quantized at 8 or 4 bits when the tensor is large enough.

    A rank's shard of a moment is quantized when the whole moment (`whole_numel`) would be, as in one process.
    A quantized zero is any code with a zero scale.
    """
    numel = shape.numel()
    for key in SIGNED:
        if bits in BLOCKSIZE and (whole_numel or numel) >= MIN_QUANTIZED_NUMEL:
            codes = shape if bits == 8 else (-(-numel // 2),)
            state[key] = torch.zeros(codes, dtype=torch.uint8, device=device)
            state[key + "_absmax"] = torch.zeros(-(-numel // BLOCKSIZE[bits]), dtype=torch.float32, device=device)
        else:
            state[key] = torch.zeros(shape, dtype=torch.float32, device=device)


def stored_bits(codes: torch.Tensor, absmax: torch.Tensor) -> int:
    """8 or 4, from how many codes a scale covers."""
    return 8 if absmax.numel() == -(-codes.numel() // BLOCKSIZE[8]) else 4


class Moments:
    """The two moments of a tensor of `numel` values (keys `prefix + "exp_avg"`, `prefix + "exp_avg_sq"`)."""

    def __init__(self, state: dict, numel: int, prefix: str = ""):
        self.numel = numel
        self.exp_avg = state[prefix + "exp_avg"].view(-1)
        self.exp_avg_sq = state[prefix + "exp_avg_sq"].view(-1)
        self.quantized = self.exp_avg.dtype == torch.uint8
        self.bits, self.block = 32, 1
        if self.quantized:
            self.exp_avg_absmax = state[prefix + "exp_avg_absmax"]
            self.exp_avg_sq_absmax = state[prefix + "exp_avg_sq_absmax"]
            self.bits = stored_bits(self.exp_avg, self.exp_avg_absmax)
            self.block = BLOCKSIZE[self.bits]
            device = self.exp_avg.device
            self.tables = (code_map(True, device, self.bits).tables, code_map(False, device, self.bits).tables)

    def _bytes(self, start: int, end: int) -> slice:
        """Where values [start, end) are in the codes (two a byte at 4 bits; `start` even)."""
        return slice(start, end) if self.bits == 8 else slice(start // 2, -(-end // 2))

    def slices(self, start: int, end: int) -> tuple[torch.Tensor, ...]:
        """Views of values [start, end): (m, v) in fp32, or (m codes, m scales, v codes, v scales), one row a block.

        Quantized, `start` must begin a block and `end` must end one; see `padded_tail` for the last one.
        """
        if not self.quantized:
            return self.exp_avg[start:end], self.exp_avg_sq[start:end]
        blocks = slice(start // self.block, end // self.block)
        codes = self._bytes(start, end)
        width = self.block if self.bits == 8 else self.block // 2
        return (self.exp_avg[codes].view(-1, width), self.exp_avg_absmax[blocks],
                self.exp_avg_sq[codes].view(-1, width), self.exp_avg_sq_absmax[blocks])

    def whole_blocks_end(self, end: int) -> int:
        """Where the last whole block before `end` ends: a quantized kernel takes whole blocks only."""
        return end - end % self.block if self.quantized else end

    def padded_tail(self, start: int) -> tuple[torch.Tensor, ...]:
        """Copies of the partial last block from `start`, padded with zeros to a whole block (for `store_tail`)."""
        stored = self._bytes(start, self.numel)
        width = self.block if self.bits == 8 else self.block // 2
        padded = []
        for codes, absmax, signed in ((self.exp_avg, self.exp_avg_absmax, True),
                                      (self.exp_avg_sq, self.exp_avg_sq_absmax, False)):
            zero = code_map(signed, codes.device, self.bits).zero
            fill = zero if self.bits == 8 else (zero << 4) | zero
            block = torch.full((1, width), fill, dtype=torch.uint8, device=codes.device)
            block[0, : stored.stop - stored.start] = codes[stored]
            padded += [block, absmax[-1:].clone()]
        return tuple(padded)

    def store_tail(self, start: int, padded: tuple[torch.Tensor, ...]) -> None:
        """Write back what a kernel made of `padded_tail(start)`."""
        stored = self._bytes(start, self.numel)
        count = stored.stop - stored.start
        self.exp_avg[stored] = padded[0].view(-1)[:count]
        self.exp_avg_absmax[-1:] = padded[1]
        self.exp_avg_sq[stored] = padded[2].view(-1)[:count]
        self.exp_avg_sq_absmax[-1:] = padded[3]
