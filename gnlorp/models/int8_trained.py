"""Int8 trained weights in a model: the target linears' weights become Int8Weight parameters (models/int8_weight.py).

full, galore and gradnormlorp at weight_bits 8 train them in place; a checkpoint stores their codes and scales as
they are (`{name}` int8 and `{name}.int8_scale` fp32), so resuming continues from the exact same bits, and the export
turns them back into plain weights of the run's dtype (`dequantize_trained`), which compute what the int8 layers
did, at no cost at inference.
"""

from __future__ import annotations

import torch
from torch import nn

from .int8_weight import Int8Weight

SCALE_SUFFIX = ".int8_scale"


@torch.no_grad()
def quantize_trained(model: nn.Module, names: list[str]) -> nn.Module:
    """Hold the weights of the linear layers `names` as int8 (rounded to nearest), trainable; return the model."""
    for name in names:
        module = model.get_submodule(name)
        weight = module.weight
        module.weight = nn.Parameter(Int8Weight.from_float(weight.detach()), requires_grad=weight.requires_grad)
    return model


@torch.no_grad()
def dequantize_trained(model: nn.Module) -> nn.Module:
    """Every int8 trained weight back to a plain parameter of its dtype, holding the value it computed with."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, Int8Weight):
            module.weight = nn.Parameter(weight.dequantize(), requires_grad=weight.requires_grad)
    return model


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and persistent buffers by state_dict name, a tied tensor under its first name only."""
    seen: set[int] = set()
    unique = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique[name] = tensor.detach()
    return unique


def stored_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model (tied ones once), an int8 weight as its codes plus `name + SCALE_SUFFIX`."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in _unique_state(model).items():
        if isinstance(tensor, Int8Weight):
            tensors[name], tensors[name + SCALE_SUFFIX] = tensor.codes, tensor.scale
        else:
            tensors[name] = tensor.contiguous()
    return tensors


@torch.no_grad()
def load_stored(model: nn.Module, saved: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy `stored_tensors` output into `model`: codes and scales into its int8 weights, or, dequantized, into a
    plain weight (the model rebuilt at full precision for export). Returns (missing, unexpected) names."""
    own = _unique_state(model)
    scaled = {name.removesuffix(SCALE_SUFFIX) for name in saved if name.endswith(SCALE_SUFFIX)}
    needs_scale = {name for name, tensor in own.items() if isinstance(tensor, Int8Weight)}
    missing = sorted((set(own) - set(saved)) | {name + SCALE_SUFFIX for name in needs_scale - scaled})
    unexpected = sorted((set(saved) - set(own) - {name + SCALE_SUFFIX for name in scaled}) |
                        {name + SCALE_SUFFIX for name in scaled - set(own)})
    if missing or unexpected:
        return missing, unexpected
    for name, target in own.items():
        value, scale = saved[name], saved.get(name + SCALE_SUFFIX)
        if target.shape != value.shape or (isinstance(target, Int8Weight) and target.scale.shape != scale.shape):
            raise RuntimeError(f"size mismatch for {name}")
        if isinstance(target, Int8Weight):
            target.codes.copy_(value)
            target.scale.copy_(scale)
        elif scale is not None:
            target.copy_(Int8Weight(value, scale, target.dtype).dequantize())
        else:
            target.copy_(value)
    return [], []
