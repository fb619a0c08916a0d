"""Adapter methods through peft (LoRA, DoRA, VeRA): the base is frozen and small added tensors train.

peft owns the adapter math, its initialisation and its merge; a method here only says which peft
config to build from a RunConfig. peft is imported inside the functions because it is slow to import.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..config import RunConfig
from .base import Method, resolve_targets

if TYPE_CHECKING:
    from peft import PeftConfig
    from torch import nn

# peft's task types: SEQ_CLS keeps the new classifier head (`classifier`/`score`) fully trainable.
PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS"}


@dataclass(frozen=True)
class AdapterMethod(Method):
    """A peft adapter on the resolved targets; merging folds it into the weights."""

    uses_adapter: ClassVar[bool] = True

    def prepare(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        import torch
        from peft import get_peft_model

        # On the meta device (the estimator's model) the adapters, and VeRA's shared random matrices, go there too:
        # initialising them on the CPU takes seconds at 7B. Not peft's low_cpu_mem_usage: it patches nn.Module for
        # the whole process, so a model built meanwhile in another thread (the studio's export) would be empty.
        on_meta = next(model.parameters()).is_meta
        with torch.device("meta") if on_meta else nullcontext():
            return get_peft_model(model, self.peft_config(resolve_targets(model, cfg), cfg))

    def peft_config(self, targets: list[str], cfg: RunConfig) -> PeftConfig:
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        # safe_merge checks the merged weights for NaN/inf before replacing the originals.
        return model.merge_and_unload(safe_merge=True)


@dataclass(frozen=True)
class LoraMethod(AdapterMethod):
    """LoRA: ΔW = (α/r)·B·A per target; with `use_dora`, DoRA adds a trained magnitude per output row."""

    use_dora: bool = False

    def peft_config(self, targets: list[str], cfg: RunConfig) -> PeftConfig:
        from peft import LoraConfig

        return LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets,
                          use_dora=self.use_dora, task_type=PEFT_TASK_TYPES[cfg.task])


@dataclass(frozen=True)
class VeraMethod(AdapterMethod):
    """VeRA: ΔW = Λ_b·B·Λ_d·A with A, B frozen, shared and regenerated from the run's seed."""

    def peft_config(self, targets: list[str], cfg: RunConfig) -> PeftConfig:
        from peft import VeraConfig

        return VeraConfig(r=cfg.rank, d_initial=cfg.vera_d_initial, projection_prng_key=cfg.seed,
                          target_modules=targets, task_type=PEFT_TASK_TYPES[cfg.task])


LORA = LoraMethod("lora", "Trains low-rank B·A per target layer: tiny state, but each update is limited "
                  "to rank r.", saved_per_token_feature=0.5)
DORA = LoraMethod("dora", "LoRA plus a trained magnitude per output row: closer to full fine-tuning, "
                  "at the cost of weight-sized norm temporaries.", use_dora=True,
                  saved_per_token_feature=4.9)
VERA = VeraMethod("vera", "Trains only scaling vectors over frozen shared random matrices: the fewest "
                  "parameters, and the slowest to learn.", saved_per_token_feature=1.2)
