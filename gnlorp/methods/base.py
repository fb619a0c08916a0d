"""What every training method shares: the strategy interface and the choice of target layers.

A method is a small strategy object, so the engine, the estimator and the export call `prepare`,
`param_groups` and `merge` without ever branching on a method's name. Nothing here imports torch at
module level: the CLI lists methods and rejects bad names before any heavy import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..config import ConfigError, RunConfig

if TYPE_CHECKING:  # torch is imported where it is used, so listing methods stays instant
    from torch import nn

# Output heads: never adapted or projected under 'auto' (peft trains `classifier`/`score` whole for SEQ_CLS).
HEAD_NAMES = frozenset({"lm_head", "classifier", "score"})


@dataclass(frozen=True)
class Method:
    """How one method makes a model trainable, groups its parameters for the optimizer, and merges it."""

    name: str
    summary: str  # one line on what it trades
    uses_adapter: ClassVar[bool] = False
    # What the method's own layers add at the start of backward beyond the model's activations, in bytes per token
    # per in+out feature of each target (for the estimate). Adapters' values are fitted to measured CPU peaks
    # (docs/BENCHMARKS.md, "Peak memory: predicted vs measured").
    saved_per_token_feature: float = 0.0

    def prepare(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        """The model ready to train (possibly wrapped); exactly the trained parameters require grad."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
        """Groups for `ProjectedAdamW`; by default one plain AdamW group over every trainable parameter."""
        return [{"params": trainable_parameters(model)}]

    def merge(self, model: nn.Module) -> nn.Module:
        """Return a plain model that computes what the trained one does; by default the model itself."""
        return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Each parameter that requires grad, once (named_parameters skips tied duplicates)."""
    return [p for _, p in model.named_parameters() if p.requires_grad]


def resolve_targets(model: nn.Module, cfg: RunConfig) -> list[str]:
    """Qualified names of the linear layers the method adapts or projects, in model order.

    'auto' takes every linear layer outside the output heads (for LLaMA: q/k/v/o and gate/up/down;
    for BERT: query/key/value, the dense layers and the pooler). Otherwise cfg.targets is a comma list
    of module-name suffixes, each of which must match at least one linear layer. Full names are returned
    so peft matches exactly these layers and no same-named module elsewhere (a head's `dense`).
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layer, weight stored transposed

    linears = [(name, module) for name, module in model.named_modules()
               if isinstance(module, (nn.Linear, Conv1D))]
    if cfg.targets.strip() == "auto":
        get_head = getattr(model, "get_output_embeddings", None)
        lm_head = get_head() if get_head is not None else None
        chosen = [name for name, module in linears
                  if module is not lm_head and not HEAD_NAMES & set(name.split("."))]
        if not chosen:
            raise ConfigError(f"{type(model).__name__} has no linear layers outside its head to train with "
                              "this method; use --method full")
        return chosen
    wanted = [entry.strip() for entry in cfg.targets.split(",") if entry.strip()]
    if not wanted:
        raise ConfigError("targets is empty; give comma-separated module names (e.g. q_proj,v_proj) "
                          "or 'auto'")
    for entry in wanted:
        if not any(_matches(name, entry) for name, _ in linears):
            available = ", ".join(sorted({name.rsplit(".", 1)[-1] for name, _ in linears}))
            raise ConfigError(f"target {entry!r} matches no linear layer of {type(model).__name__}; "
                              f"available: {available} (or 'auto')")
    return [name for name, _ in linears if any(_matches(name, entry) for entry in wanted)]


def _matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)

