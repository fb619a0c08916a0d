"""The optimizer-state part of the memory, in closed form: exact to the byte for ProjectedAdamW (DESIGN §3)."""

from __future__ import annotations

from ..optim.adamw import resolve_proj_dtype
from ..optim.codec import BLOCKSIZE
from ..optim.moments import MIN_QUANTIZED_NUMEL
from ..optim.projector import projection_side, projector_state_bytes
from ..optim.streaming import refresh_temporary_bytes, step_temporary_bytes


def moment_bytes(numel: int, bits: int) -> int:
    """Bytes of one Adam moment of `numel` elements: fp32, or 8- or 4-bit codes plus one fp32 scale per block."""
    if bits in BLOCKSIZE and numel >= MIN_QUANTIZED_NUMEL:
        return -(-numel * bits // 8) + 4 * -(-numel // BLOCKSIZE[bits])
    return 4 * numel


def predict_optimizer_state_bytes(param_groups: list[dict], bits: int, proj_dtype: str | None = None) -> int:
    """Closed-form size of ProjectedAdamW's state for these groups (DESIGN §3), one 8-byte step counter each."""
    return sum(optimizer_state_parts(param_groups, bits, proj_dtype))


def optimizer_state_parts(param_groups: list[dict], bits: int, proj_dtype: str | None = None) -> tuple[int, int]:
    """(moments, step counters and magnitudes; projectors): the two optimizer terms the estimate reports apart."""
    total, projectors = 0, 0
    for group in param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            total += 8
            if "rank" not in group:
                total += 2 * moment_bytes(p.numel(), bits)
                continue
            m, n = p.shape
            rank = min(group["rank"], m, n)
            right = projection_side(p.shape, group.get("proj_type", "std")) == "right"
            kept, projected = (m, n) if right else (n, m)
            total += 2 * moment_bytes(rank * kept, bits)
            stored_as = resolve_proj_dtype(group.get("proj_dtype", proj_dtype), bits)  # a group's own wins
            projectors += projector_state_bytes(rank * projected, stored_as)
            if group.get("weight_norm"):
                total += 3 * 4 * m
    return total, projectors


def update_temporaries(param_groups: list[dict]) -> list[tuple[int, int]]:
    """(numel, bytes) for each trainable parameter: its size, and the most its update holds at once beyond weights,
    gradients and state (a few chunks of the streaming step; for a projected weight, its refresh's SVD, taken at
    step 0 and every update_proj_gap steps)."""
    sizes = []
    for group in param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            shape = tuple(p.shape)
            if "rank" not in group:
                sizes.append((p.numel(), step_temporary_bytes(shape)))
                continue
            side = projection_side(p.shape, group.get("proj_type", "std"))
            sizes.append((p.numel(), max(step_temporary_bytes(shape, group["rank"], side),
                                         refresh_temporary_bytes(shape))))
    return sizes
