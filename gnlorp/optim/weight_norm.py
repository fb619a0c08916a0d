"""Weight normalization W = diag(g)·D (unit-norm rows D), done inside the optimizer (GradNormLoRP, arXiv 2412.19616).

The model keeps a plain W, so there is no extra module, no m×n copy of D and nothing to merge; D is
always W / g and is never stored.
"""

from __future__ import annotations

import torch

_TINY = 1e-12  # keeps an all-zero row from turning into NaN; ordinary rows are never near it


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(weight.float(), dim=1)


def split_gradient_(weight: torch.Tensor, grad: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Turn the fp32 `grad` = ∂L/∂W into ∂L/∂D in place, with the radial part removed; return ∂L/∂g.

    ∂L/∂g = rowsum(D ⊙ G) and ∂L/∂D = diag(g)(G − D ⊙ ∂L/∂g) = diag(g)·G − W ⊙ ∂L/∂g, the second form
    needing D nowhere.
    """
    grad_magnitude = torch.linalg.vecdot(weight, grad, dim=1) / magnitude.clamp_min(_TINY)
    grad.mul_(magnitude[:, None]).addcmul_(weight, grad_magnitude[:, None], value=-1.0)
    return grad_magnitude


def renormalize_(scaled_direction: torch.Tensor, new_magnitude: torch.Tensor) -> None:
    """Given diag(g)·D' in place, write diag(g')·D'/‖D'‖_row over it: the row norm of diag(g)·D' is g·‖D'‖."""
    scale = new_magnitude / row_norms(scaled_direction).clamp_min(_TINY)
    scaled_direction.mul_(scale[:, None].to(scaled_direction.dtype))
