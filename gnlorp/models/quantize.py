"""A frozen bitsandbytes base for the adapter methods (QLoRA): NF4 (4 bits) or int8 (8 bits) decoder linears.

The base goes through transformers' `BitsAndBytesConfig`, the path every QLoRA tool takes, so peft finds the
bitsandbytes layers it knows how to adapt. A random-init preset has no folder to load from: its seeded weights are
written to a temp folder and loaded back quantized, which rebuilds the same base from the same seed every time (a
resumed run and the export need exactly that). Embeddings, norms and the output heads stay in the run's dtype, as
in QLoRA. Both widths run on the CPU too (bitsandbytes 0.50; int8 casts the inputs to float16 there).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

# Heads a classifier or LM adds on top: never quantized (a seq-cls head trains whole; the LM head stays exact).
HEADS = ["lm_head", "score", "classifier"]
COMPUTE_DTYPE = torch.bfloat16


def quantization_config(bits: int):
    """bitsandbytes' settings for a `bits`-wide frozen base: NF4 with double quantization and bf16 compute, or int8."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=COMPUTE_DTYPE, llm_int8_skip_modules=HEADS)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=HEADS)
    raise ValueError(f"weight bits must be 8 or 4 to quantize, got {bits}")


def load_quantized(auto: type, source: Path | None, config, *, bits: int, dtype: torch.dtype,
                   device: torch.device | str, build=None, **kwargs) -> nn.Module:
    """Load `source` (a model folder) with a `bits`-wide bitsandbytes base onto `device`; with `source` None,
    `build()` makes the full-precision model (a seeded preset), which is saved and loaded back quantized."""
    options = {"config": config, "dtype": dtype, "quantization_config": quantization_config(bits),
               "device_map": {"": torch.device(device)}, "use_safetensors": True, "local_files_only": True, **kwargs}
    if source is not None:
        return _settle(auto.from_pretrained(source, **options))
    with tempfile.TemporaryDirectory(prefix="gnlorp-base-") as folder:
        build().save_pretrained(folder)
        model = _settle(auto.from_pretrained(folder, **options))
    model.config._name_or_path = ""  # as from_config leaves it: the temp folder is gone (peft records this path)
    return model


def _settle(model: nn.Module) -> nn.Module:
    """The loaded model, made to hold only its own memory and to keep its 4-bit layout."""
    _keep_packing(model)
    if next(model.parameters()).device.type == "cpu":
        _own_memory(model)
    return model


@torch.no_grad()
def _own_memory(model: nn.Module) -> None:
    """Copy the unquantized tensors (embeddings, norms, head) out of the memory-mapped checkpoint. On the CPU the
    loader leaves them as views of the file's mapping, which then stays whole, and every page the quantizer read
    stays in the process's memory: SmolLM2 NF4 held 871 MiB of RSS after loading, 574 MiB after this (the bases
    themselves: 178 MB)."""
    for module in model.modules():
        for name, tensor in list(module.named_parameters(recurse=False)):
            if not is_quantized(module) or name != "weight":
                tensor.data = tensor.data.clone()
        for name, tensor in list(module.named_buffers(recurse=False)):
            module._buffers[name] = tensor.clone()


def _keep_packing(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference path for 4-bit layers: on the first forward without gradients (an
    evaluation) it repacks the weight in place, un-nesting the absmax to fp32, and fails outright where in_features
    is not a multiple of 64 (tiny's 352). The base must stay the one the run trains on, evaluations included."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes 4- or 8-bit linear layer."""
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    return isinstance(module, (Linear4bit, Linear8bitLt))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight this process holds, counted from its tensors: parameters and buffers (each storage
    once; of a sharded weight, this process's shard), and for a 4-bit weight its quantization state (absmax, nested
    absmax, code books), which lives beside the parameter rather than in it."""
    from torch.distributed.tensor import DTensor

    from .int8_weight import Int8Weight

    seen: set[int] = set()
    kept: list[torch.Tensor] = []  # alive until counted: a freed temporary's address could be reused by the next one
    total = 0

    def add(tensor: torch.Tensor) -> None:
        nonlocal total
        if isinstance(tensor, DTensor):
            tensor = tensor.to_local()
        kept.append(tensor)
        key = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()

    for tensor in [*model.parameters(), *model.buffers()]:
        if isinstance(tensor, Int8Weight):  # an int8 trained weight: its codes and scales
            add(tensor.codes)
            add(tensor.scale)
            continue
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        for value in [*_state_tensors(state), getattr(tensor, "SCB", None)]:
            if isinstance(value, torch.Tensor):
                add(value)
    for module in model.modules():  # an int8 layer moves its codes and row scales to its matmul state when it runs
        state = getattr(module, "state", None)
        for value in (getattr(state, "CB", None), getattr(state, "SCB", None)):
            if isinstance(value, torch.Tensor):
                add(value)
    return total


def _state_tensors(state) -> list[torch.Tensor]:
    """The tensors a bitsandbytes 4-bit QuantState holds (absmax, code book, offset, and its nested state's), read
    from its attributes: `as_dict()` builds new tensors each call, which the layer never holds."""
    if state is None:
        return []
    own = [getattr(state, name, None) for name in ("absmax", "code", "offset")]
    return [t for t in own if isinstance(t, torch.Tensor)] + _state_tensors(getattr(state, "state2", None))
