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


# Totals as nvidia-smi reports them (MiB): what the card has before the CUDA context takes its share. The consumer
# cards' totals are read off nvidia-smi tables people posted in public READMEs and issues, several for each card,
# told apart by the board power nvidia-smi shows beside them: RTX 4080 (320 W) 16376, RTX 4060 Ti 16 GB (165 W)
# 16380, RTX 4070 (200 W) 12282, RTX 3060 12 GB (170 W) 12288 and RTX 4060 (115 W) 8188. Ada cards report a few MiB
# short of the whole GiB (the 4090's 24564), Ampere the whole of it (the 3090's 24576).
_GPUS = (
    ("rtx-4090", "RTX 4090 24 GB", 24564),
    ("rtx-3090", "RTX 3090 24 GB", 24576),
    ("rtx-4080", "RTX 4080 16 GB", 16376),
    ("rtx-4060ti-16gb", "RTX 4060 Ti 16 GB", 16380),
    ("rtx-4070", "RTX 4070 12 GB", 12282),
    ("rtx-3060-12gb", "RTX 3060 12 GB", 12288),
    ("rtx-4060", "RTX 4060 8 GB", 8188),
    ("l4", "L4 24 GB", 23034),
    ("t4", "T4 16 GB", 15360),
    ("a100-40gb", "A100 40 GB", 40960),
    ("a100-80gb", "A100 80 GB", 81920),
    ("h100-80gb", "H100 80 GB", 81559),
)
THIS_MACHINE = "this-machine"
GPU_NAMES = tuple(name for name, _, _ in _GPUS)


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
