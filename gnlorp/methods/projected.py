"""Gradient low-rank projection (GaLore, GradNormLoRP): every weight trains, the optimizer state is rank r.

The model is left as it is; ProjectedAdamW does the work from the group keys set here, so there is no
adapter to merge and no cost at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import RunConfig
from .base import resolve_targets, trainable_parameters
from .full import FullMethod

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ProjectedMethod(FullMethod):
    """Full training whose target weights keep Adam moments in a rank-r projection of their gradient."""

    weight_norm: bool = False  # True: project the direction of W = diag(g)·D and train g apart (GradNormLoRP)

    def param_groups(self, model: nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
        """A projected group over the targets' weights, a plain one over every other trainable parameter."""
        targets = {id(model.get_submodule(name).weight) for name in resolve_targets(model, cfg)}
        params = trainable_parameters(model)
        groups = [{
            "params": [p for p in params if id(p) in targets],
            "rank": cfg.rank,
            "update_proj_gap": cfg.update_proj_gap,
            "scale": cfg.scale,
            "proj_type": cfg.proj_type,
            "weight_norm": self.weight_norm,
            "proj_dtype": cfg.proj_dtype,
            "stagger_refresh": cfg.stagger_refresh,
            "svd": cfg.svd,
            "adaptive_refresh": cfg.adaptive_refresh,
        }]
        plain = [p for p in params if id(p) not in targets]
        if plain:
            groups.append({"params": plain})
        return groups


GALORE = ProjectedMethod("galore", "Every weight trains at full rank with Adam moments in a rank-r gradient "
                         "projection: state like LoRA's, plus an SVD every update_proj_gap steps.")
GRADNORMLORP = ProjectedMethod("gradnormlorp", "GaLore on each weight's direction with its row magnitudes "
                               "trained apart: better conditioned, three more numbers per row.",
                               weight_norm=True)
