"""Resume exactness: a run stopped, saved, loaded into a fresh model and optimizer and continued ends
with the same weights as the uninterrupted run, in every mode. Anything kept outside `opt.state` (a
projector object, a step counter, a cached copy) or cast on load (uint8 moments, bf16 projectors)
breaks it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from gnlorp.optim import ProjectedAdamW
from optim_reference import mlp_loss, param_groups, small_mlp

STEPS = 12
GAP = 4  # refreshes at t = 0, 4, 8
SPLITS = {
    "between_refreshes": 6,  # after the refresh at t=4, before the one at t=8
    "at_refresh": 8,  # the first resumed step must refresh the projector
}
MODES = [
    ("galore", 32, None),
    ("galore", 8, None),
    ("gradnormlorp", 32, None),
    ("gradnormlorp", 8, None),
    ("plain", 32, None),
    ("plain", 8, None),
    ("galore", 4, None),
    ("gradnormlorp", 4, None),
    ("plain", 4, None),
    ("galore", 32, torch.bfloat16),
    ("gradnormlorp", 32, torch.bfloat16),
]


def build(method: str, bits: int, proj_dtype: torch.dtype | None) -> tuple[nn.Module, ProjectedAdamW]:
    """Rank 32 on the MLP's (128,64) and (64,128) weights: both sides, moments big enough for 8 bits."""
    model = small_mlp(seed=0)
    groups = param_groups(model, method, rank=32, update_proj_gap=GAP)
    extra = {} if proj_dtype is None else {"proj_dtype": proj_dtype}
    return model, ProjectedAdamW(groups, lr=1e-2, weight_decay=0.1, bits=bits, **extra)


def train(model: nn.Module, opt: ProjectedAdamW, steps: range) -> None:
    for t in steps:
        opt.zero_grad()
        mlp_loss(model, t).backward()
        opt.step()


def state_tensors(opt: ProjectedAdamW) -> dict[tuple[int, str], Tensor]:
    """Every state tensor by (parameter index, key), copied."""
    return {(i, k): v.clone() for i, s in opt.state_dict()["state"].items() for k, v in s.items()}


def assert_exercises_dtypes(
    state: dict[tuple[int, str], Tensor], method: str, bits: int, proj_dtype: torch.dtype | None
) -> None:
    """The saved state holds the dtypes this mode is about, so the round-trip really tests them."""
    dtypes = {key: {v.dtype for (_, k), v in state.items() if k == key} for _, key in state}
    assert (torch.uint8 in dtypes["exp_avg"]) == (bits < 32)  # biases stay fp32: under 4096 elements
    if method != "plain":
        assert dtypes["projector"] == {proj_dtype or (torch.bfloat16 if bits < 32 else torch.float32)}
    if method == "gradnormlorp":
        assert dtypes["magnitude"] == {torch.float32}


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
@pytest.mark.parametrize("method,bits,proj_dtype", MODES)
def test_resume_continues_exactly(
    method: str, bits: int, proj_dtype: torch.dtype | None, split: int, tmp_path: Path
) -> None:
    model, opt = build(method, bits, proj_dtype)
    train(model, opt, range(split))
    saved_state = state_tensors(opt)
    assert_exercises_dtypes(saved_state, method, bits, proj_dtype)
    checkpoint = {"model": model.state_dict(), "optim": opt.state_dict()}
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    in_memory = copy.deepcopy(checkpoint)
    train(model, opt, range(split, STEPS))

    for loaded in (in_memory, torch.load(tmp_path / "checkpoint.pt", weights_only=True)):
        fresh_model, fresh_opt = build(method, bits, proj_dtype)
        fresh_model.load_state_dict(loaded["model"])
        fresh_opt.load_state_dict(loaded["optim"])
        restored = state_tensors(fresh_opt)
        assert restored.keys() == saved_state.keys()
        for key, value in saved_state.items():
            assert restored[key].dtype == value.dtype, key
            assert torch.equal(restored[key], value), key
        train(fresh_model, fresh_opt, range(split, STEPS))
        for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
            assert (a - b).abs().max() <= 1e-6
