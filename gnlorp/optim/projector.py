"""Gradient low-rank projection (GaLore, arXiv 2403.03507) as pure functions on tensors.

The projector is plain tensors kept in the optimizer state, never an object, so that
`torch.load(weights_only=True)` can restore it. Which side it projects is recomputed from the
shape and `proj_type` on every call instead of being stored. It is stored as float32, bfloat16, or
int8 codes with one float32 scale per block (Q-GaLore's cheaper projector), and always used as float32.
"""

from __future__ import annotations

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right")
SVD_METHODS = ("exact", "randomized")
# The randomized range finder (Halko, Martinsson and Tropp 2011; GaLore 2; torch.svd_lowrank): r + OVERSAMPLE
# random directions, POWER_ITERATIONS passes of A·Aᵀ to sharpen a slowly decaying spectrum.
OVERSAMPLE, POWER_ITERATIONS = 8, 2
PROJ_DTYPES = ("float32", "bfloat16", "int8")
INT8_BLOCKSIZE = 256
_INT8_MAX = 127


def projection_side(shape: torch.Size, proj_type: str) -> str:
    """'right' (R = G Qᵀ, keeps m×r) or 'left' (R = Pᵀ G, keeps r×n); galore-torch's rule."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def svd_basis(matrix: torch.Tensor, rank: int, side: str, method: str = "exact", seed: int = 0
              ) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
    """Top-`rank` singular vectors, Vh[:r] (r×n) for right or U[:, :r] (m×r) for left, as float32, with the singular
    values found (for the energy the rank keeps, spectrum.py): every one by the exact SVD, the top r + OVERSAMPLE
    by the randomized one (whose random directions come from `seed`, leaving torch's generator alone).

    An SVD that raises (LAPACK/cuSOLVER "failed to converge") or returns non-finite vectors is retried in
    float64; if that fails too the basis is None. The last value says what happened, for the run's log.
    """
    note = None
    for dtype in (torch.float32, torch.float64):
        try:
            if method == "randomized":
                u, s, vh = randomized_svd(matrix.to(dtype), rank, seed)
            else:
                u, s, vh = torch.linalg.svd(matrix.to(dtype), full_matrices=False)
        except RuntimeError as exc:  # torch.linalg.LinAlgError is a RuntimeError
            failure = f"SVD in {str(dtype).removeprefix('torch.')} failed ({str(exc).splitlines()[0]})"
        else:
            basis = vh[:rank] if side == "right" else u[:, :rank]
            if torch.isfinite(basis).all():
                return basis.float().contiguous(), s, note
            failure = f"SVD in {str(dtype).removeprefix('torch.')} returned non-finite vectors"
        note = failure if note is None else f"{note}; {failure}"
    return None, None, note


def randomized_svd(matrix: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m×k), S (k), Vh (k×n) of the top k = r + OVERSAMPLE singular triplets, approximately: a range finder
    with power iterations, then the exact SVD of the small k×n projection."""
    m, n = matrix.shape
    k = min(rank + OVERSAMPLE, m, n)
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    probe = torch.randn(n, k, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ probe).Q
    for _ in range(POWER_ITERATIONS):  # re-orthonormalised each pass: the small singular values survive rounding
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    u_small, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ u_small, s, vh


def store_projector(state: dict, basis: torch.Tensor, proj_dtype: str) -> None:
    """Write `basis` into state['projector'] (and state['projector_absmax'] for int8)."""
    if proj_dtype != "int8":
        state["projector"] = basis.to(getattr(torch, proj_dtype)).contiguous()
        return
    blocks = _blocks(basis.float())
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax)) / _INT8_MAX
    codes = torch.round(blocks / scale[:, None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    state["projector"] = codes.flatten()[: basis.numel()].reshape(basis.shape)
    state["projector_absmax"] = absmax


def load_projector(state: dict) -> torch.Tensor:
    """The stored projector as float32 (int8 codes dequantized: code · absmax / 127)."""
    stored = state["projector"]
    if stored.dtype != torch.int8:
        return stored.float()
    scale = state["projector_absmax"] / _INT8_MAX
    return (_blocks(stored.float()) * scale[:, None]).flatten()[: stored.numel()].reshape(stored.shape)


def projector_state_bytes(numel: int, proj_dtype: str) -> int:
    """Exact bytes `store_projector` keeps for a projector of `numel` elements (int8: codes plus block scales)."""
    if proj_dtype == "int8":
        return numel + 4 * -(-numel // INT8_BLOCKSIZE)
    return numel * getattr(torch, proj_dtype).itemsize


def _blocks(values: torch.Tensor) -> torch.Tensor:
    """`values` flattened and zero-padded into rows of INT8_BLOCKSIZE."""
    flat = values.flatten()
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % INT8_BLOCKSIZE))
    return padded.view(-1, INT8_BLOCKSIZE)


def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """Gradient into rank space: G Qᵀ (m×r) or Pᵀ G (r×n)."""
    basis = basis.to(grad.dtype)
    return grad @ basis.T if side == "right" else basis.T @ grad


def add_projected_back_(
    target: torch.Tensor, low_rank: torch.Tensor, basis: torch.Tensor, side: str, alpha: float,
    row_scale: torch.Tensor | None = None,
) -> None:
    """target += alpha · diag(row_scale) · back(low_rank), in place and without a full-size temporary.

    back(N) is N Q (right) or P N (left). Scaling rows of the small factor instead of the m×n result
    is what lets GradNormLoRP work on diag(g)·D directly.
    """
    basis = basis.to(target.dtype)
    low_rank = low_rank.to(target.dtype)
    if side == "right":
        left_factor, right_factor = low_rank, basis
    else:
        left_factor, right_factor = basis, low_rank
    if row_scale is not None:
        left_factor = left_factor * row_scale[:, None]
    target.addmm_(left_factor, right_factor, alpha=alpha)
