"""Sharded training (FSDP2): split a model over the processes, and checkpoint it through torch.distributed.checkpoint.

`fully_shard` goes on every decoder layer (transformers names them in `_no_split_modules`) and on the whole model,
so each rank holds 1/N of every weight, gradient and, through ProjectedAdamW's row-local steps (optim/sharded.py),
optimizer state; a layer's weights are gathered only while it computes. Checkpoints are written by every rank at
once, as safetensors shards (torch's HuggingFaceStorageWriter): no pickle is read back. A rank's optimizer state
is saved under its own keys, since its tensors are its rows and slices; resume needs the same world size.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..config import ConfigError

STATE_DIR = "state"


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a tensor a library hands back, sharded (DTensor) or already gathered.

    accelerate's `clip_grad_norm_` under FSDP2 returned the DTensor norm up to 1.15 and gathers it itself from 1.16
    on; taking either keeps a sharded run independent of which one is installed.
    """
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor that may or may not be sharded."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_model(model: torch.nn.Module, bf16: bool) -> None:
    """fully_shard each repeated block and the input embedding (unless tied to the head), then the whole model
    (final norm, head). bf16: compute in bfloat16 and reduce gradients in float32 (on CUDA, as the unsharded
    run's autocast does). The head stays in the root unit, whose weights stay gathered from forward to the end of
    backward: the chunked loss uses the head's weight outside the head's own forward."""
    if not dist.is_initialized() or dist.get_world_size() < 2:
        raise ConfigError("--fsdp shards over several processes and this run has one: start it with "
                          "torchrun --nproc_per_node N -m gnlorp train ... (or accelerate launch), or leave --fsdp off")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    blocks = decoder_blocks(model)
    if not blocks:
        raise ConfigError(f"--fsdp cannot find the repeated blocks of {type(model).__name__} (its _no_split_modules "
                          "is empty); train it without --fsdp")
    embedding = separate_embedding(model)
    for unit in blocks + ([embedding] if embedding is not None else []):
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def separate_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """The input embedding, when it is not tied to the head: a unit of its own (a 128K vocabulary's is as large
    as several decoder blocks)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    return embedding if head is None or head.weight is not embedding.weight else None


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, by the class names transformers gives in `_no_split_modules` (through peft)."""
    get_base = getattr(model, "get_base_model", None)
    names = set(getattr(get_base() if callable(get_base) else model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


@contextmanager
def shared_atomic_dir(target: Path, main: bool) -> Iterator[Path]:
    """atomic_dir for every rank at once: rank 0 makes a temp folder of a fixed name, all fill it, rank 0 renames."""
    tmp = target.parent / f".{target.name}.tmp-shared"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        yield tmp
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    if main:
        old = target.parent / f".{target.name}.old-shared"
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0 (on the CPU, tied weights as separate tensors); {} on the others."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    seen: set[int] = set()
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            state[name] = tensor.clone()  # safetensors refuses two names for one storage
        seen.add(tensor.data_ptr())
    return state


def _model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's state, each storage once (VeRA's shared A and B appear under every layer's name)."""
    state, seen = {}, set()
    for name, tensor in get_model_state_dict(model).items():
        pointer = local_value(tensor).data_ptr()
        if pointer not in seen:
            state[name] = tensor
            seen.add(pointer)
    return state


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank writes its shards of the weights and its optimizer state into folder/state; returns what
    resume needs besides the tensors (the optimizer's param_groups, plain JSON), for rank 0 to store."""
    saved = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = _model_state(model)
    prefix = f"rank{dist.get_rank()}"
    for index, state in saved["state"].items():
        for key, value in state.items():
            tensors[f"{prefix}.optimizer.{index}.{key}"] = value
    tensors[f"{prefix}.rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors[f"{prefix}.rng.cuda"] = torch.cuda.get_rng_state()
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder / STATE_DIR), save_distributed=True))
    return {"param_groups": json.loads(json.dumps(saved["param_groups"]))}


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 param_groups: list[dict[str, Any]]) -> None:
    """Restore what save_sharded wrote (at the same world size) into the sharded model and the optimizer."""
    reader = HuggingFaceStorageReader(str(folder / STATE_DIR))
    stored = reader.read_metadata().state_dict_metadata
    prefix = f"rank{dist.get_rank()}."
    saved_world = len({name.partition(".")[0] for name in stored if name.startswith("rank")})
    if saved_world != dist.get_world_size():
        raise ConfigError(f"{folder} was saved by {saved_world} processes, this run has {dist.get_world_size()}; "
                          f"resume with --nproc_per_node {saved_world}")
    model_state = _model_state(model)
    mine = {name: torch.empty(meta.size, dtype=meta.properties.dtype)
            for name, meta in stored.items() if name.startswith(prefix)}
    dcp.load({**model_state, **mine}, storage_reader=reader)
    set_model_state_dict(model, model_state)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in mine.items():
        kind, _, rest = name.removeprefix(prefix).partition(".")
        if kind == "optimizer":
            index, _, key = rest.partition(".")
            state.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    torch.set_rng_state(mine[prefix + "rng.cpu"])
    if prefix + "rng.cuda" in mine:
        torch.cuda.set_rng_state(mine[prefix + "rng.cuda"])
