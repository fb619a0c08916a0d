"""Int8 trained weights: groups of GROUP weights along a row share one fp32 scale (absmax / 127).

An update far smaller than a quantization step (the scale) would vanish if rounded to the nearest code, so the
update is added to the dequantized value and rounded stochastically: up with probability equal to the fraction
past the lower code, so E[code · scale] is the value itself (Q-GaLore, arXiv 2407.08296). Rounding to the nearest
code is kept as the control that shows the difference.

The noise of a step comes from a generator seeded with (seed, weight, step, row) alone, so a resumed run draws
exactly what an uninterrupted one would, with nothing but the step count and the seed in its checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GROUP = 256  # weights per scale, along a row: 4 bytes of scale per 256 bytes of codes (1.6%)
QMAX = 127


def group_size(cols: int) -> int:
    """Weights per scale in a row of `cols`: GROUP where it divides the row, else the largest power of 2 that does."""
    return math.gcd(cols, GROUP)


def int8_bytes(rows: int, cols: int) -> int:
    """What a rows × cols int8 trained weight holds: one byte per weight and an fp32 scale per group."""
    return rows * cols + 4 * rows * (cols // group_size(cols))


def quantize(weight: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (rows × cols) and fp32 scales (rows × groups) of `weight`; stochastic where a generator is given,
    to the nearest code otherwise."""
    rows, cols = weight.shape
    grouped = weight.detach().float().reshape(rows, -1, group_size(cols))
    scale = grouped.abs().amax(dim=2, keepdim=True).div_(QMAX).clamp_(min=torch.finfo(torch.float32).tiny)
    scaled = grouped / scale
    if generator is None:
        scaled.round_()
    else:
        noise = torch.rand(scaled.shape, generator=generator, device=scaled.device, dtype=scaled.dtype)
        scaled.add_(noise).floor_()
    codes = scaled.clamp_(-QMAX, QMAX).to(torch.int8).reshape(rows, cols)
    return codes, scale.reshape(rows, -1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """codes · scale in `dtype` (into `out` if given): the one weight-sized temporary a forward or update makes."""
    rows, cols = codes.shape
    result = torch.empty(rows, cols, dtype=dtype, device=codes.device) if out is None else out
    result.copy_(codes)
    result.view(rows, -1, group_size(cols)).mul_(scale.view(rows, -1, 1).to(dtype))
    return result


@dataclass(frozen=True)
class Rounding:
    """How one step of one int8 weight rounds: stochastically, with noise drawn from (seed, weight, step), or to
    the nearest code."""

    stochastic: bool
    seed: int
    weight: int  # the weight's place in the optimizer
    step: int

    def generator(self, device: torch.device, row: int) -> torch.Generator | None:
        """The generator for the rows from `row` on (None: round to nearest): a function of the numbers above and
        `row` alone, so a resumed run draws what an uninterrupted one would."""
        if not self.stochastic:
            return None
        generator = torch.Generator(device=device)
        # A tuple of ints hashes the same in every process (no hash randomisation for ints).
        generator.manual_seed(hash((self.seed, self.weight, self.step, row)) & (2**63 - 1))
        return generator
