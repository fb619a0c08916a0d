"""Safe checkpoints: the optimizer state of every mode loads with `torch.load(weights_only=True)` and resumes
bit-exactly, including int8 projectors, staggered refreshes and the counters left by a skipped update and
an SVD fallback. The reference is the uninterrupted run; the file goes through the real torch.save."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from gnlorp.optim import ProjectedAdamW
from optim_reference import mlp_loss, param_groups, small_mlp

STEPS = 14
GAP = 4
# The first matrix skips t = 3, so its refreshes (its own steps 4, 8) fall at t = 5, where float32 SVD fails,
# and t = 9, the first resumed step; the second matrix, staggered by 2, refreshes at t = 6 and 10.
SPLIT = 9
_svd = torch.linalg.svd


def svd_failing_at(steps: set[int], clock: list[int]):
    """torch.linalg.svd that fails in float32 at the given optimizer steps (the float64 retry then succeeds)."""

    def svd(matrix, *args, **kwargs):
        if clock[0] in steps and matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return _svd(matrix, *args, **kwargs)

    return svd


def build(method: str, bits: int, proj_dtype: str) -> tuple[nn.Module, ProjectedAdamW]:
    model = small_mlp(seed=0)
    groups = param_groups(model, method, rank=32, update_proj_gap=GAP)
    return model, ProjectedAdamW(groups, lr=1e-2, weight_decay=0.1, bits=bits, proj_dtype=proj_dtype,
                                 stagger_refresh=True)


def train(model: nn.Module, opt: ProjectedAdamW, steps: range, clock: list[int]) -> None:
    for t in steps:
        clock[0] = t
        opt.zero_grad()
        mlp_loss(model, t).backward()
        if t == 3:  # a gradient that overflowed: the update of this matrix is skipped
            model[0].weight.grad[5, 5] = float("inf")
        opt.step()


MODES = list(itertools.product(["galore", "gradnormlorp"], [32, 8, 4], ["float32", "bfloat16", "int8"]))


@pytest.mark.parametrize("method,bits,proj_dtype", MODES)
def test_weights_only_checkpoint_resumes_bit_exactly(method, bits, proj_dtype, tmp_path: Path, monkeypatch) -> None:
    clock = [0]
    monkeypatch.setattr(torch.linalg, "svd", svd_failing_at({5}, clock))
    model, opt = build(method, bits, proj_dtype)
    train(model, opt, range(SPLIT), clock)
    first = opt.state[model[0].weight]
    assert int(first["nonfinite_skips"]) == 1 and int(first["projector_fallbacks"]) == 1
    assert first["projector"].dtype == getattr(torch, proj_dtype)
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "checkpoint.pt")
    train(model, opt, range(SPLIT, STEPS), clock)

    loaded = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    fresh_model, fresh_opt = build(method, bits, proj_dtype)
    fresh_model.load_state_dict(loaded["model"])
    fresh_opt.load_state_dict(loaded["optim"])
    train(fresh_model, fresh_opt, range(SPLIT, STEPS), clock)
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), fresh_model.parameters(), strict=True):
        original, resumed = opt.state[p], fresh_opt.state[q]
        assert original.keys() == resumed.keys()
        for key in original:
            assert original[key].dtype == resumed[key].dtype and torch.equal(original[key], resumed[key]), key
