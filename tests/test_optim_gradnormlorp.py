"""GradNormLoRP mode (weight_norm=True) against the plain reference of DESIGN §2.2.

The reference's gradient decomposition is checked against autograd through torch's own
`weight_norm` parametrization; its projection and Adam path against galore-torch (in
test_optim_galore.py). Then the optimizer must follow the reference step by step and keep
W = diag(g) D with unit-norm rows.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from gnlorp.optim import ProjectedAdamW
from optim_reference import (
    ReferenceProjectedAdam,
    projection_side,
    random_weight,
    relative_diff,
    synthetic_grad,
    weight_norm_grads,
)

STEPS = 12  # refreshes at t = 0, 4, 8
GAP = 4
RANK = 8
SHAPES = [(24, 40), (40, 24), (32, 32)]
PROJ_TYPES = ["std", "reverse_std", "left", "right"]
HYPER = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-6}
TOL = 1e-4


def regression_loss(layer: nn.Linear, seed: int = 3) -> Tensor:
    """A nonlinear loss of a Linear's output, so G is a generic full matrix."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(50, layer.in_features, generator=gen)
    y = torch.randn(50, layer.out_features, generator=gen)
    return ((torch.tanh(layer(x)) - y) ** 2).sum()


@pytest.mark.parametrize("shape", SHAPES)
def test_weight_norm_grads_match_autograd(shape: tuple[int, int]) -> None:
    """dg = rowsum(D*G) and dD = g(G - D dg) are what autograd gives for torch's weight_norm(dim=0)."""
    m, n = shape
    w = random_weight(shape)
    g = w.norm(dim=1)
    d = w / g[:, None]

    plain = nn.Linear(n, m, bias=False)
    with torch.no_grad():
        plain.weight.copy_(w)
    regression_loss(plain).backward()

    normed = weight_norm(nn.Linear(n, m, bias=False), dim=0)
    originals = normed.parametrizations.weight
    with torch.no_grad():
        originals.original0.copy_(g[:, None])
        originals.original1.copy_(d)
    torch.testing.assert_close(normed.weight, w)
    regression_loss(normed).backward()

    dg, dd = weight_norm_grads(d, g, plain.weight.grad)
    torch.testing.assert_close(dg, originals.original0.grad.squeeze(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dd, originals.original1.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gradnormlorp_matches_reference(shape: tuple[int, int], proj_type: str, weight_decay: float) -> None:
    w0 = random_weight(shape)
    p = nn.Parameter(w0.clone())
    keys = {"rank": RANK, "update_proj_gap": GAP, "scale": 0.25, "proj_type": proj_type}
    opt = ProjectedAdamW([{"params": [p], "weight_norm": True, **keys}], weight_decay=weight_decay, **HYPER)
    ref = ReferenceProjectedAdam(w0.clone(), weight_norm=True, weight_decay=weight_decay, **keys, **HYPER)
    g0 = w0.norm(dim=1)
    for t in range(STEPS):
        p.grad = synthetic_grad(p, t)
        opt.step()
        ref.step(synthetic_grad(ref.weight, t))
        state = opt.state[p]
        torch.testing.assert_close(
            state["projector"].float(),
            ref.projector,
            rtol=TOL,
            atol=TOL,
            msg=lambda m, t=t: f"projector (SVD of dD) differs after step {t + 1}: {m}",
        )
        assert relative_diff(state["magnitude"], ref.magnitude, g0) <= TOL, f"g differs after step {t + 1}"
        assert relative_diff(p.detach(), ref.weight, w0) <= TOL, f"W differs after step {t + 1}"


@pytest.mark.parametrize("shape", SHAPES)
def test_weight_stays_magnitude_times_unit_rows(shape: tuple[int, int]) -> None:
    """The model keeps an ordinary W, and state["magnitude"] is exactly its row norms: W = diag(g) D."""
    m, n = shape
    p = nn.Parameter(random_weight(shape))
    opt = ProjectedAdamW(
        [{"params": [p], "rank": RANK, "update_proj_gap": GAP, "weight_norm": True}], lr=5e-2, weight_decay=0.2
    )
    for t in range(STEPS):
        p.grad = synthetic_grad(p, t)
        opt.step()
        state = opt.state[p]
        torch.testing.assert_close(state["magnitude"], p.detach().norm(dim=1), rtol=1e-5, atol=1e-6)
    side = projection_side(shape, "std")
    assert state["projector"].shape == ((m, RANK) if side == "left" else (RANK, n))
    for key in ("magnitude", "magnitude_exp_avg", "magnitude_exp_avg_sq"):
        assert state[key].shape == (m,) and state[key].dtype == torch.float32, key
