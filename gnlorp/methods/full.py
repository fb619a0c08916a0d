"""Full training: every weight trains with plain AdamW; the baseline the other methods are measured by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import RunConfig
from .base import Method, resolve_targets

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class FullMethod(Method):
    """Every parameter trains; nothing to wrap, and nothing to merge unless the targets train in int8."""

    def prepare(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        model.requires_grad_(True)
        if cfg.int8_trained:
            from ..models.int8_trained import quantize_trained

            quantize_trained(model, resolve_targets(model, cfg))
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """Int8 trained weights become plain weights holding the value they computed with."""
        from ..models.int8_trained import dequantize_trained

        return dequantize_trained(model)


FULL = FullMethod("full", "Every weight trains with AdamW: the reference quality, and two moments of state "
                  "per weight.")
