"""The devices a run can be checked against: common GPUs, and this machine (its GPU if it has one, else its RAM)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError

MIB = 2**20


@dataclass(frozen=True)
class Device:
    name: str  # what --device takes
    label: str  # what people read
    capacity_bytes: int  # total memory as nvidia-smi reports it, or this machine's available RAM
    kind: str  # "cuda" or "cpu": decides autocast and the fixed context cost


# Totals as nvidia-smi reports them (MiB): what the card has before the CUDA context takes its share.
_GPUS = (
    ("rtx-4090", "RTX 4090 24 GB", 24564),
    ("rtx-3090", "RTX 3090 24 GB", 24576),
    ("l4", "L4 24 GB", 23034),
    ("t4", "T4 16 GB", 15360),
    ("a100-40gb", "A100 40 GB", 40960),
    ("a100-80gb", "A100 80 GB", 81920),
    ("h100-80gb", "H100 80 GB", 81559),
)
THIS_MACHINE = "this-machine"


def this_machine() -> Device:
    """The first CUDA device's total memory if there is one, else the RAM available right now."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Device(THIS_MACHINE, f"this machine: {props.name} {props.total_memory / 2**30:.0f} GiB",
                      props.total_memory, "cuda")
    import psutil

    available = psutil.virtual_memory().available
    return Device(THIS_MACHINE, f"this machine: CPU, {available / 2**30:.1f} GiB RAM free", available, "cpu")


def gpu_count() -> int:
    """How many CUDA devices this machine shows (0 without CUDA): the studio offers more than one run process."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def devices() -> dict[str, Device]:
    """Every device by name, this machine last (it is looked up afresh: free RAM changes)."""
    listed = {name: Device(name, label, mib * MIB, "cuda") for name, label, mib in _GPUS}
    return {**listed, THIS_MACHINE: this_machine()}


def get_device(name: str) -> Device:
    known = devices()
    if name not in known:
        raise ConfigError(f"unknown device {name!r}; choose one of: {', '.join(known)}")
    return known[name]
