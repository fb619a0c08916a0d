"""Layer-wise stepping (the optimizer runs inside backward, one parameter at a time) must give the
same trajectory as backward() followed by step(), free every gradient, and be removable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gnlorp.optim import ProjectedAdamW, register_layerwise_step
from optim_reference import mlp_loss, param_groups, small_mlp

STEPS = 6  # GAP = 4: includes the projector refresh at t = 4
GAP = 4


def build(method: str, bits: int) -> tuple[nn.Module, ProjectedAdamW]:
    model = small_mlp(seed=0)
    groups = param_groups(model, method, rank=32, update_proj_gap=GAP)
    return model, ProjectedAdamW(groups, lr=1e-2, weight_decay=0.1, bits=bits)


def normal_step(model: nn.Module, opt: ProjectedAdamW, t: int) -> None:
    opt.zero_grad()
    mlp_loss(model, t).backward()
    opt.step()


def max_weight_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("method", ["galore", "gradnormlorp", "plain"])
def test_layerwise_matches_step_after_backward(method: str, bits: int) -> None:
    model, opt = build(method, bits)
    layerwise_model, layerwise_opt = build(method, bits)
    handle = register_layerwise_step(layerwise_opt)
    for t in range(STEPS):
        normal_step(model, opt, t)
        mlp_loss(layerwise_model, t).backward()
        assert all(p.grad is None for p in layerwise_model.parameters()), "layer-wise mode must free grads"
        assert max_weight_diff(model, layerwise_model) <= 1e-6, f"weights differ after step {t + 1}"
    handle.remove()


def test_remove_restores_normal_backward() -> None:
    """After handle.remove(), backward only accumulates grads and step() does the update again."""
    model, opt = build("gradnormlorp", 32)
    layerwise_model, layerwise_opt = build("gradnormlorp", 32)
    handle = register_layerwise_step(layerwise_opt)
    normal_step(model, opt, 0)
    mlp_loss(layerwise_model, 0).backward()
    handle.remove()

    before = [p.detach().clone() for p in layerwise_model.parameters()]
    mlp_loss(layerwise_model, 1).backward()
    assert all(p.grad is not None for p in layerwise_model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(layerwise_model.parameters(), before, strict=True))
    layerwise_opt.step()
    normal_step(model, opt, 1)
    assert max_weight_diff(model, layerwise_model) <= 1e-6
