"""Full training: every weight trains with plain AdamW; the baseline the other methods are measured by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import RunConfig
from .base import Method

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class FullMethod(Method):
    """Every parameter trains; nothing to wrap and nothing to merge."""

    def prepare(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        return model.requires_grad_(True)


FULL = FullMethod("full", "Every weight trains with AdamW: the reference quality, and two moments of state "
                  "per weight.")
