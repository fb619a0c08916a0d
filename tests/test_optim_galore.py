"""32-bit GaLore mode and plain groups of ProjectedAdamW against galore-torch, step by step.

galore-torch's `GaLoreAdamW` is the published reference; matching it on every side rule, with weight
decay, and across projector refreshes pins the step counter, the SVD timing, the bias correction,
the scale and the place of weight decay.
"""

from __future__ import annotations

import pytest
import torch
from galore_torch import GaLoreAdamW
from torch import nn

from gnlorp.optim import ProjectedAdamW
from optim_reference import (
    ReferenceProjectedAdam,
    mlp_loss,
    random_weight,
    relative_diff,
    small_mlp,
    synthetic_grad,
)

STEPS = 12  # with GAP = 4 the projector is refreshed at t = 0, 4, 8
GAP = 4
RANK = 8
SHAPES = [(24, 40), (40, 24), (32, 32)]  # left, right and square under 'std'
PROJ_TYPES = ["std", "reverse_std", "left", "right"]
HYPER = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-6}
TOL = 1e-4


def galore_keys(proj_type: str = "std", rank: int = RANK, gap: int = GAP, scale: float = 0.25) -> dict:
    """All four group keys spelled out, as galore-torch requires."""
    return {"rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": proj_type}


def galore_torch(groups: list[dict], **kwargs: object) -> GaLoreAdamW:
    return GaLoreAdamW(groups, no_deprecation_warning=True, **kwargs)


def run_lockstep(shape: tuple[int, int], ours_keys: dict, theirs_keys: dict, **kwargs: object) -> None:
    """Step one weight with ProjectedAdamW and galore-torch on identical grads; compare every step."""
    w0 = random_weight(shape)
    ours, theirs = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt_ours = ProjectedAdamW([{"params": [ours], **ours_keys}], **kwargs)
    opt_theirs = galore_torch([{"params": [theirs], **theirs_keys}], **kwargs)
    for t in range(STEPS):
        ours.grad, theirs.grad = synthetic_grad(ours, t), synthetic_grad(theirs, t)
        opt_ours.step()
        opt_theirs.step()
        if "rank" in theirs_keys:
            torch.testing.assert_close(
                opt_ours.state[ours]["projector"].float(),
                opt_theirs.state[theirs]["projector"].ortho_matrix,
                rtol=TOL,
                atol=TOL,
                msg=lambda m, t=t: f"projector differs after step {t + 1}: {m}",
            )
        assert relative_diff(ours.detach(), theirs.detach(), w0) <= TOL, f"weights differ after step {t + 1}"


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_galore_matches_galore_torch(shape: tuple[int, int], proj_type: str, weight_decay: float) -> None:
    keys = galore_keys(proj_type)
    run_lockstep(shape, keys, keys, weight_decay=weight_decay, **HYPER)


@pytest.mark.parametrize("shape", SHAPES)
def test_group_key_defaults_match_galore_paper(shape: tuple[int, int]) -> None:
    """A group with only `rank` means gap 200, scale 0.25, proj_type 'std'; optimizer defaults too."""
    run_lockstep(shape, {"rank": RANK}, galore_keys(gap=200))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"lr": 1e-2, "weight_decay": 0.5}, {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-8}],
)
def test_plain_group_matches_galore_torch_adamw(kwargs: dict) -> None:
    run_lockstep((24, 40), {}, {}, **kwargs)


def test_mixed_groups_follow_their_own_keys() -> None:
    """Per-group rank/gap/scale/proj_type/lr on a real loss, plus a plain group, in one optimizer."""
    models = [small_mlp(), small_mlp()]

    def groups(model: nn.Sequential) -> list[dict]:
        return [
            {"params": [model[0].weight], **galore_keys("std", rank=16, gap=3, scale=0.5)},
            {"params": [model[2].weight], **galore_keys("reverse_std", rank=16, gap=5)},
            {"params": [model[0].bias, model[2].bias], "lr": 3e-3},
        ]

    # Rank 16 is the rank of a batch of 16's gradient: a lower one cuts between near-equal singular values, and
    # a refresh there turns its subspace on the last bit of any weight, so rounding would decide the test.
    ours = ProjectedAdamW(groups(models[0]), weight_decay=0.1, **HYPER)
    theirs = galore_torch(groups(models[1]), weight_decay=0.1, **HYPER)
    starts = [p.detach().clone() for p in models[1].parameters()]
    for t in range(STEPS):
        for model, opt in zip(models, (ours, theirs), strict=True):
            opt.zero_grad()
            mlp_loss(model, t).backward()
            opt.step()
    for a, b, start in zip(models[0].parameters(), models[1].parameters(), starts, strict=True):
        assert relative_diff(a.detach(), b.detach(), start) <= TOL


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_galore_torch(shape: tuple[int, int], proj_type: str, weight_decay: float) -> None:
    """Self-check of tests/optim_reference.py, which the GradNormLoRP tests trust for the projection."""
    w0 = random_weight(shape)
    theirs = nn.Parameter(w0.clone())
    opt = galore_torch([{"params": [theirs], **galore_keys(proj_type)}], weight_decay=weight_decay, **HYPER)
    ref = ReferenceProjectedAdam(
        w0.clone(), rank=RANK, update_proj_gap=GAP, proj_type=proj_type, weight_decay=weight_decay, **HYPER
    )
    for t in range(STEPS):
        theirs.grad = synthetic_grad(theirs, t)
        opt.step()
        ref.step(synthetic_grad(ref.weight, t))
    assert relative_diff(ref.weight, theirs.detach(), w0) <= 1e-5
