"""The optimizer-state part of the memory, in closed form: exact to the byte for ProjectedAdamW (DESIGN §3)."""

from __future__ import annotations

from ..optim.adamw import resolve_proj_dtype
from ..optim.codec import BLOCKSIZE
from ..optim.moments import MIN_QUANTIZED_NUMEL
from ..optim.projector import projection_side, projector_state_bytes
from ..optim.sharded import slice_numel
from ..optim.streaming import refresh_temporary_bytes, step_temporary_bytes


def moment_bytes(numel: int, bits: int, whole_numel: int | None = None) -> int:
    """Bytes of one Adam moment of `numel` elements: fp32, or 8- or 4-bit codes plus one fp32 scale per block.

    A shard of a moment (`numel` of its `whole_numel`) is quantized when the whole moment would be.
    """
    if bits in BLOCKSIZE and (whole_numel or numel) >= MIN_QUANTIZED_NUMEL:
        return -(-numel * bits // 8) + 4 * -(-numel // BLOCKSIZE[bits])
    return 4 * numel


def predict_optimizer_state_bytes(param_groups: list[dict], bits: int, proj_dtype: str | None = None,
                                  shards: int = 1) -> int:
    """Closed-form size of ProjectedAdamW's state for these groups (DESIGN §3), one 8-byte step counter each;
    with `shards` > 1, what rank 0 of an FSDP run over that many processes holds."""
    return sum(optimizer_state_parts(param_groups, bits, proj_dtype, shards))


def optimizer_state_parts(param_groups: list[dict], bits: int, proj_dtype: str | None = None,
                          shards: int = 1) -> tuple[int, int]:
    """(moments, step counters and magnitudes; projectors): the two optimizer terms the estimate reports apart.

    Sharded (optim/sharded.py), rank 0 keeps the first ⌈m/N⌉ rows of each weight's moments and magnitudes, and a
    slice of ⌈v/(N·256)⌉·256 values of each projector and each left-side moment of v values.
    """
    total, projectors = 0, 0
    for group in param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            total += 8
            rows = -(-p.shape[0] // shards) if p.dim() else 1  # rank 0's rows
            if "rank" not in group:
                total += 2 * moment_bytes(p.numel() // max(p.shape[0], 1) * rows if shards > 1 else p.numel(), bits,
                                          p.numel())
                continue
            m, n = p.shape
            rank = min(group["rank"], m, n)
            right = projection_side(p.shape, group.get("proj_type", "std")) == "right"
            kept, projected = (m, n) if right else (n, m)
            held = rank * kept if shards == 1 else rank * rows if right else slice_numel(rank * n, shards)
            total += 2 * moment_bytes(held, bits, rank * kept)
            stored_as = resolve_proj_dtype(group.get("proj_dtype", proj_dtype), bits)  # a group's own wins
            projected_numel = rank * projected if shards == 1 else slice_numel(rank * projected, shards)
            projectors += projector_state_bytes(projected_numel, stored_as)
            if group.get("weight_norm"):
                total += 3 * 4 * (m if shards == 1 else rows)
            if group.get("adaptive_refresh"):
                total += 16  # its schedule: (gap, next refresh step)
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
