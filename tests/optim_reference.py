"""Independent references and fixtures for the optimizer tests.

The reference below is written from DESIGN.md §2.1–2.2 and galore-torch's conventions and shares no
code with `gnlorp`, so a test that compares `gnlorp.optim` against it checks the math, not the code
against itself. Its GaLore mode is itself checked against galore-torch, and its weight-norm gradients
against autograd, so the reference is trusted on evidence rather than by construction.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn


def projection_side(shape: tuple[int, int], proj_type: str) -> str:
    """The side galore-torch projects on: 'right' (R = G Qᵀ, m×r) or 'left' (R = Pᵀ G, r×n)."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"unknown proj_type {proj_type!r}")


def svd_projector(matrix: Tensor, rank: int, side: str) -> Tensor:
    """Exact-SVD projector: U[:, :r] (m×r) for the left side, Vh[:r] (r×n) for the right side."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] if side == "left" else vh[:rank]


def project(grad: Tensor, projector: Tensor, side: str) -> Tensor:
    return projector.T @ grad if side == "left" else grad @ projector.T


def project_back(low_rank: Tensor, projector: Tensor, side: str) -> Tensor:
    return projector @ low_rank if side == "left" else low_rank @ projector


def weight_norm_grads(direction: Tensor, magnitude: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """DESIGN §2.2: gradients of W = diag(g) D w.r.t. g and D, with the radial part removed from dD."""
    dg = (direction * grad).sum(dim=1)
    dd = magnitude[:, None] * (grad - direction * dg[:, None])
    return dg, dd


class AdamMoments:
    """Adam's two moments with galore-torch's conventions (eps added to sqrt(S), no bias terms here)."""

    def __init__(self, betas: tuple[float, float], eps: float) -> None:
        self.betas, self.eps = betas, eps
        self.m: Tensor | None = None
        self.v: Tensor | None = None

    def normalized(self, grad: Tensor) -> Tensor:
        """Update M, S with `grad` and return N = M / (sqrt(S) + eps)."""
        b1, b2 = self.betas
        if self.m is None:
            self.m, self.v = torch.zeros_like(grad), torch.zeros_like(grad)
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        return self.m / (self.v.sqrt() + self.eps)


class ReferenceProjectedAdam:
    """One weight trained by plain AdamW, GaLore (rank) or GradNormLoRP (rank + weight_norm).

    Deliberately naive: recomputes everything from the formulas each step, keeps its state in
    attributes, updates `weight` in place.
    """

    def __init__(
        self,
        weight: Tensor,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        weight_norm: bool = False,
    ) -> None:
        self.weight = weight
        self.lr, self.betas, self.weight_decay = lr, betas, weight_decay
        self.rank = None if rank is None else min(rank, *weight.shape)
        self.gap, self.scale, self.weight_norm = update_proj_gap, scale, weight_norm
        self.side = projection_side(tuple(weight.shape), proj_type) if rank is not None else ""
        self.moments = AdamMoments(betas, eps)
        self.magnitude_moments = AdamMoments(betas, eps)
        self.magnitude: Tensor | None = None
        self.projector: Tensor | None = None
        self.t = 0

    def _step_size(self) -> float:
        b1, b2 = self.betas
        return self.lr * math.sqrt(1 - b2**self.t) / (1 - b1**self.t)

    @torch.no_grad()
    def step(self, grad: Tensor) -> None:
        w = self.weight
        if self.rank is None:
            self.t += 1
            w -= self._step_size() * self.moments.normalized(grad)
            w -= self.lr * self.weight_decay * w
            return
        if self.weight_norm:
            if self.magnitude is None:
                self.magnitude = w.norm(dim=1)
            direction = w / self.magnitude[:, None]
            dg, target = weight_norm_grads(direction, self.magnitude, grad)
        else:
            target = grad
        if self.t % self.gap == 0:
            self.projector = svd_projector(target, self.rank, self.side)
        self.t += 1
        n = self.moments.normalized(project(target, self.projector, self.side))
        update = self._step_size() * self.scale * project_back(n, self.projector, self.side)
        if not self.weight_norm:
            w -= update
            w -= self.lr * self.weight_decay * w
            return
        direction = direction - update
        magnitude = self.magnitude - self._step_size() * self.magnitude_moments.normalized(dg)
        magnitude = magnitude - self.lr * self.weight_decay * magnitude
        direction = direction / direction.norm(dim=1, keepdim=True)
        w.copy_(magnitude[:, None] * direction)
        self.magnitude = magnitude


def synthetic_grad(weight: Tensor, step: int, seed: int = 0) -> Tensor:
    """Gradient of L = 1e-3 (<A_t, W> + ||W||²/4), A_t seeded per step: full rank, feeding back on W.

    Small like a language model's gradients, so eps takes part in Adam's denominator (a misplaced eps
    shows) and entries of R near zero are smoothed by eps instead of roundoff deciding their sign.
    """
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return 1e-3 * (torch.randn(weight.shape, generator=gen) + 0.5 * weight.detach())


def random_weight(shape: tuple[int, int], seed: int = 0) -> Tensor:
    """A weight whose row norms differ (0.5–2×), so magnitude and direction both matter."""
    gen = torch.Generator().manual_seed(seed)
    rows = 0.5 + 1.5 * torch.rand(shape[0], 1, generator=gen)
    return torch.randn(shape, generator=gen) * rows / math.sqrt(shape[1])


def relative_diff(actual: Tensor, expected: Tensor, start: Tensor) -> float:
    """||actual - expected|| relative to how far `expected` moved from `start` (not to its size)."""
    return ((actual - expected).norm() / (expected - start).norm()).item()


GroupPredicate = Callable[[str, nn.Parameter], bool]


def param_groups(
    model: nn.Module,
    method: str,
    *,
    rank: int,
    update_proj_gap: int,
    target: GroupPredicate = lambda name, p: p.ndim == 2,
) -> list[dict]:
    """Parameter groups as the methods use them: targets get `rank` (and weight_norm), the rest plain."""
    if method == "plain":
        return [{"params": list(model.parameters())}]
    named = list(model.named_parameters())
    targets = [p for n, p in named if target(n, p)]
    rest = [p for n, p in named if not target(n, p)]
    projected = {"params": targets, "rank": rank, "update_proj_gap": update_proj_gap}
    return [{**projected, "weight_norm": method == "gradnormlorp"}, {"params": rest}]


def small_mlp(seed: int = 0) -> nn.Sequential:
    """Two layers, shapes (128, 64) and (64, 128): both projection sides, 8-bit-sized moments at rank 32."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64))


def mlp_loss(model: nn.Module, step: int) -> Tensor:
    """Regression onto a fixed random teacher, batch seeded by the step so runs can be resumed."""
    gen = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(16, 64, generator=gen)
    teacher = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) / 8
    return nn.functional.mse_loss(model(x), torch.tanh(x @ teacher))


def zen_of_python_bytes() -> Tensor:
    """Real English text available offline: the Zen of Python, as byte tokens."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return torch.tensor(list(codecs.decode(this.s, "rot13").encode()), dtype=torch.long)


def tiny_llama(seed: int = 0) -> nn.Module:
    """A byte-level LLaMA small enough for CPU tests; hidden 128 so rank-32 moments get 8-bit storage."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def lm_batches(tokens: Tensor, steps: int, batch: int = 8, seq: int = 64, seed: int = 0) -> Iterator[Tensor]:
    """Deterministic random windows of the text, the same for every run."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seq, (batch,), generator=gen)
        yield torch.stack([tokens[s : s + seq] for s in starts.tolist()])
