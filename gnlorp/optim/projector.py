"""Gradient low-rank projection (GaLore, arXiv 2403.03507) as pure functions on tensors.

The projector is a plain tensor kept in the optimizer state, never an object, so that
`torch.load(weights_only=True)` can restore it. Which side it projects is recomputed from the
shape and `proj_type` on every call instead of being stored.
"""

from __future__ import annotations

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right")


def projection_side(shape: torch.Size, proj_type: str) -> str:
    """'right' (R = G Qᵀ, keeps m×r) or 'left' (R = Pᵀ G, keeps r×n); galore-torch's rule."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def compute_projector(matrix: torch.Tensor, rank: int, side: str, dtype: torch.dtype) -> torch.Tensor:
    """Top-`rank` singular vectors of `matrix` by exact SVD: Vh[:r] (r×n) for right, U[:, :r] (m×r) for left."""
    u, _, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    basis = vh[:rank] if side == "right" else u[:, :rank]
    return basis.to(dtype).contiguous()


def project(grad: torch.Tensor, projector: torch.Tensor, side: str) -> torch.Tensor:
    """Gradient into rank space: G Qᵀ (m×r) or Pᵀ G (r×n)."""
    basis = projector.to(grad.dtype)
    return grad @ basis.T if side == "right" else basis.T @ grad


def add_projected_back_(
    target: torch.Tensor, low_rank: torch.Tensor, projector: torch.Tensor, side: str, alpha: float,
    row_scale: torch.Tensor | None = None,
) -> None:
    """target += alpha · diag(row_scale) · back(low_rank), in place and without a full-size temporary.

    back(N) is N Q (right) or P N (left). Scaling rows of the small factor instead of the m×n result
    is what lets GradNormLoRP work on diag(g)·D directly.
    """
    basis = projector.to(target.dtype)
    low_rank = low_rank.to(target.dtype)
    if side == "right":
        left_factor, right_factor = low_rank, basis
    else:
        left_factor, right_factor = basis, low_rank
    if row_scale is not None:
        left_factor = left_factor * row_scale[:, None]
    target.addmm_(left_factor, right_factor, alpha=alpha)
