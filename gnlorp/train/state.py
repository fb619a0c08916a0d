"""What a checkpoint holds and how a run gets it back: weights, optimizer state, RNG, schedule and data position.

Every folder is written into a temp folder and renamed, its manifest last (checkpoint.py), so a crash mid-write
leaves the previous checkpoint whole. One process writes safetensors weights and weights-only pickles; a sharded
run (--fsdp) has every rank write its shards through torch.distributed.checkpoint (sharding.py), with no pickle.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_file

from ..atomic import atomic_dir, strict_json
from ..checkpoint import DamagedCheckpoint, newest_good, write_manifest
from ..config import ConfigError, RunConfig
from ..run_folder import load_weights, save_weights
from .sharding import STATE_DIR, load_sharded, save_sharded, shared_atomic_dir

CHECKPOINTS_KEPT = 2


@dataclass
class Position:
    """Where the run is: enough, with the checkpointed tensors, to continue it exactly."""
    step: int = 0
    epoch: int = 0
    batch_index: int = 0


def save_checkpoint(cfg: RunConfig, model, optimizer, scheduler, position: Position, main: bool, tokenizer) -> Path:
    """Write checkpoints/step-N (the oldest beyond CHECKPOINTS_KEPT removed); its path.

    The tokenizer goes with the weights (as in final/), so a run tried before it ends prompts in its chat template.

    Sharded, every rank calls this and writes its shards into rank 0's temp folder, which has a name all can find.
    """
    root = Path(cfg.output) / "checkpoints"
    final = root / f"step-{position.step:06d}"
    with (shared_atomic_dir(final, main) if cfg.fsdp else atomic_dir(final)) as tmp:
        state: dict[str, Any] = {"position": asdict(position), "scheduler": scheduler.state_dict(),
                                 "world_size": dist.get_world_size() if dist.is_initialized() else 1}
        if cfg.fsdp:
            state |= save_sharded(tmp, model, optimizer.optimizer)
        else:
            save_weights(model, tmp / "model.safetensors", cfg)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()
                        if torch.cuda.is_available() else []}, tmp / "rng.pt")
        if main:
            tokenizer.save_pretrained(tmp)
            (tmp / "trainer_state.json").write_text(strict_json(state), encoding="utf-8")
            write_manifest(tmp, step=position.step, cfg=cfg)  # last: a folder without it is incomplete
    if main:
        for old in sorted(root.glob("step-*"))[:-CHECKPOINTS_KEPT] + list(root.glob(".step-*.tmp-*")):
            shutil.rmtree(old)  # old checkpoints, and the temp folders of saves a killed process left behind
    return final


def load_checkpoint(cfg: RunConfig, model, optimizer, scheduler) -> tuple[Position, list[str]]:
    """Restore the newest checkpoint that verifies against its manifest; also the damaged ones skipped."""
    skipped: list[str] = []
    folder, (optimizer_state, rng, state) = newest_good(
        Path(cfg.output), lambda exc: skipped.append(f"skipped a damaged checkpoint: {exc}"),
        lambda folder, manifest: _read(cfg, folder, manifest))
    if cfg.fsdp:
        load_sharded(folder, model, optimizer, state["param_groups"])
    else:
        if cfg.weight_bits == 16:
            load_model(model, str(folder / "model.safetensors"))
        else:  # only the trained tensors: the quantized base was rebuilt from its source
            load_weights(model, folder / "model.safetensors", cfg)
        optimizer.load_state_dict(optimizer_state)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
    scheduler.load_state_dict(state["scheduler"])
    return Position(**state["position"]), skipped


def _read(cfg: RunConfig, folder: Path, manifest: dict) -> tuple[dict | None, dict | None, dict]:
    """A verified checkpoint's optimizer, RNG and trainer state; pickles load as tensors only (weights_only).
    A sharded one holds no pickle: load_sharded reads its tensors."""
    if manifest["method"] != cfg.method:
        raise ConfigError(f"{folder} was written by a {manifest['method']} run, not {cfg.method}; "
                          f"resume with --method {manifest['method']}")
    bits = manifest.get("weight_bits", 16)  # checkpoints from before quantized bases had none
    if bits != cfg.weight_bits:
        raise ConfigError(f"{folder} was written with {bits}-bit weights, not {cfg.weight_bits}-bit; resume with "
                          f"--weight-bits {bits}")
    sharded = (folder / STATE_DIR).is_dir()
    if sharded != cfg.fsdp:
        with_or_without = "with" if sharded else "without"
        raise ConfigError(f"{folder} was written by a run {with_or_without} --fsdp; resume it {with_or_without} "
                          "--fsdp")
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        if sharded:
            return None, None, state
        optimizer_state = torch.load(folder / "optimizer.pt", weights_only=True)
        rng = torch.load(folder / "rng.pt", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise DamagedCheckpoint(f"{folder}: refused to load it ({reason})") from None
    return optimizer_state, rng, state


def save_final(cfg: RunConfig, model, tokenizer, uses_adapter: bool, step: int, weights: dict | None) -> None:
    """final/ holds the trained model's state (export merges it; over a quantized base, its trained tensors);
    adapter/ the peft adapter alone.

    `weights` is the gathered state of a sharded model, else None (the model's own tensors are whole).
    """
    run_dir = Path(cfg.output)
    with atomic_dir(run_dir / "final") as tmp:
        if weights is None:
            save_weights(model, tmp / "model.safetensors", cfg)
        else:
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, step=step, cfg=cfg)
    if uses_adapter:
        with atomic_dir(run_dir / "adapter") as tmp:
            model.save_pretrained(tmp, **({} if weights is None else {"state_dict": weights}))


def all_finite(tensors: Iterable[torch.Tensor], piece_numel: int = 2**24) -> bool:
    """Piece by piece: `isfinite` on a whole 128K-row embedding holds gigabytes of temporaries."""
    pieces = (piece for tensor in tensors for piece in tensor.detach().reshape(-1).split(piece_numel))
    return all(bool(torch.isfinite(piece).all()) for piece in pieces)
