"""Int8Weight: a trained weight held as int8 codes and fp32 group scales (rounding.py) that trains like any other.

It is a tensor subclass, so the optimizer keys its state on it, the gradient hooks fire on it and the model's
linear layers keep their class: `F.linear` on it runs `_Int8Linear`, which dequantizes the weight for the matmul
and again in backward (one layer's matrix at a time) and returns a plain gradient in the weight's dtype. The
optimizer reads and writes it by rows (`read_rows`, `write_rows`); any other read (`.float()`, an index, a
norm) sees the dequantized value, and any other in-place write is refused rather than lost.

It is deliberately not a traceable subclass (no `__tensor_flatten__`): `Module.to` would then swap the parameter
with itself even on its own device, which silently drops its gradient hooks (the layer-wise updates). A move to
another device makes a new parameter, so a model holding int8 weights moves before its optimizer is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from .rounding import dequantize, group_size, quantize

aten = torch.ops.aten
QUANTIZE_NUMEL = 1 << 20


class Int8Weight(torch.Tensor):
    """A 2-D weight of `dtype` stored as `codes` (int8, its shape) and `scale` (fp32, rows × groups)."""

    codes: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, requires_grad: bool = False):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=dtype, device=codes.device,
                                                   requires_grad=requires_grad)

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, requires_grad: bool = False):
        self.codes, self.scale = codes, scale

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Weight:
        """`weight` rounded to the nearest codes: deterministic, so a rebuilt model starts where the run did. By row
        chunks of about QUANTIZE_NUMEL weights, so quantizing a large matrix holds no fp32 copy of it."""
        rows, cols = weight.shape
        codes = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
        scale = torch.empty(rows, cols // group_size(cols), dtype=torch.float32, device=weight.device)
        step = max(1, QUANTIZE_NUMEL // cols)
        for start in range(0, rows, step):
            codes[start:start + step], scale[start:start + step] = quantize(weight[start:start + step])
        return cls(codes, scale, weight.dtype)

    def __repr__(self) -> str:
        return f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, groups={self.scale.shape[1]})"

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.codes, self.scale, dtype or self.dtype)

    def read_rows(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [start, end) dequantized into `out` (fp32, end − start rows)."""
        return dequantize(self.codes[start:end], self.scale[start:end], out.dtype, out=out)

    def write_rows(self, start: int, end: int, rows: torch.Tensor, generator: torch.Generator | None) -> None:
        """Store `rows` as rows [start, end): new scales, codes rounded stochastically (or to nearest without a
        generator). In place, so every reference to this weight sees it."""
        codes, scale = quantize(rows, generator)
        self.codes[start:end] = codes
        self.scale[start:end] = scale

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, *bias = (*args, *kwargs.values())
            return _Int8Linear.apply(x, weight, bias[0] if bias else None)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.detach.default:
            (weight,) = args
            return Int8Weight(weight.codes, weight.scale, weight.dtype)
        if func is aten._to_copy.default:
            weight, dtype = args[0], kwargs.get("dtype")
            device = kwargs.get("device") or weight.device
            if dtype in (None, weight.dtype):  # a move (model.to(device)): it stays int8
                return Int8Weight(weight.codes.to(device, copy=True), weight.scale.to(device, copy=True),
                                  weight.dtype)
            return weight.dequantize(dtype).to(device)  # a read such as .float(), straight into that dtype
        if func._schema.is_mutable:
            raise TypeError(f"{func} would change an int8 trained weight in place and is not supported: the "
                            "optimizer writes it through write_rows")
        plain = tree_map(lambda t: t.dequantize() if isinstance(t, Int8Weight) else t, (args, kwargs))
        return func(*plain[0], **plain[1])


class _Int8Linear(torch.autograd.Function):
    """x·Wᵀ + b with W dequantized for the forward and again for the backward, never kept between them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x = x.to(dtype)
        ctx.save_for_backward(x)
        ctx.weight, ctx.has_bias = weight, bias is not None
        with torch.autocast(device, enabled=False):
            return F.linear(x, weight.dequantize(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        weight: Int8Weight = ctx.weight
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.dequantize(grad_out.dtype)
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = (flat_out.T @ x.reshape(-1, x.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_out.sum(0)
        return grad_x, grad_w, grad_b
