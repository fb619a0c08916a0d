"""Read back what a training run wrote: its class names, tokenizer, base model and trained weights.

Export and the Try panel rebuild the trained model the same way, so they share these readers; each turns a
damaged or mismatched run folder into one clear ConfigError.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model as load_safetensors
from transformers import AutoTokenizer

from .config import ConfigError, RunConfig
from .models.load import load_model


def read_labels(run: Path) -> list[str]:
    """The class names in label-id order, from final/labels.json (or the run folder's labels.json)."""
    path = next((p for p in (run / "final" / "labels.json", run / "labels.json") if p.is_file()), None)
    if path is None:
        raise ConfigError(f"{run} is a seq-cls run without labels.json; export needs its class names")
    labels = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(labels, list) or len(labels) < 2:
        raise ConfigError(f"{path} must hold a list of at least two class names")
    return [str(name) for name in labels]


def load_run_tokenizer(folder: Path, cfg: RunConfig):
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                             trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer saved in {folder} ({type(exc).__name__}); it should "
                          "hold tokenizer.json and tokenizer_config.json") from None


def base_model(cfg: RunConfig, labels: list[str] | None) -> torch.nn.Module:
    num_labels = len(labels) if labels is not None else None
    return load_model(cfg.model, cfg.task, num_labels=num_labels, dtype=torch.float32,
                      trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)


def load_weights(model: torch.nn.Module, weights: Path, cfg: RunConfig) -> None:
    """Load every tensor of the trained model; any missing, extra or misshapen one means a different setup."""
    try:
        missing, unexpected = load_safetensors(model, weights, strict=False)
    except RuntimeError as exc:
        missing, unexpected = [str(exc).strip().splitlines()[-1].strip()], []
    if missing or unexpected:
        problem = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        count = len(missing) + len(unexpected)
        raise ConfigError(f"{weights} does not fit {cfg.model} prepared for {cfg.method} ({problem}, {count} "
                          "mismatches); was config.yaml edited after training?")
