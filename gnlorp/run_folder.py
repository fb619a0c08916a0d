"""Read back what a training run wrote: its class names, tokenizer, base model and trained weights.

Export and the Try panel rebuild the trained model the same way, so they share these readers; each turns a
damaged or mismatched run folder into one clear ConfigError. Over a quantized base (weight_bits 8 or 4) a run saves
only its trained tensors: the bitsandbytes base does not load back through safetensors, and it need not, since it
is rebuilt from its source the same way every time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file, save_model
from safetensors.torch import load_model as load_safetensors
from transformers import AutoTokenizer

from .config import ConfigError, RunConfig
from .models.int8_trained import load_stored, stored_tensors
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


def base_model(cfg: RunConfig, labels: list[str] | None, *, full_precision: bool = False) -> torch.nn.Module:
    """The run's base model in float32; its quantized base as trained, unless `full_precision` (the export's)."""
    num_labels = len(labels) if labels is not None else None
    return load_model(cfg.model, cfg.task, num_labels=num_labels, dtype=torch.float32,
                      trust_remote_code=cfg.trust_remote_code, seed=cfg.seed,
                      weight_bits=16 if full_precision else cfg.base_bits)


def trained_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training changes, by parameter name (peft's adapters, a classifier's head)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_weights(model: torch.nn.Module, path: Path, cfg: RunConfig) -> None:
    """Every tensor of the model (int8 trained weights as their codes and scales), or only the trained ones over
    a quantized base."""
    if cfg.int8_trained:
        save_file(stored_tensors(model), str(path), metadata={"format": "pt"})
    elif cfg.base_bits == 16:
        save_model(model, str(path))
    else:
        save_file(trained_tensors(model), str(path), metadata={"format": "pt"})


def load_weights(model: torch.nn.Module, weights: Path, cfg: RunConfig) -> None:
    """Load every tensor of the trained model (the trained ones over a quantized base, whichever precision the base
    is rebuilt in); any missing, extra or misshapen one means a different setup."""
    try:
        if cfg.int8_trained:
            missing, unexpected = load_stored(model, load_file(str(weights)))
        elif cfg.base_bits == 16:
            missing, unexpected = load_safetensors(model, weights, strict=False)
        else:
            missing, unexpected = _load_trained(model, weights)
    except RuntimeError as exc:
        missing, unexpected = [str(exc).strip().splitlines()[-1].strip()], []
    if missing or unexpected:
        problem = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        count = len(missing) + len(unexpected)
        raise ConfigError(f"{weights} does not fit {cfg.model} prepared for {cfg.method} ({problem}, {count} "
                          "mismatches); was config.yaml edited after training?")


def _load_trained(model: torch.nn.Module, weights: Path) -> tuple[list[str], list[str]]:
    """Copy the saved trained tensors into `model`'s; the names neither side has, as (missing, unexpected)."""
    saved, params = load_file(str(weights)), dict(model.named_parameters())
    wanted = {name for name, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(wanted - set(saved)), sorted(set(saved) - wanted)
    if not missing and not unexpected:
        with torch.no_grad():
            for name, tensor in saved.items():
                if params[name].shape != tensor.shape:
                    raise RuntimeError(f"size mismatch for {name}")
                params[name].copy_(tensor)
    return missing, unexpected
