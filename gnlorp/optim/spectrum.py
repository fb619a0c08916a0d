"""How much of a gradient a rank-r projection keeps, read off the singular values its refresh already computed.

The rank-r projection (either side) keeps Σ_{i≤r} σᵢ² of the gradient's energy Σ σᵢ² (Eckart-Young), so each
refresh says, at no extra cost, what its rank keeps and which ranks would keep given shares. The optimizer
records one Spectrum per refresh; the engine writes them to spectrum.jsonl and turns them into rank advice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ENERGY_LEVELS = (0.5, 0.8, 0.9, 0.95, 0.99)  # the shares of energy whose smallest rank each record keeps
ADVICE_ENERGY = 0.9


@dataclass(frozen=True)
class Spectrum:
    """One refresh of one matrix: its rank, the share of energy that rank keeps, and the rank each level needs."""

    param: torch.Tensor  # the parameter, so a caller can name it
    step: int  # the parameter's own step count when it refreshed (0 for the first projector)
    rank: int
    energy_kept: float
    rank_for: dict[float, int | None]  # energy level -> smallest rank keeping at least that share (None: more
    # than the randomized SVD's top values reach)


def energy_profile(singular_values: torch.Tensor, rank: int, total: float | None = None
                   ) -> tuple[float, dict[float, int | None]]:
    """(share of the energy in the top `rank` values, smallest rank reaching each ENERGY_LEVELS share).

    `total` is Σσ² over every singular value (‖G‖²_F) when `singular_values` holds only the top few (the
    randomized SVD); a share they do not reach gets None. An all-zero gradient keeps everything at any rank
    (there is nothing to lose): 1.0 and rank 1 for each level.
    """
    energy = singular_values.double().square()
    total = float(energy.sum()) if total is None else total
    if total <= 0:
        return 1.0, {level: 1 for level in ENERGY_LEVELS}
    cumulative = energy.cumsum(0) / total
    reached = float(cumulative[-1]) + 1e-9
    needed = torch.searchsorted(cumulative, torch.tensor(ENERGY_LEVELS, dtype=torch.float64) - 1e-12)
    ranks = [int(k) + 1 if level <= reached else None for level, k in zip(ENERGY_LEVELS, needed.tolist(), strict=True)]
    return min(1.0, float(cumulative[min(rank, len(energy)) - 1])), dict(zip(ENERGY_LEVELS, ranks, strict=True))
