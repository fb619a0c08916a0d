"""Projector refreshes: when a matrix takes a new SVD, the SVD itself (sharded: on one owner rank), and the
adaptive schedule that lets a still subspace refresh less often.

A projector comes on a parameter's first step, then every update_proj_gap steps (at the parameter's offset
when staggered; adaptive, at the step its schedule says), from the SVD of the whole gradient to project. The
schedule is state (gap, next step), so it is deterministic and resumes exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .projector import load_projector, store_projector, svd_basis
from .sharded import RowShard, gather_projector, gather_rows, scatter_basis
from .spectrum import Spectrum, energy_profile
from .streaming import Projection, projection_target

# Adaptive refresh: a subspace whose overlap with the previous one (‖Q̃Qᵀ‖²_F / r: 1 unchanged, about r/n for an
# unrelated one) is at least this counts as still, and its matrix's gap doubles, up to this factor of
# update_proj_gap. Measured on tiny (docs/BENCHMARKS.md): 0.3 takes 60% fewer SVDs at the same loss; 0.5 and above
# almost never stretch a gap there.
STILL_OVERLAP, MAX_GAP_FACTOR = 0.3, 8


@dataclass
class Refresh:
    """The projector a step uses, and what its refresh (if it took one) has to report."""

    basis: torch.Tensor | None  # the whole projector as float32; None when there is none yet (skip the update)
    spectrum: Spectrum | None  # the refresh's singular values, on the rank that took the SVD
    incident: str | None  # an SVD that failed, and what was done instead


def current_projector(p: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, projection: Projection,
                      group: dict[str, Any], state: dict, shard: RowShard | None, index: int, offset: int) -> Refresh:
    """The projector for this step of `p`, refreshed first when the schedule says so.

    `weight` and `grad` are this rank's rows; `index` is p's place in its group (it seeds the randomized SVD and
    picks the owner rank), `offset` the step (mod update_proj_gap) at which p refreshes.
    """
    t = int(state["step"])
    side = projection.side
    shape = basis_shape(p.shape, min(group["rank"], *p.shape), side)
    adaptive = group["adaptive_refresh"]
    due = t == 0 or (int(state["refresh_schedule"][1]) == t if adaptive else t % group["update_proj_gap"] == offset)
    spectrum = incident = before = basis = None
    if due:
        if adaptive and "projector" in state:
            before = _whole(state, shape, shard)
        target = projection_target(weight, grad, projection, group["chunk_numel"])
        basis, spectrum, note = _decompose(target, p, group, state, shard, side, index)
        del target
        if basis is not None:
            store_projector(state, basis, group["proj_dtype"])
        if note is not None:
            kept = ("retried in float64" if basis is not None else
                    "kept the previous projector" if "projector" in state else "update skipped")
            incident = f"{note}; {kept}"
        if "projector" not in state:
            return Refresh(None, spectrum, incident)
    whole = _whole(state, shape, shard)
    if due and adaptive:  # a failed SVD (basis None) kept the old one: not a still one
        overlap = subspace_overlap(before, whole, side) if before is not None and basis is not None else None
        _reschedule(state, group["update_proj_gap"], t, offset, overlap)
    return Refresh(whole, spectrum, incident)


def _whole(state: dict, shape: tuple[int, int], shard: RowShard | None) -> torch.Tensor:
    return load_projector(state) if shard is None else gather_projector(state, shape, shard)


def _decompose(target: torch.Tensor, p: torch.Tensor, group: dict[str, Any], state: dict, shard: RowShard | None,
               side: str, index: int) -> tuple[torch.Tensor | None, Spectrum | None, str | None]:
    """The new projector from the SVD of `target` to store; sharded, one rank (the matrix's owner) gathers the
    rows and decomposes them, and every rank gets its slice of the result."""
    rank = min(group["rank"], *p.shape)
    # The randomized SVD's random directions depend on the matrix and its step only: deterministic, resumable.
    method, seed = group["svd"], index * 1_000_003 + int(state["step"])
    owner = index % shard.world if shard is not None else None  # round-robin over matrices
    matrix = target if shard is None else gather_rows(target, shard, owner)
    basis, singular_values, note = svd_basis(matrix, rank, side, method, seed) if matrix is not None else \
        (None, None, None)
    spectrum = None
    if singular_values is not None:  # on the rank that decomposed it: one record per refresh
        total = float(torch.linalg.vector_norm(matrix)) ** 2 if method == "randomized" else None
        kept, rank_for = energy_profile(singular_values, rank, total)
        spectrum = Spectrum(p, int(state["step"]), rank, kept, rank_for)
    del matrix
    if shard is not None:  # the owner's basis, sliced to every rank
        basis = scatter_basis(basis, math.prod(basis_shape(p.shape, rank, side)), shard, owner)
    return basis, spectrum, note


def _reschedule(state: dict, base: int, t: int, offset: int, overlap: float | None) -> None:
    """Adaptive refresh: a matrix whose subspace barely moved (overlap ≥ STILL_OVERLAP) doubles its gap, up to
    MAX_GAP_FACTOR × update_proj_gap (`base`); one that moved goes back to update_proj_gap."""
    if t == 0:
        state["refresh_schedule"] = torch.tensor([base, offset or base], dtype=torch.int64)
        return
    gap = int(state["refresh_schedule"][0])
    gap = min(2 * gap, MAX_GAP_FACTOR * base) if overlap is not None and overlap >= STILL_OVERLAP else base
    state["refresh_schedule"] = torch.tensor([gap, t + gap], dtype=torch.int64)


def subspace_overlap(before: torch.Tensor, after: torch.Tensor, side: str) -> float:
    """How much of the old rank-r subspace the new one holds: ‖Q̃Qᵀ‖²_F / r (right side; P̃ᵀP on the left), 1 when
    unchanged, 0 when orthogonal; blind to the signs and order of the vectors within it."""
    cross = after @ before.T if side == "right" else after.T @ before
    return float(cross.square().sum()) / min(before.shape)


def basis_shape(shape: torch.Size, rank: int, side: str) -> tuple[int, int]:
    """Q (r×n) on the right side, P (m×r) on the left, of an m×n weight."""
    return (rank, shape[1]) if side == "right" else (shape[0], rank)
