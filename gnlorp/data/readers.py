"""Reading the user's data file: every supported file type to a list of records, each with where it came from.

Every problem with the file is a `ConfigError` of one line naming the file, the line or row, and the fix,
because a traceback from deep inside a reader tells nobody what to change in their file.
"""

from __future__ import annotations

import codecs
import csv
import errno
import io
import json
import os
import re
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any

from gnlorp.config import ConfigError, RunConfig
from gnlorp.data.hub_data import dataset_rows, parse_dataset_id, read_hub_dataset

SUPPORTED = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
PROJECT_ROOT = Path(__file__).resolve().parents[2]

Row = tuple[str, dict[str, Any]]  # (where it came from, e.g. "line 3", the record as read)


def resolve_data_path(path: str | os.PathLike) -> Path:
    """A relative path missing from the working directory is looked up in the project folder, so the shipped
    presets/data files work whichever folder a checkout is run from."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute():
        return given
    in_project = PROJECT_ROOT / given
    return in_project if in_project.exists() else given



def read_rows(path: Path, cfg: RunConfig) -> list[Row]:
    """The records as read, each with where it came from, so a skipped one can be pointed to."""
    if not path.exists() and parse_dataset_id(str(path)) is not None:
        return read_hub_dataset(str(path), cfg)
    if not path.exists():
        raise ConfigError(f"cannot read data file {path}: {os.strerror(errno.ENOENT)}; check the path")
    if path.is_dir():
        return _read_saved_dataset(path)
    readers: dict[str, Callable[[Path, RunConfig], list[Row]]] = {
        ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv,
        ".parquet": _read_parquet, ".txt": _read_txt,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        kind = f"type {path.suffix!r}" if path.suffix else "type (no extension)"
        raise ConfigError(f"{path}: unsupported file {kind}; use {', '.join(SUPPORTED)} "
                          "or a `datasets` save_to_disk folder")
    return reader(path, cfg)


def _read_text(path: Path) -> str:
    """The file as text; a UTF-8 byte-order mark (as spreadsheets write) is dropped."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read data file {path}: {exc.strerror}; check the path") from None
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path} is not UTF-8 (bad byte 0x{raw[exc.start]:02x} at line {line}); "
                          "re-save it as UTF-8") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _read_jsonl(path: Path, cfg: RunConfig) -> list[Row]:
    return _parse_jsonl(path, _read_text(path))


def _parse_jsonl(path: Path, text: str) -> list[Row]:
    """One JSON object per line; split on \\n only, since JSON strings may hold other line separators."""
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} line {number}: invalid JSON ({exc.msg} at column {exc.colno}); "
                              "fix or remove that line") from None
        rows.append((f"line {number}", _as_object(record, path, f"line {number}")))
    return rows


def _as_object(record: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ConfigError(f'{path} {where}: expected a JSON object such as {{"text": "..."}}, '
                          f"got {type(record).__name__}; fix or remove it")
    return record


def _read_json(path: Path, cfg: RunConfig) -> list[Row]:
    """A .json file is either one array of objects or, as often in practice, JSON lines."""
    text = _read_text(path)
    if not text.lstrip().startswith("["):
        return _parse_jsonl(path, text)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}); "
                          "fix that line") from None
    return [(f"item {i}", _as_object(item, path, f"item {i}")) for i, item in enumerate(items, start=1)]


def _read_csv(path: Path, cfg: RunConfig) -> list[Row]:
    """CSV (or TSV) with a header row; long texts are allowed past csv's default 128 KiB field limit."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""),
                            delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    rows = []
    try:
        for row in reader:
            row.pop(None, None)  # cells beyond the header have no column name
            rows.append((f"line {reader.line_num}", row))
    except csv.Error as exc:
        raise ConfigError(f"{path} line {reader.line_num}: broken CSV ({_first_line(exc)}); "
                          "fix that line") from None
    return rows


def _read_txt(path: Path, cfg: RunConfig) -> list[Row]:
    """Paragraphs (split at blank lines) if the file has any blank line, else one record per line."""
    text = _read_text(path).strip()
    pieces = re.split(r"\n[ \t\r]*\n", text) if re.search(r"\n[ \t\r]*\n", text) else text.splitlines()
    texts = [p.strip() for p in pieces if p.strip()]
    return [(f"record {i}", {cfg.text_column: t}) for i, t in enumerate(texts, start=1)]


def _read_parquet(path: Path, cfg: RunConfig) -> list[Row]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except (OSError, pyarrow.ArrowException) as exc:
        raise ConfigError(f"cannot read {path} as Parquet ({_first_line(exc)}); check the file") from None
    return [(f"row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]


def _read_saved_dataset(path: Path) -> list[Row]:
    """A `datasets` save_to_disk folder: a Dataset, or the 'train' (or only) split of a DatasetDict."""
    if not any((path / name).exists() for name in ("dataset_dict.json", "state.json")):
        raise ConfigError(f"{path} is a folder but not a `datasets` save_to_disk folder (no state.json or "
                          "dataset_dict.json inside); give a data file or such a folder")
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"reading the dataset folder {path} needs the datasets package: "
                          "pip install datasets") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the dataset folder {path} ({_first_line(exc)}); "
                          "save it again") from None
    return dataset_rows(loaded, lambda splits: f"{path} holds splits {', '.join(splits)} but no 'train'; save the "
                        "one to train on")



def columns(rows: list[Row]) -> list[str]:
    """Every column seen, in order of first appearance (records of a .jsonl need not agree)."""
    return list(dict.fromkeys(chain.from_iterable(row for _, row in rows)))

