"""Storage of Adam moments: fp32, or 8-bit blockwise with bitsandbytes' dynamic quantization.

An 8-bit moment is two tensors in the optimizer state, the uint8 codes (`key`) and one fp32 scale
per block (`key + "_absmax"`), so the state stays plain tensors. Whether a moment is quantized is read
off its dtype, not stored beside it. As bitsandbytes does, tensors under `MIN_8BIT_NUMEL` elements
stay fp32: their scales would cost more than they save.
"""

from __future__ import annotations

from functools import cache

import torch

BLOCKSIZE = 256
MIN_8BIT_NUMEL = 4096

# The first moment is signed; the second is non-negative, so an unsigned map gives it twice the resolution.
SIGNED = {"exp_avg": True, "exp_avg_sq": False}


@cache
def _bnb():
    """bitsandbytes, imported on first use: it takes seconds, and a CLI that only checks its input needs none."""
    import bitsandbytes.functional

    return bitsandbytes.functional


@cache
def _code(signed: bool, device: torch.device) -> torch.Tensor:
    return _bnb().create_dynamic_map(signed=signed).to(device)


def init_moments(state: dict, shape: torch.Size, device: torch.device, bits: int) -> None:
    """Zero first and second moments of `shape`, quantized when `bits` is 8 and the tensor is large enough."""
    numel = shape.numel()
    for key in SIGNED:
        if bits == 8 and numel >= MIN_8BIT_NUMEL:
            state[key] = torch.zeros(shape, dtype=torch.uint8, device=device)
            state[key + "_absmax"] = torch.zeros(-(-numel // BLOCKSIZE), dtype=torch.float32, device=device)
            write_moment(state, key, torch.zeros(shape, device=device))
        else:
            state[key] = torch.zeros(shape, dtype=torch.float32, device=device)


def read_moment(state: dict, key: str) -> torch.Tensor:
    """The moment as fp32: the stored tensor itself (updated in place) or a dequantized copy."""
    stored = state[key]
    if stored.dtype != torch.uint8:
        return stored
    return _bnb().dequantize_blockwise(
        stored, absmax=state[key + "_absmax"], code=_code(SIGNED[key], stored.device), blocksize=BLOCKSIZE
    )


def write_moment(state: dict, key: str, value: torch.Tensor) -> None:
    """Store an updated moment; a no-op for fp32 moments, which `read_moment` handed out by reference."""
    stored = state[key]
    if stored.dtype != torch.uint8:
        return
    _bnb().quantize_blockwise(
        value.contiguous(), code=_code(SIGNED[key], stored.device), absmax=state[key + "_absmax"],
        out=stored, blocksize=BLOCKSIZE,
    )
