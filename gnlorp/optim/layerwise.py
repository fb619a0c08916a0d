"""Layer-wise updates: each parameter steps as soon as its gradient is ready, then drops it.

Full gradients then never coexist (GaLore's and GradNormLoRP's 7B-on-24 GB setting). It cannot be
combined with gradient accumulation (the gradient is gone after each backward), clipping by the global
gradient norm (no moment sees all gradients), or DistributedDataParallel (the hook fires before the
all-reduce).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adamw import ProjectedAdamW


@dataclass
class LayerwiseHandle:
    handles: list = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def register_layerwise_step(optimizer: ProjectedAdamW) -> LayerwiseHandle:
    """Hook every parameter of `optimizer` so that backward() also steps it; call the handle's remove() to undo."""

    def step_and_free(p: torch.Tensor) -> None:
        optimizer.step_param(p)
        p.grad = None

    return LayerwiseHandle([
        p.register_post_accumulate_grad_hook(step_and_free)
        for group in optimizer.param_groups
        for p in group["params"]
    ])
