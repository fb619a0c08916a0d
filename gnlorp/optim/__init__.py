"""The projected 8-bit optimizer core: GaLore and GradNormLoRP with rank-r, optionally 8-bit, state."""

from .adamw import ProjectedAdamW, state_bytes
from .build import build_optimizer
from .layerwise import LayerwiseHandle, register_layerwise_step
from .projector import projector_state_bytes

__all__ = ["LayerwiseHandle", "ProjectedAdamW", "build_optimizer", "projector_state_bytes", "register_layerwise_step",
           "state_bytes"]
