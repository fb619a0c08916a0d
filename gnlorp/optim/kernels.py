"""Adam on one chunk: the moments, the direction N = M / (√S + ε), and for plain groups the weight.

Each kernel is plain torch on a chunk: run as it is (eager), it is the reference and works on any device;
through `torch.compile` the decode, Adam and encode of a quantized chunk become one loop instead of a dozen
passes, several times faster on a CPU. Compiled kernels are used where a caller asks for them; if
compiling fails (no C++ compiler, an unsupported device) the eager kernels take over for the rest of
the process, with one warning. Plain fp32 weights with fp32 moments take torch's own fused AdamW kernel.

Conventions are galore-torch's (eps outside the square root, bias correction in the step size, weight
decay after the update), so every path computes the same numbers up to float32 rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .codec import decode, encode


def adam_32(grad, exp_avg, exp_avg_sq, beta1, beta2, eps):
    """Update fp32 moments in place with an fp32 `grad` and return N = M / (√S + ε).

    Scalars multiply tensors instead of going in as `alpha=`: torch.compile then keeps them as inputs, where an
    `alpha` would be baked into the kernel and recompiled at every step (the step size changes each step).
    """
    exp_avg.mul_(beta1).add_(grad * (1 - beta1))
    exp_avg_sq.mul_(beta2).add_(grad * grad * (1 - beta2))
    return exp_avg / exp_avg_sq.sqrt().add_(eps)


def adam_q(grad, m_codes, m_absmax, v_codes, v_absmax, m_tables, v_tables, beta1, beta2, eps):
    """`adam_32` on 8- or 4-bit moments: decode, update, encode back; N comes from the moments before encoding."""
    exp_avg, exp_avg_sq = decode(m_codes, m_absmax, m_tables), decode(v_codes, v_absmax, v_tables)
    direction = adam_32(grad.view_as(exp_avg), exp_avg, exp_avg_sq, beta1, beta2, eps)
    for codes, absmax, values, tables in ((m_codes, m_absmax, exp_avg, m_tables),
                                          (v_codes, v_absmax, exp_avg_sq, v_tables)):
        new_codes, new_absmax = encode(values, tables)
        codes.copy_(new_codes.view_as(codes))
        absmax.copy_(new_absmax)
    return direction


def step_weight(p, direction, step_size, decay):
    """p ← (p − step_size · N) · decay, computed in fp32 and rounded to p's dtype once."""
    weight = p.float()  # p itself when it is fp32
    weight.sub_(direction.view_as(weight) * step_size).mul_(decay)
    if weight is not p:
        p.copy_(weight)


def plain_32(p, grad, exp_avg, exp_avg_sq, step_size, decay, beta1, beta2, eps):
    step_weight(p, adam_32(grad.float(), exp_avg, exp_avg_sq, beta1, beta2, eps), step_size, decay)


def plain_q(p, grad, m_codes, m_absmax, v_codes, v_absmax, m_tables, v_tables, step_size, decay, beta1, beta2, eps):
    direction = adam_q(grad.float(), m_codes, m_absmax, v_codes, v_absmax, m_tables, v_tables, beta1, beta2, eps)
    step_weight(p, direction, step_size, decay)


_compiled: dict[Callable, Callable] = {}
_compile_error: list[str] = []  # the first failure; once set, every call runs eagerly


def run(kernel: Callable, *args, compiled: bool = False):
    """`kernel(*args)`, through torch.compile when `compiled` (and compiling has not failed before)."""
    if compiled and not _compile_error:
        if kernel not in _compiled:
            _compiled[kernel] = torch.compile(kernel, dynamic=True)
        try:
            return _compiled[kernel](*args)
        except Exception as exc:  # a missing compiler or an unsupported device: the eager kernel is the same math
            _compile_error.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}")
            warnings.warn(f"torch.compile failed ({_compile_error[0]}); the optimizer runs its eager kernels",
                          stacklevel=2)
    return kernel(*args)


def fused_adamw_(p, grad, exp_avg, exp_avg_sq, step: int, lr, beta1, beta2, eps, weight_decay) -> bool:
    """torch's fused AdamW kernel on one fp32 parameter, with hyperparameters mapped to our conventions.

    torch multiplies by 1 − lr·wd first and divides by √S/√bc2 + eps; galore-torch divides by √S + eps and
    multiplies after the update. With eps/√bc2 for eps, lr·(1 − lr·wd) for lr and wd/(1 − lr·wd) for wd the
    two are the same numbers up to rounding. False (nothing done) where the kernel does not apply.
    """
    fused = getattr(torch, "_fused_adamw_", None)
    decay = lr * weight_decay
    if fused is None or decay >= 1 or p.device.type not in ("cpu", "cuda"):
        return False
    steps = [torch.tensor(float(step), device=p.device)]
    fused([p], [grad], [exp_avg], [exp_avg_sq], [], steps, lr=lr * (1 - decay), beta1=beta1, beta2=beta2,
          weight_decay=weight_decay / (1 - decay), eps=eps / (1 - beta2**step) ** 0.5, amsgrad=False,
          maximize=False)
    return True
