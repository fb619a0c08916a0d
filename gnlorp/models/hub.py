"""Models named by their Hugging Face Hub id (`ORG/NAME[@REVISION]`), through huggingface_hub's own cache.

Everything goes through huggingface_hub (snapshot_download, scan_cache_dir), so a model the person already has is
found offline and shared with every other tool, a download resumes after an interruption, and a gated or private
model reads the token huggingface_hub finds itself (HF_TOKEN or `hf auth login`): gnlorp never handles it.

gnlorp keeps huggingface_hub offline for every library it imports (bitsandbytes would fetch a kernel at import
otherwise, see gnlorp/__init__.py); a model the user names is still fetched, unless the user set HF_HUB_OFFLINE.
Only safetensors weights, the config, the tokenizer and the chat template are fetched, never pickle weights, and
only from the repository's top level (subfolders hold other formats: original checkpoints, ONNX, GGUF).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    CacheNotFound,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from gnlorp.config import ConfigError

DOWNLOADS_FLAG = "GNLORP_HUB_DOWNLOADS"  # set by gnlorp/__init__.py when it, not the user, turned the Hub offline
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_FILES = [*CONFIG_FILES, "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                   "vocab.txt", "merges.txt", "*.model", "chat_template.*"]
MODEL_FILES = [*TOKENIZER_FILES, "*.safetensors", "*.safetensors.index.json"]
PARTS = {"config": CONFIG_FILES, "tokenizer": TOKENIZER_FILES, "weights": MODEL_FILES}  # each holds the one before
SUBFOLDERS = ["*/*"]
_resolved: dict[tuple, Path] = {}  # (cache, repo, revision, part, remote code) -> snapshot, for this process


@dataclass(frozen=True)
class HubId:
    """A repository on the Hub and, optionally, the branch, tag or commit hash to take."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo}@{self.revision}" if self.revision else self.repo


def parse_hub_id(name: str | os.PathLike) -> HubId | None:
    """`ORG/NAME[@REVISION]` as a HubId, or None when the name is a path that exists or no repository id."""
    name = str(name)
    if not name or name.startswith((".", "/", "~")) or Path(name).exists():
        return None
    repo, _, revision = name.partition("@")
    if repo.count("/") != 1:
        return None
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    return HubId(repo, revision or None)


def downloads_allowed() -> bool:
    """Whether a model named by its id may be fetched: not when the user set HF_HUB_OFFLINE."""
    return os.environ.get(DOWNLOADS_FLAG) == "1" or not constants.HF_HUB_OFFLINE


@contextmanager
def online(allowed: bool) -> Iterator[None]:
    """Lift gnlorp's own offline default for the huggingface_hub (and `datasets`) calls inside, when downloads are
    allowed; both libraries read HF_HUB_OFFLINE once, at import, into these constants."""
    holders = [module for module in (constants, sys.modules.get("datasets.config")) if module is not None]
    if not allowed or not any(module.HF_HUB_OFFLINE for module in holders):
        yield
        return
    before = [module.HF_HUB_OFFLINE for module in holders]
    for module in holders:
        module.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        for module, value in zip(holders, before, strict=True):
            module.HF_HUB_OFFLINE = value


@contextmanager
def hub_errors(hub: HubId, kind: str = "model") -> Iterator[None]:
    """huggingface_hub's exceptions as one-line ConfigErrors that say which problem it is and what to do."""
    site = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{hub.repo}"
    try:
        yield
    except GatedRepoError:
        raise ConfigError(f"{kind} {hub.repo} is gated: accept its terms at {site}, then set HF_TOKEN or run "
                          "`hf auth login`") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"no {kind} {hub.repo} on the Hugging Face Hub: check the spelling (ORG/NAME); for a "
                          "private one set HF_TOKEN or run `hf auth login`") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{kind} {hub.repo} has no revision {hub.revision!r}: give a branch, tag or commit hash "
                          f"listed at {site}") from None
    except IncompleteSnapshotError:
        raise ConfigError(f"{kind} {hub} is only partly in the Hugging Face cache and the Hub cannot be reached: "
                          "run once with network access to finish the download") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ConfigError(not_cached_message(hub, kind)) from None
    except HfHubHTTPError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"the Hugging Face Hub refused {kind} {hub} ({reason}); try again later") from None


def not_cached_message(hub: HubId, kind: str = "model") -> str:
    """Why a Hub id could not be resolved from the cache alone: offline by choice, or the Hub out of reach."""
    if not downloads_allowed():
        return (f"{kind} {hub} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is "
                "set: run once without HF_HUB_OFFLINE to download it, or give a local folder")
    return (f"cannot reach the Hugging Face Hub and {kind} {hub} is not in the cache ({constants.HF_HUB_CACHE}): "
            "check the network connection (or proxy), then try again")


def _snapshot(hub: HubId, patterns: list[str], *, local: bool, progress: type | None = None) -> Path:
    return Path(snapshot_download(hub.repo, revision=hub.revision, allow_patterns=patterns,
                                  ignore_patterns=SUBFOLDERS, local_files_only=local, tqdm_class=progress))


def _complete(folder: Path, part: str) -> bool:
    """Whether a cached snapshot holds the asked part: its config, also its tokenizer, also its safetensors."""
    tokenizer = any(folder.glob("tokenizer*"))
    return (folder / "config.json").is_file() and (part == "config" or tokenizer) and (
        part != "weights" or any(folder.glob("*.safetensors")))


def hub_folder(name: str | os.PathLike, *, part: str = "weights", trust_remote_code: bool = False,
               progress: type | None = None) -> Path:
    """The snapshot folder of a Hub model holding `part`: its config.json alone (a few KB, all an estimate needs),
    with its tokenizer (a data preview), or everything training needs (weights). A commit hash already cached is
    taken without asking the Hub (a hash never changes); a branch or tag is looked up online when downloads are
    allowed (huggingface_hub falls back to the cache when the Hub is out of reach), once per process: the studio's
    budget asks for the config at every change of the form. `progress` is a tqdm class for the download's bars."""
    hub = parse_hub_id(name)
    if hub is None:
        raise ConfigError(f"{name!r} is not a Hugging Face Hub id; give ORG/NAME or ORG/NAME@REVISION")
    key = (constants.HF_HUB_CACHE, hub.repo, hub.revision, part, trust_remote_code)
    if key in _resolved and _complete(_resolved[key], part):
        return _resolved[key]
    patterns = PARTS[part] + (["*.py"] if trust_remote_code else [])
    with hub_errors(hub):
        folder = None
        if hub.revision and COMMIT_HASH.fullmatch(hub.revision):
            try:
                folder = _snapshot(hub, patterns, local=True)
            except LocalEntryNotFoundError:
                folder = None
        if folder is None or not _complete(folder, part):
            allowed = downloads_allowed()
            with online(allowed):
                folder = _snapshot(hub, patterns, local=not allowed, progress=progress)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model {hub} has no config.json at its top level: it is no transformers model")
    if part == "weights" and not any(folder.glob("*.safetensors")):
        if not downloads_allowed():
            raise ConfigError(f"model {hub} is in the Hugging Face cache without its weights and HF_HUB_OFFLINE is "
                              "set: run once without HF_HUB_OFFLINE to download them")
        raise ConfigError(f"model {hub} publishes no safetensors weights (pickle weights are never loaded: they can "
                          "run code); pick a repository with *.safetensors files")
    _resolved[key] = folder
    return folder


def pin(name: str, *, trust_remote_code: bool = False, progress: type | None = None, download: bool = True) -> str:
    """`ORG/NAME@COMMIT` of the snapshot a run trains (downloaded if needed and `download`), so its config.yaml
    records exactly what it trained and export, try and resume load that same snapshot offline; other names come
    back as given."""
    hub = parse_hub_id(name)
    if hub is None:
        return name
    folder = (hub_folder(name, trust_remote_code=trust_remote_code, progress=progress) if download
              else cached_folder(name))
    if folder is None:
        raise ConfigError(f"model {hub} is not downloaded yet: download it first (the studio's Download button, or "
                          "any gnlorp command that loads it)")
    return f"{hub.repo}@{folder.name}" if COMMIT_HASH.fullmatch(folder.name) else name


def cached_folder(name: str | os.PathLike, *, part: str = "weights") -> Path | None:
    """The cached snapshot of a Hub model when it holds `part`, found without any network call; else None."""
    hub = parse_hub_id(name)
    if hub is None:
        return None
    try:
        folder = _snapshot(hub, PARTS[part], local=True)
    except (LocalEntryNotFoundError, HFValidationError):
        return None
    return folder if _complete(folder, part) else None


def cached_models() -> list[tuple[str, int]]:
    """(ORG/NAME, bytes on disk) of every model in the local Hugging Face cache, by name."""
    try:
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return []
    return sorted((repo.repo_id, repo.size_on_disk) for repo in info.repos if repo.repo_type == "model")


def gigabytes(size: float) -> str:
    """A size as people read it beside a model name (decimal GB, as the Hub shows)."""
    return f"{size / 1e9:.2f} GB" if size >= 1e7 else f"{size / 1e6:.1f} MB"
