"""build_optimizer: the ProjectedAdamW `gnlorp train` builds, for any Hugging Face model and any training loop.

Its parameter groups come from the method (methods/) and its settings' defaults, ranges and messages from
RunConfig, so transformers' Trainer, a loop of one's own and the engine (which calls it too) get the same
optimizer from the same settings, and a bad value the same one-line ConfigError the CLI prints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..config import ConfigError, RunConfig
from ..methods import get_method
from .adamw import ProjectedAdamW
from .layerwise import register_layerwise_step

if TYPE_CHECKING:
    from torch import nn

# RunConfig's optimizer settings that build_optimizer takes as keywords, beside its named arguments.
OPTIMIZER_KNOBS = ("update_proj_gap", "scale", "proj_type", "proj_dtype", "stagger_refresh", "adaptive_refresh",
                   "svd", "weight_rounding", "seed")
_DEFAULT = RunConfig()  # the signature's defaults are RunConfig's, never written twice


def build_optimizer(model: nn.Module, method: str = _DEFAULT.method, rank: int = _DEFAULT.rank,
                    bits: int = _DEFAULT.optim_bits, lr: float = _DEFAULT.lr, targets: str = _DEFAULT.targets,
                    weight_decay: float = _DEFAULT.weight_decay, layerwise: bool = _DEFAULT.layerwise,
                    **knobs: Any) -> ProjectedAdamW:
    """The optimizer `gnlorp train --method METHOD ...` would build for `model`, ready for
    `Trainer(optimizers=(optimizer, scheduler))` or a loop of one's own.

    full, galore and gradnormlorp take any model as it is: its trainable parameters train, galore and
    gradnormlorp project the 2-D weights of the `targets` linear layers ('auto': attention and MLP, never a head)
    with rank `rank`. lora, dora and vera train the adapters of a model already wrapped by peft (their rank is
    the adapter's; `rank` and `targets` are not used), with plain AdamW at `bits`. `knobs` are RunConfig's other
    optimizer settings (OPTIMIZER_KNOBS), with its defaults.

    `layerwise=True` registers register_layerwise_step's hooks: backward() steps each parameter and frees its
    gradient, so the returned optimizer's step() and zero_grad() find no gradients and do nothing, and Trainer
    may call them; a scheduler still sets the learning rate the next backward uses. It needs one process, no
    gradient accumulation and no clipping by the global norm (Trainer: max_grad_norm=0). The hooks stay for the
    parameters' lifetime; call register_layerwise_step yourself for a handle that removes them.
    """
    cfg = _config(method=method, rank=rank, bits=bits, lr=lr, targets=targets, weight_decay=weight_decay,
                  layerwise=layerwise, **knobs)
    strategy = get_method(cfg.method)
    if strategy.uses_adapter:
        _check_adapters(model, cfg.method)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if cfg.layerwise and distributed and torch.distributed.get_world_size() > 1:
        raise ConfigError("layerwise cannot run data-parallel (its hooks fire before the all-reduce): set it off "
                          "or run one process")
    optimizer = ProjectedAdamW(strategy.param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                               bits=cfg.optim_bits, weight_rounding=cfg.weight_rounding, rounding_seed=cfg.seed)
    if cfg.layerwise:
        register_layerwise_step(optimizer)
    return optimizer


def _config(*, method: str, rank: int, bits: int, lr: float, targets: str, weight_decay: float, layerwise: bool,
            **knobs: Any) -> RunConfig:
    """build_optimizer's arguments as a validated RunConfig; an unknown keyword is a ConfigError naming the valid
    ones."""
    unknown = sorted(set(knobs) - set(OPTIMIZER_KNOBS))
    if unknown:
        valid = ", ".join(("method", "rank", "bits", "lr", "targets", "weight_decay", "layerwise", *OPTIMIZER_KNOBS))
        raise ConfigError(f"unknown optimizer setting {unknown[0]!r}; valid settings: {valid}")
    # max_grad_norm 0: clipping belongs to the caller's loop, so RunConfig's "layerwise cannot clip" is not ours.
    return RunConfig(method=method, rank=rank, optim_bits=bits, lr=lr, targets=targets, weight_decay=weight_decay,
                     layerwise=layerwise, max_grad_norm=0.0, **knobs).validate()


def optimizer_settings(cfg: RunConfig) -> dict[str, Any]:
    """A run's optimizer settings as build_optimizer's keyword arguments: how the engine calls it."""
    return {"method": cfg.method, "rank": cfg.rank, "bits": cfg.optim_bits, "lr": cfg.lr, "targets": cfg.targets,
            "weight_decay": cfg.weight_decay, "layerwise": cfg.layerwise,
            **{name: getattr(cfg, name) for name in OPTIMIZER_KNOBS}}


def _check_adapters(model: nn.Module, method: str) -> None:
    """An adapter method on a model without trainable adapters would train nothing, or every weight: say so."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(module, BaseTunerLayer) and any(p.requires_grad for p in module.parameters())
               for module in model.modules()):
        raise ConfigError(f"{method} trains peft adapters and this {type(model).__name__} has no trainable one: "
                          f"wrap it first (model = peft.get_peft_model(model, config)), or use method galore or "
                          f"gradnormlorp on the model as it is")
