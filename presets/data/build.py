"""Rebuild the shipped datasets from Debian's `fortunes` packages and Python's standard library docstrings
(run once; the .jsonl files are committed).

    apt-get install fortunes fortunes-min && python presets/data/build.py

Deterministic: entries are cleaned, de-duplicated and ordered by content hash, never by a random draw, so the
same package version (and, for the docstrings, the same Python version) always gives byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import re
from pathlib import Path

SOURCE = Path("/usr/share/games/fortunes")
HERE = Path(__file__).resolve().parent
# Causal-LM text: sayings, wisdom and literature; disjoint from the classification topics below.
TEXT_FILES = ("fortunes", "wisdom", "tao", "platitudes", "literature", "education", "kids", "paradoxum",
              "goedel")
# Prompt/response: the question-and-answer riddles ("Q: ... A: ...").
QA_FILE = "riddles"
# Classification: topics a reader tells apart at a glance.
TOPIC_FILES = ("computers", "food", "love", "politics", "startrek")
TOPIC_MAX_CHARS = 300
TOPIC_PER_CLASS = 180
# Instructions for a pretrained chat model: what a stdlib function does, answered by its docstring's first
# paragraph. Pure-Python modules whose public API is the same on every platform.
DOC_MODULES = ("argparse", "ast", "base64", "calendar", "collections", "colorsys", "configparser", "contextlib",
               "copy", "csv", "dataclasses", "decimal", "difflib", "email.utils", "enum", "filecmp", "fnmatch",
               "fractions", "functools", "gettext", "glob", "graphlib", "heapq", "html", "inspect", "ipaddress",
               "json", "linecache", "logging", "mimetypes", "pathlib", "plistlib", "posixpath", "pprint", "queue",
               "random", "sched", "secrets", "shlex", "shutil", "statistics", "string", "tarfile", "tempfile",
               "textwrap", "threading", "tokenize", "types", "urllib.parse", "uuid", "zipapp", "zipfile")
DOC_MIN_CHARS, DOC_MAX_CHARS, DOC_RECORDS = 30, 300, 400


def entries(path: Path) -> list[str]:
    """The fortunes of one strfile source (entries separated by lines holding only '%'), cleaned."""
    raw = path.read_text(encoding="utf-8")
    return [clean(e) for e in re.split(r"^%$", raw, flags=re.M) if e.strip()]


def clean(entry: str) -> str:
    """Drop what only a terminal needs: overstrike (x BACKSPACE y prints y), bells, trailing blanks."""
    entry = re.sub(r".\x08", "", entry).replace("\x07", "")
    return "\n".join(line.rstrip() for line in entry.strip("\n").splitlines())


def one_line(text: str) -> str:
    """Classification texts read best as one line: collapse every run of whitespace."""
    return " ".join(text.split())


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def text_records(source: Path) -> list[dict]:
    """Every entry of TEXT_FILES once, in file order."""
    seen: set[str] = set()
    records = []
    for name in TEXT_FILES:
        for text in entries(source / name):
            if text not in seen:
                seen.add(text)
                records.append({"text": text})
    return records


def topic_records(source: Path) -> list[dict]:
    """Up to TOPIC_PER_CLASS short entries per topic, none claimed by two topics, mixed by content hash."""
    by_topic = {name: {one_line(e) for e in entries(source / name)} for name in TOPIC_FILES}
    records = []
    for name, texts in by_topic.items():
        others = set().union(*(t for n, t in by_topic.items() if n != name))
        short = sorted((t for t in texts - others if len(t) <= TOPIC_MAX_CHARS), key=digest)
        records += [{"text": t, "label": name} for t in short[:TOPIC_PER_CLASS]]
    return sorted(records, key=lambda r: digest(r["text"]))


def qa_records(source: Path) -> list[dict]:
    """Entries of QA_FILE shaped as one question then its answer, in file order."""
    records = []
    for text in entries(source / QA_FILE):
        match = re.fullmatch(r"\s*Q:(.+?)^\s*A:(.+)", text, flags=re.M | re.S)
        if match and "Q:" not in match[2]:
            records.append({"prompt": one_line(match[1]), "response": one_line(match[2])})
    return records


def documented_functions(module_name: str) -> list[tuple[str, str, str]]:
    """(kind, qualified name, docstring) of the module's public functions and its public classes' methods."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    found = []
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if inspect.isfunction(obj) and obj.__module__ == module.__name__:
            found.append(("function", f"{module_name}.{name}", inspect.getdoc(obj)))
        elif inspect.isclass(obj) and obj.__module__ == module.__name__:
            found += [("method", f"{module_name}.{name}.{attr}", inspect.getdoc(member))
                      for attr, member in sorted(vars(obj).items())
                      if not attr.startswith("_") and inspect.isfunction(member)]
    return [(kind, qualified, doc) for kind, qualified, doc in found if doc]


def docstring_records() -> list[dict]:
    """DOC_RECORDS questions "What does the Python function X do?" answered by the first paragraph of X's
    docstring (one line), picked and ordered by the SHA-256 of the name."""
    records = []
    for module_name in DOC_MODULES:
        for kind, qualified, doc in documented_functions(module_name):
            answer = one_line(re.split(r"\n\s*\n", doc.strip())[0])
            if DOC_MIN_CHARS <= len(answer) <= DOC_MAX_CHARS:
                records.append((digest(qualified), {"prompt": f"What does the Python {kind} `{qualified}` do?",
                                                    "response": answer}))
    return [record for _, record in sorted(records, key=lambda pair: pair[0])[:DOC_RECORDS]]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help="folder of the fortune files")
    parser.add_argument("--output", type=Path, default=HERE, help="folder to write the .jsonl files to")
    args = parser.parse_args()
    write_jsonl(args.output / "fortunes.jsonl", text_records(args.source))
    write_jsonl(args.output / "fortunes-topics.jsonl", topic_records(args.source))
    write_jsonl(args.output / "riddles-qa.jsonl", qa_records(args.source))
    write_jsonl(args.output / "python-docstrings-qa.jsonl", docstring_records())


if __name__ == "__main__":
    main()
