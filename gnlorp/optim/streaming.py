"""The update walks each weight in chunks, so its working memory is a chunk, never a copy of the weight.

Plain AdamW is elementwise: chunks of CHUNK_NUMEL elements (whole 8-bit blocks) go through one kernel.
GaLore and GradNormLoRP go by rows. On the right side (R = G·Qᵀ, moments m×r) everything is row-local,
weight normalisation included (the row sums of D⊙G, the magnitudes, diag(g)·N·Q, the renormalisation), so
one pass does it all. On the left side (R = Pᵀ·G, moments r×n) R sums over every row: the first pass
accumulates it into one r×n fp32 buffer (the size of the moments, not of the weight), Adam turns it into N
in place, and a second pass adds diag(g)·P·N row chunk by row chunk. A bf16 weight is read and rounded
once per step, its chunk updated in fp32 in between.

CHUNK_NUMEL was chosen by measurement (benchmarks/streaming_step.py, docs/BENCHMARKS.md): larger chunks
are no faster, smaller ones pay Python's per-call cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..models.int8_weight import Int8Weight
from ..models.rounding import Rounding
from . import kernels
from .moments import Moments
from .projector import add_projected_back_
from .sharded import RowShard, all_reduce_, gather_slices, keep_slice
from .weight_norm import renormalize_, split_gradient_

CHUNK_NUMEL = 1 << 20
# Eager kernels make a dozen temporaries the size of what they are given. At 2^14 fp32 values (64 KiB) these come
# from malloc's heap, reused and in cache; larger ones are mmapped and zero-filled afresh on every call once the
# trainer pins glibc's mmap threshold (memory/release.py), which made the eager 8-bit step 3.7× slower at 2^18.
EAGER_CHUNK_NUMEL = 1 << 14
# What a step holds beyond the weight, its gradient and the state (benchmarks/streaming_step.py): at most this many
# fp32 chunks (the eager 8-bit kernel on an fp32 weight holds nine), plus, on projected groups, the projector as
# fp32 and, on the left side, the r×n rank-space buffer.
CHUNK_TEMPORARIES = 10
# A refresh holds the fp32 gradient to decompose (m·n) and what torch.linalg.svd adds: its copy of the input, U and
# Vᵀ, and LAPACK's workspace, fitted on this CPU as 2.5·m·n + 3.9·k² floats (k = min(m, n)): within 6% on six of
# eight shapes from square to 16:1, -22% (16 MiB) on 4096×1024, +13% on 4096×14336 (benchmarks/svd_memory.py,
# docs/BENCHMARKS.md). cuSOLVER's workspace is not measured.
SVD_FLOATS_PER_MN, SVD_FLOATS_PER_K2 = 2.5, 3.9


@dataclass(frozen=True)
class Hyper:
    """One step's numbers: step_size = lr·√(1−β2ᵗ)/(1−β1ᵗ); decay = 1 − lr·weight_decay."""

    lr: float
    step: int
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    compiled: bool  # run the chunk kernels through torch.compile
    fused: bool  # let torch's fused AdamW take fp32 weights with fp32 moments
    rounding: Rounding | None = None  # how an int8 weight's updated rows are stored

    @property
    def step_size(self) -> float:
        return self.lr * math.sqrt(1 - self.beta2**self.step) / (1 - self.beta1**self.step)

    @property
    def decay(self) -> float:
        return 1 - self.lr * self.weight_decay


def step_temporary_bytes(shape: tuple[int, ...], rank: int | None = None, side: str = "right") -> int:
    """The most a step on a weight of `shape` holds beyond weight, gradient and state (projected: at `rank`)."""
    chunks = CHUNK_TEMPORARIES * 4 * min(CHUNK_NUMEL, math.prod(shape))
    if rank is None:
        return chunks
    m, n = shape
    rank = min(rank, m, n)
    projector = 4 * rank * (n if side == "right" else m)
    return chunks + projector + (4 * rank * n if side == "left" else 0)


def refresh_temporary_bytes(shape: tuple[int, int]) -> int:
    """What a projector refresh holds while it takes the exact SVD of an m×n gradient."""
    m, n = shape
    k = min(m, n)
    return int(4 * (m * n * (1 + SVD_FLOATS_PER_MN) + SVD_FLOATS_PER_K2 * k * k))


def plain_update_(p: torch.Tensor, grad: torch.Tensor, moments: Moments, hyper: Hyper, chunk: int,
                  start: int = 0) -> None:
    """AdamW on `p`, chunk by chunk; torch's fused kernel where weight and moments are fp32.

    `p` and `grad` are the moments' values [start, start + p.numel()); `start` begins a block of them.
    """
    if isinstance(p, Int8Weight):
        _plain_int8_update_(p, grad, moments, hyper, chunk)
        return
    end = start + p.numel()
    if p.dtype == grad.dtype == torch.float32 and not moments.quantized and hyper.fused and \
            kernels.fused_adamw_(p, grad, moments.exp_avg[start:end].view_as(p),
                                 moments.exp_avg_sq[start:end].view_as(p), hyper.step, hyper.lr, hyper.beta1,
                                 hyper.beta2, hyper.eps, hyper.weight_decay):
        return
    if not p.is_contiguous():  # never so for a model's parameters; kept correct, at the cost of a copy
        flat = p.contiguous()
        plain_update_(flat, grad, moments, hyper, chunk, start)
        p.copy_(flat)
        return
    weight, gradient = p.view(-1), grad.reshape(-1)
    kernel = kernels.plain_q if moments.quantized else kernels.plain_32
    scalars = (hyper.step_size, hyper.decay, hyper.beta1, hyper.beta2, hyper.eps)
    tables = moments.tables if moments.quantized else ()
    whole, block = moments.whole_blocks_end(end), moments.block
    for a, b in _pieces(start, whole, chunk, hyper.compiled, block):
        w, g = weight[a - start:b - start], gradient[a - start:b - start]
        if moments.quantized:
            w, g = w.view(-1, block), g.view(-1, block)
        kernels.run(kernel, w, g, *moments.slices(a, b), *tables, *scalars, compiled=hyper.compiled)
    if whole < end:  # the partial last block of quantized moments, padded with zeros
        padded = moments.padded_tail(whole)
        w, g = (torch.zeros(1, block, dtype=t.dtype, device=t.device) for t in (weight, gradient))
        count = end - whole
        w[0, :count], g[0, :count] = weight[whole - start:], gradient[whole - start:]
        kernels.run(kernel, w, g, *padded, *tables, *scalars, compiled=hyper.compiled)
        moments.store_tail(whole, padded)
        weight[whole - start:] = w[0, :count]


def _plain_int8_update_(p: Int8Weight, grad: torch.Tensor, moments: Moments, hyper: Hyper, chunk: int) -> None:
    """AdamW on an int8 weight by row chunks: each is dequantized to fp32, updated, and rounded back."""
    m, n = p.shape
    chunks = row_chunks(m, n, moments.block // math.gcd(n, moments.block), chunk)
    buffers = RowBuffers(p, chunks[0][1])
    for a, b in chunks:
        rows = buffers.weight_rows(p, a, b)
        plain_update_(rows, grad[a:b], moments, hyper, chunk, start=a * n)
        buffers.store_rows(p, rows, a, b, hyper.rounding)


def _pieces(start: int, end: int, chunk: int, compiled: bool, block: int) -> list[tuple[int, int]]:
    """[start, end) in pieces of whole blocks, at most `chunk` long, or EAGER_CHUNK_NUMEL for eager kernels."""
    size = min(chunk, CHUNK_NUMEL if compiled else EAGER_CHUNK_NUMEL)
    size = max(block, size - size % block)
    return [(a, min(a + size, end)) for a in range(start, end, size)]


def adam_direction(low_rank: torch.Tensor, moments: Moments, start: int, hyper: Hyper, chunk: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """N for elements [start, start + numel) of a moment, from their part of the projected gradient (fp32).

    `out` may be `low_rank` itself: each piece is read before its N is written.
    """
    flat, end = low_rank.reshape(-1), start + low_rank.numel()
    direction = torch.empty_like(flat) if out is None else out.view(-1)
    scalars = (hyper.beta1, hyper.beta2, hyper.eps)
    whole = max(start, moments.whole_blocks_end(end))
    for a, b in _pieces(start, whole, chunk, hyper.compiled, moments.block):
        if moments.quantized:
            direction[a - start:b - start] = kernels.run(
                kernels.adam_q, flat[a - start:b - start], *moments.slices(a, b), *moments.tables, *scalars,
                compiled=hyper.compiled).view(-1)
        else:
            direction[a - start:b - start] = kernels.adam_32(flat[a - start:b - start], *moments.slices(a, b),
                                                             *scalars)
    if whole < end:  # the partial last block of a quantized moment, padded with zeros
        padded = moments.padded_tail(whole)
        grad = torch.zeros(1, moments.block, dtype=flat.dtype, device=flat.device)
        grad[0, : end - whole] = flat[whole - start:]
        tail = kernels.run(kernels.adam_q, grad, *padded, *moments.tables, *scalars, compiled=hyper.compiled)
        moments.store_tail(whole, padded)
        direction[whole - start:] = tail.view(-1)[: end - whole]
    return direction.view_as(low_rank)


def row_chunks(rows: int, columns: int, aligned_rows: int, chunk: int) -> list[tuple[int, int]]:
    """Row ranges of about `chunk` elements each, a multiple of `aligned_rows` long (the last one excepted)."""
    step = max(aligned_rows, chunk // max(columns, 1) // aligned_rows * aligned_rows)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


@dataclass
class Projection:
    """What a projected update needs besides the weight and its gradient."""

    basis: torch.Tensor | None  # fp32: Q (r×n) on the right side, P (m×r) on the left
    side: str
    scale: float
    magnitude: torch.Tensor | None  # GradNormLoRP's g (m), updated in place; None for GaLore
    magnitude_moments: Moments | None


class RowBuffers:
    """Two fp32 buffers of a row chunk, reused chunk after chunk: the weight's rows (unless p is fp32 and is
    updated in place) and the rows' gradient to project. Fresh tensors per chunk would each be mmapped and
    zero-filled anew once the trainer pins glibc's mmap threshold (memory/release.py)."""

    def __init__(self, p: torch.Tensor, rows: int):
        shape = (rows, p.shape[1])
        in_place = p.dtype == torch.float32 and not isinstance(p, Int8Weight)
        self.weight = None if in_place else torch.empty(shape, device=p.device)
        self.target = torch.empty(shape, device=p.device)

    def weight_rows(self, p: torch.Tensor, a: int, b: int) -> torch.Tensor:
        if self.weight is None:
            return p[a:b]
        if isinstance(p, Int8Weight):
            return p.read_rows(a, b, self.weight[: b - a])
        return self.weight[: b - a].copy_(p[a:b])

    def store_rows(self, p: torch.Tensor, rows: torch.Tensor, a: int, b: int, rounding: Rounding | None) -> None:
        """Put the updated fp32 `rows` back as rows [a, b) of `p` (nothing to do where they are p's own)."""
        if isinstance(p, Int8Weight):
            p.write_rows(a, b, rows, rounding.generator(p.device, a))
        elif self.weight is not None:
            p[a:b] = rows

    def target_rows(self, weight: torch.Tensor, grad: torch.Tensor, projection: Projection, a: int, b: int):
        """The rows' gradient to project, fp32: G, or GradNormLoRP's ∂L/∂D; and ∂L/∂g of the rows (or None)."""
        target = self.target[: b - a].copy_(grad[a:b])
        if projection.magnitude is None:
            return target, None
        return target, split_gradient_(weight, target, projection.magnitude[a:b])


def projection_target(p: torch.Tensor, grad: torch.Tensor, projection: Projection, chunk: int) -> torch.Tensor:
    """The whole gradient to project, fp32, for a refresh's SVD: the one weight-sized temporary, every T steps."""
    if projection.magnitude is None and grad.dtype == torch.float32:
        return grad
    target = torch.empty(p.shape, dtype=torch.float32, device=p.device)
    chunks = row_chunks(p.shape[0], p.shape[1], 1, chunk)
    buffers = RowBuffers(p, chunks[0][1] if chunks else 0)  # no rows: a rank past the last shard
    for a, b in chunks:
        target[a:b] = buffers.target_rows(buffers.weight_rows(p, a, b), grad, projection, a, b)[0]
    return target


def projected_update_(p: torch.Tensor, grad: torch.Tensor, moments: Moments, projection: Projection,
                      hyper: Hyper, chunk: int, shard: RowShard | None = None) -> None:
    """One GaLore or GradNormLoRP step on `p`, by row chunks (`p` being this rank's rows when `shard` is given)."""
    m, n = p.shape
    rank = projection.basis.shape[0 if projection.side == "right" else 1]
    aligned = moments.block // math.gcd(rank, moments.block) if projection.side == "right" else 1
    chunks = row_chunks(m, n, aligned, chunk)
    buffers = RowBuffers(p, chunks[0][1] if chunks else 0)  # no rows: a rank past the last shard
    alpha = -hyper.step_size * projection.scale
    if projection.side == "right":
        for a, b in chunks:
            weight = buffers.weight_rows(p, a, b)
            target, grad_magnitude = buffers.target_rows(weight, grad, projection, a, b)
            direction = adam_direction(target @ projection.basis.T, moments, a * rank, hyper, chunk)
            _step_rows(weight, direction, projection.basis, projection, grad_magnitude, (a, b), alpha, hyper, chunk)
            buffers.store_rows(p, weight, a, b, hyper.rounding)
        return
    low_rank = torch.zeros(rank, n, dtype=torch.float32, device=p.device)
    grad_magnitude = None if projection.magnitude is None else torch.empty_like(projection.magnitude)
    for a, b in chunks:
        target, rows_grad_magnitude = buffers.target_rows(buffers.weight_rows(p, a, b), grad, projection, a, b)
        low_rank.addmm_(projection.basis[a:b].T, target)
        if grad_magnitude is not None:
            grad_magnitude[a:b] = rows_grad_magnitude
    if shard is None:
        adam_direction(low_rank, moments, 0, hyper, chunk, out=low_rank)
    else:  # R sums over every rank's rows; each rank runs Adam on its slice of R, then all gather the directions
        piece = keep_slice(all_reduce_(low_rank, shard), shard)
        low_rank = gather_slices(adam_direction(piece, moments, 0, hyper, chunk, out=piece), low_rank.shape, shard)
    for a, b in chunks:
        rows_grad_magnitude = None if grad_magnitude is None else grad_magnitude[a:b]
        weight = buffers.weight_rows(p, a, b)
        _step_rows(weight, low_rank, projection.basis[a:b], projection, rows_grad_magnitude, (a, b), alpha, hyper,
                   chunk)
        buffers.store_rows(p, weight, a, b, hyper.rounding)


def _step_rows(weight, direction, basis, projection: Projection, grad_magnitude, rows: tuple[int, int],
               alpha: float, hyper: Hyper, chunk: int) -> None:
    """Add the back-projected update to rows [a, b) of `weight` (their fp32 copy, or p's own rows).

    `direction` and `basis` are the rows' factors: N (rows×r) and Q on the right, N (r×n) and P's rows on the left.
    """
    a, b = rows
    if projection.magnitude is None:
        add_projected_back_(weight, direction, basis, projection.side, alpha)
        weight.mul_(hyper.decay)
    else:
        magnitude = projection.magnitude[a:b]
        magnitude_direction = adam_direction(grad_magnitude, projection.magnitude_moments, a, hyper, chunk)
        new_magnitude = (magnitude - hyper.step_size * magnitude_direction).mul_(hyper.decay)
        # weight = diag(g)·D, so adding diag(g)·back(N) gives diag(g)·D' without forming D.
        add_projected_back_(weight, direction, basis, projection.side, alpha, row_scale=magnitude)
        renormalize_(weight, new_magnitude)
        magnitude.copy_(new_magnitude)
