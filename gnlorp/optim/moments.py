"""Storage of Adam moments: fp32, or 8-bit blockwise codes (codec.py), read and written a chunk at a time.

An 8-bit moment is two tensors in the optimizer state, the uint8 codes (`key`) and one fp32 scale per
block (`key + "_absmax"`), so the state stays plain tensors. Whether a moment is quantized is read off its
dtype, not stored beside it. As bitsandbytes does, tensors under `MIN_8BIT_NUMEL` elements stay fp32: their
scales would cost more than they save.
"""

from __future__ import annotations

import torch

from .codec import BLOCKSIZE, code_map

MIN_8BIT_NUMEL = 4096

# The first moment is signed; the second is non-negative, so an unsigned map gives it twice the resolution.
SIGNED = {"exp_avg": True, "exp_avg_sq": False}


def init_moments(state: dict, shape: torch.Size, device: torch.device, bits: int) -> None:
    """Zero first and second moments of `shape`, quantized when `bits` is 8 and the tensor is large enough.

    A quantized zero is any code with a zero scale.
    """
    numel = shape.numel()
    for key in SIGNED:
        if bits == 8 and numel >= MIN_8BIT_NUMEL:
            state[key] = torch.zeros(shape, dtype=torch.uint8, device=device)
            state[key + "_absmax"] = torch.zeros(-(-numel // BLOCKSIZE), dtype=torch.float32, device=device)
        else:
            state[key] = torch.zeros(shape, dtype=torch.float32, device=device)


class Moments:
    """The two moments of one tensor (keys `prefix + "exp_avg"`, `prefix + "exp_avg_sq"`), as flat views."""

    def __init__(self, state: dict, prefix: str = ""):
        self.exp_avg = state[prefix + "exp_avg"].view(-1)
        self.exp_avg_sq = state[prefix + "exp_avg_sq"].view(-1)
        self.quantized = self.exp_avg.dtype == torch.uint8
        if self.quantized:
            self.exp_avg_absmax = state[prefix + "exp_avg_absmax"]
            self.exp_avg_sq_absmax = state[prefix + "exp_avg_sq_absmax"]
            self.tables = (code_map(True, self.exp_avg.device).tables, code_map(False, self.exp_avg.device).tables)

    @property
    def numel(self) -> int:
        return self.exp_avg.numel()

    def slices(self, start: int, end: int) -> tuple[torch.Tensor, ...]:
        """Views of elements [start, end): (m, v) in fp32, or (m codes, m scales, v codes, v scales).

        Quantized, `start` must begin a block and `end` must end one (or the tensor); see `padded_tail`.
        """
        if not self.quantized:
            return self.exp_avg[start:end], self.exp_avg_sq[start:end]
        blocks = slice(start // BLOCKSIZE, -(-end // BLOCKSIZE))
        return (self.exp_avg[start:end].view(-1, BLOCKSIZE), self.exp_avg_absmax[blocks],
                self.exp_avg_sq[start:end].view(-1, BLOCKSIZE), self.exp_avg_sq_absmax[blocks])

    def whole_blocks_end(self, end: int) -> int:
        """Where the last whole block before `end` ends: a quantized kernel takes whole blocks only."""
        return end - end % BLOCKSIZE if self.quantized else end

    def padded_tail(self, start: int) -> tuple[torch.Tensor, ...]:
        """Copies of the partial last block from `start`, padded with zeros to a whole block (for `store_tail`)."""
        count = self.numel - start
        padded = []
        for codes, absmax, signed in ((self.exp_avg, self.exp_avg_absmax, True),
                                      (self.exp_avg_sq, self.exp_avg_sq_absmax, False)):
            zero = code_map(signed, codes.device).zero
            block = torch.full((1, BLOCKSIZE), zero, dtype=torch.uint8, device=codes.device)
            block[0, :count] = codes[start:]
            padded += [block, absmax[-1:].clone()]
        return tuple(padded)

    def store_tail(self, start: int, padded: tuple[torch.Tensor, ...]) -> None:
        """Write back what a kernel made of `padded_tail(start)`."""
        count = self.numel - start
        self.exp_avg[start:] = padded[0].view(-1)[:count]
        self.exp_avg_absmax[-1:] = padded[1]
        self.exp_avg_sq[start:] = padded[2].view(-1)[:count]
        self.exp_avg_sq_absmax[-1:] = padded[3]
