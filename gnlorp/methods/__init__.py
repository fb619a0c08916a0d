"""The training methods by name: what each prepares, how its parameters are grouped, and how it merges."""

from __future__ import annotations

from ..config import ConfigError
from .adapters import DORA, LORA, VERA, AdapterMethod
from .base import Method, resolve_targets, trainable_parameters
from .full import FULL, FullMethod
from .projected import GALORE, GRADNORMLORP, ProjectedMethod

METHODS: dict[str, Method] = {m.name: m for m in (FULL, LORA, DORA, VERA, GALORE, GRADNORMLORP)}


def get_method(name: str) -> Method:
    """The method called `name`; a ConfigError lists the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


__all__ = [
    "METHODS", "AdapterMethod", "FullMethod", "Method", "ProjectedMethod", "get_method", "resolve_targets",
    "trainable_parameters",
]
