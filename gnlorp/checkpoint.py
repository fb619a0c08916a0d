"""Checkpoint manifests: what a saved folder holds and the SHA-256 of every file, so damage is caught before loading.

A checkpoint (and final/) is written into a temp folder whose last file is manifest.json, then renamed into place.
Resume, export and try verify the manifest before they read a byte of the tensors: a flipped bit, a truncated
file or a file swapped after the fact (a planted pickle) is refused with one line, and resume falls back to the
previous good checkpoint. The manifest guards against damage, not against someone who can rewrite it: what keeps
a planted file from running code is that weights load only from safetensors and pickles only with weights_only.
Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from .atomic import strict_json
from .config import ConfigError, RunConfig

MANIFEST = "manifest.json"
FORMAT = 1
LIBRARIES = ("gnlorp", "torch", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes")
UNHASHED_SETTINGS = ("output", "max_steps")  # a moved folder or a longer run continues the same training
CHUNK = 1 << 20
T = TypeVar("T")


class DamagedCheckpoint(ConfigError):
    """A checkpoint or final/ folder whose files do not match its manifest (or that has none); one line."""


def config_hash(cfg: RunConfig) -> str:
    """SHA-256 of the settings that shape the training (all but the output folder and the step count)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in UNHASHED_SETTINGS}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_manifest(folder: Path, *, step: int, cfg: RunConfig) -> dict[str, Any]:
    """Hash every file under `folder` and write manifest.json beside them (call last, before the rename)."""
    files = {p.relative_to(folder).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"format": FORMAT, "step": step, "method": cfg.method,
                "weight_bits": cfg.weight_bits, "config_sha256": config_hash(cfg),
                "versions": library_versions(), "files": files}
    (folder / MANIFEST).write_text(strict_json(manifest, indent=1), encoding="utf-8")
    return manifest


def verify(folder: Path, *, required: bool = True) -> dict[str, Any] | None:
    """The folder's manifest once every listed file has its recorded size and SHA-256; else DamagedCheckpoint.

    required=False accepts a folder with no manifest at all (final/ of a run from before manifests) and returns None.
    """
    path = folder / MANIFEST
    if not path.is_file():
        if not required:
            return None
        raise DamagedCheckpoint(f"{folder} has no {MANIFEST} (an interrupted or foreign checkpoint)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict) or not files:
            raise ValueError("unknown format")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedCheckpoint(f"{folder}: {MANIFEST} is unreadable ({type(exc).__name__})") from None
    for name, expected in files.items():
        file = folder / name
        if not file.resolve().is_relative_to(folder.resolve()):
            raise DamagedCheckpoint(f"{folder}: {MANIFEST} names a file outside the folder ({name!r})")
        if not file.is_file():
            raise DamagedCheckpoint(f"{folder}: {name} is missing")
        if file.stat().st_size != expected.get("bytes"):
            raise DamagedCheckpoint(f"{folder}: {name} has {file.stat().st_size} bytes, the manifest says "
                                    f"{expected.get('bytes')} (truncated or replaced)")
        if file_sha256(file) != expected.get("sha256"):
            raise DamagedCheckpoint(f"{folder}: {name} does not match its SHA-256 in {MANIFEST} (damaged or replaced)")
    return manifest


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, newest first (temp folders of an interrupted save are not among them)."""
    return sorted((run_dir / "checkpoints").glob("step-*"), reverse=True)


def refuse_if_finished(run_dir: Path, max_steps: int, step: int | None = None) -> None:
    """Resuming a run that already reached `max_steps` would train nothing and overwrite its record: refuse it in
    one line that says how to go on. `step` is where the resume would start (the newest intact checkpoint's);
    without it the newest checkpoint's name tells, which costs no read (the studio asks before starting a child)."""
    if step is None:
        found = checkpoints(run_dir)
        step = int(found[0].name.removeprefix("step-")) if found and found[0].name[5:].isdigit() else None
    if step is not None and step >= max_steps:
        raise ConfigError(f"run {run_dir.name} finished at step {step} of {max_steps}, so there is nothing to resume "
                          f"(it is left as it was); to train on, resume with a higher --max-steps, e.g. "
                          f"--max-steps {2 * step}")


def newest_good(run_dir: Path, on_damaged: Callable[[DamagedCheckpoint], None],
                read: Callable[[Path, dict[str, Any]], T]) -> tuple[Path, T]:
    """The newest checkpoint that verifies and that `read(folder, manifest)` accepts, with what it read.

    Each damaged one on the way (bad manifest, or `read` raising DamagedCheckpoint) goes to `on_damaged`.
    """
    found, damaged = checkpoints(run_dir), []
    for folder in found:
        try:
            return folder, read(folder, verify(folder))
        except DamagedCheckpoint as exc:
            damaged.append(exc)
            on_damaged(exc)
    if not found:
        raise ConfigError(f"nothing to resume in {run_dir}: it has no checkpoints; start without --resume")
    raise ConfigError(f"no intact checkpoint in {run_dir / 'checkpoints'}: all {len(found)} are damaged (the newest: "
                      f"{damaged[0]}); start a new run without --resume")
