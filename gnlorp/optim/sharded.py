"""Row-sharded parameters (FSDP2's Shard(0) DTensors): what ProjectedAdamW needs to step only its own rows.

Each rank updates its rows of a weight with its rows of the gradient. Plain AdamW is elementwise and GradNormLoRP's
magnitudes are per row, so both need no communication; nor does a right-side projection (R = G·Qᵀ, moments m×r),
whose moments are sharded by rows like the weight. What every rank needs whole is kept as 1/N of its flat form and
gathered when used, as FSDP does with the weights:
- a projector (r×n or m×r), gathered at each step (its own size, a fraction r/m or r/n of the weight's);
- a left-side projection's moments (r×n): R = Σ_ranks P_rowsᵀ·G_rows is all-reduced, each rank runs Adam on its
  slice, and the directions are gathered back (one all-reduce and one all-gather of r×n per step).
A refresh gathers the matrix to project on one rank (the matrix's owner, round-robin), which takes the same exact
SVD a single process would and scatters the basis, so the trajectory equals one process's. Projectors travel in
their stored form (bfloat16, or int8 codes and scales), a half or a quarter of float32. Slices are whole
multiples of ALIGN values, so 8- and 4-bit blocks and int8 projector blocks fall where one process puts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Shard

from .projector import INT8_BLOCKSIZE, load_projector

ALIGN = 256  # values; a multiple of every block size (8-bit 256, 4-bit 128, int8 projector 256)


@dataclass(frozen=True)
class RowShard:
    """Where this rank's rows sit in a row-sharded weight, and the group its ranks talk in."""

    group: dist.ProcessGroup
    rank: int
    world: int
    rows: tuple[int, int]  # [a, b) of the global weight's rows
    shape: torch.Size  # the global shape
    device: torch.device  # where this rank's tensors (and so its messages) live

    def slice_numel(self, numel: int) -> int:
        return slice_numel(numel, self.world)

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)


def slice_numel(numel: int, world: int) -> int:
    """Values each of `world` ranks keeps of a replicated tensor of `numel` values: a whole number of ALIGN blocks."""
    return math.ceil(numel / (world * ALIGN)) * ALIGN


def row_shard(p: torch.Tensor) -> RowShard | None:
    """The RowShard of a DTensor parameter, None for an ordinary tensor; ValueError for any other layout."""
    if not isinstance(p, DTensor):
        return None
    mesh = p.device_mesh
    if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(f"ProjectedAdamW steps parameters sharded by rows (FSDP2's Shard(0) on a 1-D mesh); got "
                         f"placements {tuple(p.placements)} on a {mesh.ndim}-D mesh")
    world, rank = mesh.size(), mesh.get_local_rank()
    rows = math.ceil(p.shape[0] / world)  # torch.chunk's split, which fully_shard uses
    start = min(rank * rows, p.shape[0])
    end = min(start + rows, p.shape[0])
    local = p.to_local().shape[0]
    if local != end - start:
        raise ValueError(f"rank {rank} holds {local} rows of a {tuple(p.shape)} weight, not torch.chunk's "
                         f"{end - start}")
    return RowShard(mesh.get_group(), rank, world, (start, end), p.shape, p.device)


def any_rank(flag: bool, device: torch.device | str, group: dist.ProcessGroup | None = None) -> bool:
    """True on every rank when `flag` is True on any: ranks must agree on whether to skip, stop or give up.
    `device` is where the collective's tensor lives (the GPU with NCCL)."""
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def gather_rows(rows: torch.Tensor, shard: RowShard, owner: int) -> torch.Tensor | None:
    """The whole matrix on rank `owner` from every rank's rows (None elsewhere)."""
    per = math.ceil(shard.shape[0] / shard.world)
    padded = torch.zeros(per, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    whole = pieces = None
    if shard.rank == owner:
        whole = torch.empty(per * shard.world, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
        pieces = list(whole.split(per))
    dist.gather(padded, pieces, dst=shard.global_rank(owner), group=shard.group)
    return None if whole is None else whole[: shard.shape[0]]


def scatter_basis(basis: torch.Tensor | None, numel: int, shard: RowShard, owner: int) -> torch.Tensor | None:
    """Each rank's slice (keep_slice's) of the owner's basis of `numel` values, or None everywhere when the owner's
    SVD failed."""
    found = torch.tensor([int(basis is not None)], dtype=torch.int32, device=shard.device)
    dist.broadcast(found, src=shard.global_rank(owner), group=shard.group)
    if not found.item():
        return None
    per = shard.slice_numel(numel)
    piece = torch.empty(per, dtype=torch.float32, device=shard.device)
    pieces = None
    if basis is not None:
        pieces = list(torch.nn.functional.pad(basis.reshape(-1), (0, per * shard.world - numel)).split(per))
    dist.scatter(piece, pieces, src=shard.global_rank(owner), group=shard.group)
    return piece


def keep_slice(whole: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """This rank's slice of a replicated tensor's flat form, zero-padded to slice_numel values."""
    per = shard.slice_numel(whole.numel())
    flat = torch.nn.functional.pad(whole.reshape(-1), (0, per * shard.world - whole.numel()))
    return flat[shard.rank * per:(shard.rank + 1) * per].clone()


def gather_slices(piece: torch.Tensor, shape: tuple[int, ...], shard: RowShard) -> torch.Tensor:
    """The replicated tensor of `shape` back from every rank's slice (keep_slice's inverse); (-1,): all of it."""
    whole = torch.empty(piece.numel() * shard.world, dtype=piece.dtype, device=piece.device)
    dist.all_gather(list(whole.split(piece.numel())), piece.contiguous(), group=shard.group)
    return whole if shape == (-1,) else whole[: math.prod(shape)].view(shape)


def gather_projector(state: dict, shape: tuple[int, int], shard: RowShard) -> torch.Tensor:
    """The whole projector of `shape` as float32, from every rank's slice of its stored form (float32, bfloat16,
    or int8 codes with their block scales: what travels is what is stored)."""
    stored = {key: gather_slices(state[key], (-1,), shard) for key in ("projector", "projector_absmax") if key in state}
    stored["projector"] = stored["projector"][: math.prod(shape)].view(shape)
    if "projector_absmax" in stored:  # the last slice's padding ends in blocks of its own
        stored["projector_absmax"] = stored["projector_absmax"][: -(-math.prod(shape) // INT8_BLOCKSIZE)]
    return load_projector(stored)


def all_reduce_(tensor: torch.Tensor, shard: RowShard) -> torch.Tensor:
    dist.all_reduce(tensor, group=shard.group)
    return tensor
