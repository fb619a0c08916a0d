"""A dataset named by its Hugging Face Hub id (`ORG/NAME[@REVISION][:SPLIT]`), read like a local file.

`datasets.load_dataset` fetches and caches it as `datasets` always does, so a dataset read once is there offline
(from `datasets`' own cache); when that cache lacks it but huggingface_hub's cache holds the repository's files
(another tool fetched them), the snapshot folder is read by the same packaged readers, with no network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gnlorp.config import ConfigError, RunConfig
from gnlorp.models.hub import HubId, downloads_allowed, hub_errors, online, parse_hub_id

Row = tuple[str, dict[str, Any]]
FILE_TYPES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")  # readers.SUPPORTED, which imports this module


def parse_dataset_id(name: str) -> tuple[HubId, str | None] | None:
    """(repository and revision, split or None) for `ORG/NAME[@REVISION][:SPLIT]`; None for anything else, such as
    a data file's path (it ends in a file type gnlorp reads) that does not exist."""
    repo, _, split = name.partition(":")
    if repo.lower().endswith(FILE_TYPES):
        return None
    hub = parse_hub_id(repo)
    return None if hub is None else (hub, split or None)


def read_hub_dataset(name: str, cfg: RunConfig) -> list[Row]:
    """The records of one split (the given one, else 'train' or the only one), each with its row number."""
    parsed = parse_dataset_id(name)
    if parsed is None:
        raise ConfigError(f"{name!r} is no Hugging Face Hub dataset id; give ORG/NAME[@REVISION][:SPLIT]")
    hub, split = parsed
    try:
        import datasets
        from datasets.exceptions import DatasetNotFoundError
    except ImportError:
        raise ConfigError(f"reading the Hub dataset {name} needs the datasets package: pip install datasets") from None
    from huggingface_hub import snapshot_download

    subset = cfg.data_config or None
    with hub_errors(hub, "dataset"):
        try:
            try:
                with online(downloads_allowed()):
                    loaded = datasets.load_dataset(hub.repo, subset, split=split, revision=hub.revision)
            except (ConnectionError, FileNotFoundError):  # not in datasets' cache, and the Hub out of reach
                folder = snapshot_download(hub.repo, repo_type="dataset", revision=hub.revision, local_files_only=True)
                loaded = datasets.load_dataset(folder, subset, split=split)
        except DatasetNotFoundError:
            raise ConfigError(f"no dataset {hub.repo} on the Hugging Face Hub: check the spelling (ORG/NAME); for a "
                              "private or gated one set HF_TOKEN or run `hf auth login`") from None
        except ValueError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"cannot read the Hub dataset {name} ({reason}); check its split (ORG/NAME:SPLIT) and "
                              "--data-config") from None
    return dataset_rows(loaded, lambda splits: f"the Hub dataset {name} has splits {', '.join(splits)} but no "
                        f"'train'; name one: {hub}:{splits[0]}")


def dataset_rows(loaded: Any, no_train: Callable[[list[str]], str]) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a `datasets` Dataset, or of a DatasetDict's 'train' split (or its only one); `no_train` says, given
    the split names, what to do when it has several and none is 'train'."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" not in loaded and len(splits) != 1:
            raise ConfigError(no_train(splits))
        loaded = loaded["train" if "train" in loaded else splits[0]]
    return [(f"row {i}", row) for i, row in enumerate(loaded.to_list(), start=1)]
