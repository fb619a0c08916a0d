"""The settings form, derived from RunConfig's field metadata: a new knob in gnlorp/config.py appears here by itself.

choices become a radio, bools a checkbox, numbers a number box with the field's range, text a textbox; the
label is a readable form of the field name and the info line is the field's help. Only the few fields that
need a richer control (the model and dataset pickers) are overridden.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import Field, asdict
from pathlib import Path
from typing import Any

import gradio as gr

from gnlorp.config import MULTI_LINE, ConfigError, RunConfig, config_fields

LABELS = {  # names people look for; every other field gets its name with spaces
    "data": "Dataset", "optim_bits": "Optimizer bits", "lr": "Learning rate", "seq_len": "Sequence length",
    "max_steps": "Steps", "batch_size": "Batch size", "warmup_steps": "Warm-up steps",
    "update_proj_gap": "Projection gap",
    "grad_checkpointing": "Activation checkpointing", "layerwise": "Layer-wise updates", "dtype": "Weight dtype",
    "proj_type": "Projection side", "proj_dtype": "Projector storage", "grad_accum": "Gradient accumulation",
    "max_grad_norm": "Max gradient norm", "vera_d_initial": "VeRA d initial", "lora_alpha": "LoRA alpha",
    "fsdp": "Sharded over the GPUs (FSDP)", "adaptive_refresh": "Adaptive refresh", "svd": "Refresh SVD",
}
HIDDEN = frozenset({"output"})  # the studio puts every run in a new folder under its runs folder
GROUPS = ("basic", "data", "advanced")


def label(name: str) -> str:
    return LABELS.get(name) or name.replace("_", " ").capitalize()


def form_fields() -> list[Field]:
    """The RunConfig fields the form shows, in declaration order: also the order of every handler's inputs."""
    return [f for f in config_fields() if f.name not in HIDDEN]


def _number_step(default: float) -> float:
    return 10.0 ** math.floor(math.log10(abs(default))) / 10 if default else 0.01


def widget(f: Field, value: Any, overrides: dict[str, Callable[[dict], gr.Component]]) -> gr.Component:
    """The control for one field (overrides[name] gets the common keyword arguments to build its own)."""
    meta = f.metadata
    common = {"label": label(f.name), "info": meta["help"], "value": value, "elem_id": f"cfg-{f.name}"}
    kind = type(f.default)
    if f.name in overrides:
        return overrides[f.name](common)
    if meta["choices"]:
        return gr.Radio(choices=list(meta["choices"]), **common)
    if kind is bool:
        return gr.Checkbox(**common)
    if kind in (int, float):
        return gr.Number(minimum=meta["min"], maximum=meta["max"], precision=0 if kind is int else None,
                         step=1 if kind is int else _number_step(f.default), **common)
    return gr.Textbox(lines=3 if f.name in MULTI_LINE else 1, **common)


def config_widgets(cfg: RunConfig, group: str, overrides: dict[str, Callable[[dict], gr.Component]],
                   ) -> dict[str, gr.Component]:
    """Render the controls of one metadata group (basic, data, advanced) into the current layout."""
    values = asdict(cfg)
    return {f.name: widget(f, values[f.name], overrides) for f in form_fields() if group_of(f) == group}


def group_of(f: Field) -> str:
    """basic, data or advanced; a field of any other group is shown with the advanced ones."""
    group = f.metadata.get("group")
    return group if group in GROUPS else "advanced"


def values_to_config(values: list[Any] | tuple[Any, ...], **fixed: Any) -> RunConfig:
    """A validated RunConfig from the form's values (in `form_fields()` order) plus fixed fields such as output."""
    settings: dict[str, Any] = {}
    for f, value in zip(form_fields(), values, strict=True):
        kind = type(f.default)
        if value is None or (isinstance(value, str) and not value.strip() and kind is not str):
            raise ConfigError(f"{label(f.name)} is empty; fill it in")
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"{label(f.name)} must be a whole number, got {value:g}")
            value = int(value)
        if kind is int and isinstance(value, str):  # a radio of numeric choices can hand back text
            value = int(value) if value.strip().lstrip("-").isdigit() else value
        settings[f.name] = value.strip() if isinstance(value, str) else value
    return RunConfig.from_dict({**settings, **fixed}, source="the form")


def config_to_values(cfg: RunConfig) -> list[Any]:
    """The form's values (in `form_fields()` order) for a config, e.g. a loaded preset."""
    values = asdict(cfg)
    return [values[f.name] for f in form_fields()]


def preset_files(presets_dir: Path) -> list[str]:
    return sorted(p.name for p in presets_dir.glob("*.yaml"))
