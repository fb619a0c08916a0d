"""Bad optimizer arguments fail at construction with a ValueError naming the problem; a rank above
min(m, n) is clamped with a warning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gnlorp.optim import ProjectedAdamW


def weight(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape))


@pytest.mark.parametrize(
    "group,kwargs,match",
    [
        ({"rank": 0}, {}, "rank"),
        ({"rank": -4}, {}, "rank"),
        ({"rank": 4, "proj_type": "sideways"}, {}, "proj_type"),
        ({"rank": 4, "update_proj_gap": 0}, {}, "update_proj_gap"),
        ({"rank": 4, "update_proj_gap": -1}, {}, "update_proj_gap"),
        ({"weight_norm": True}, {}, "weight_norm|rank"),
        ({}, {"lr": -1e-3}, "lr|learning rate"),
        ({}, {"betas": (1.0, 0.999)}, "beta"),
        ({}, {"betas": (0.9, -0.1)}, "beta"),
        ({}, {"eps": -1e-8}, "eps"),
        ({}, {"weight_decay": -0.1}, "weight.decay"),
        ({}, {"bits": 16}, "bits"),
        ({"lr": -1.0}, {}, "lr|learning rate"),  # per-group values are checked too
        ({"rank": 4, "betas": (0.9, 1.5)}, {}, "beta"),
    ],
)
def test_bad_argument_raises_value_error(group: dict, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ProjectedAdamW([{"params": [weight(8, 12)], **group}], **kwargs)


def test_rank_on_a_non_matrix_parameter_raises() -> None:
    with pytest.raises(ValueError, match=r"2-D|2D|dim|matri"):
        ProjectedAdamW([{"params": [weight(8, 12), weight(12)], "rank": 4}])


@pytest.mark.parametrize("shape", [(8, 12), (12, 8)])
def test_rank_above_min_dim_is_clamped_with_warning(shape: tuple[int, int]) -> None:
    p = weight(*shape)
    with pytest.warns(UserWarning, match="rank"):
        opt = ProjectedAdamW([{"params": [p], "rank": 20}])
        p.grad = torch.randn_like(p)
        opt.step()
    state = opt.state[p]
    assert state["projector"].shape == (8, 8)
    assert state["exp_avg"].shape == shape  # rank 8 = min(m, n): R keeps the full shape
