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
# Multiple choice (gnlorp eval --choices): docstring questions, each with its answer and three others'.
CHOICE_QUESTIONS = 60
CHOICES = 4
# Instructions for a pretrained chat model: what a stdlib function does, answered by its docstring's first
# paragraph. Pure-Python modules whose public API is the same on every platform.
DOC_MODULES = ("argparse", "ast", "base64", "calendar", "collections", "colorsys", "configparser", "contextlib",
               "copy", "csv", "dataclasses", "decimal", "difflib", "email.utils", "enum", "filecmp", "fnmatch",
               "fractions", "functools", "gettext", "glob", "graphlib", "heapq", "html", "inspect", "ipaddress",
               "json", "linecache", "logging", "mimetypes", "pathlib", "plistlib", "posixpath", "pprint", "queue",
               "random", "sched", "secrets", "shlex", "shutil", "statistics", "string", "tarfile", "tempfile",
               "textwrap", "threading", "tokenize", "types", "urllib.parse", "uuid", "zipapp", "zipfile")
DOC_MIN_CHARS, DOC_MAX_CHARS, DOC_RECORDS = 30, 300, 400
# Conversations: a docstring chat per function (what it does, its signature, what else its docstring says), some
# opened by the module's own docstring as the system message, and the riddles as several questions in a row.
CHAT_DOC_RECORDS = 240
CHAT_SYSTEM_EVERY = 3  # one conversation in three (by name hash) opens with the module's docstring
CHAT_RIDDLES_PER_CONVERSATION = 3


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


def documented_functions(module_name: str) -> list[tuple[str, str, object]]:
    """(kind, qualified name, function) of the module's public functions and its public classes' methods that
    have a docstring."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    found = []
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if inspect.isfunction(obj) and obj.__module__ == module.__name__:
            found.append(("function", f"{module_name}.{name}", obj))
        elif inspect.isclass(obj) and obj.__module__ == module.__name__:
            found += [("method", f"{module_name}.{name}.{attr}", member)
                      for attr, member in sorted(vars(obj).items())
                      if not attr.startswith("_") and inspect.isfunction(member)]
    return [(kind, qualified, function) for kind, qualified, function in found if inspect.getdoc(function)]


def docstring_records() -> list[dict]:
    """DOC_RECORDS questions "What does the Python function X do?" answered by the first paragraph of X's
    docstring (one line), picked and ordered by the SHA-256 of the name."""
    records = []
    for module_name in DOC_MODULES:
        for kind, qualified, function in documented_functions(module_name):
            answer = one_line(re.split(r"\n\s*\n", inspect.getdoc(function).strip())[0])
            if DOC_MIN_CHARS <= len(answer) <= DOC_MAX_CHARS:
                records.append((digest(qualified), {"prompt": f"What does the Python {kind} `{qualified}` do?",
                                                    "response": answer}))
    return [record for _, record in sorted(records, key=lambda pair: pair[0])[:DOC_RECORDS]]


def first_paragraph(doc: str, index: int = 0) -> str | None:
    """Paragraph `index` of a docstring as one line, if it is prose of DOC_MIN_CHARS to DOC_MAX_CHARS (not a
    doctest, which reads badly on one line)."""
    paragraphs = re.split(r"\n\s*\n", doc.strip())
    if index >= len(paragraphs) or ">>>" in paragraphs[index]:
        return None
    text = one_line(paragraphs[index])
    return text if DOC_MIN_CHARS <= len(text) <= DOC_MAX_CHARS else None


def signature(qualified: str, function: object) -> str | None:
    """`name(parameters)` as inspect.signature writes it; None where a default's repr holds a memory address
    (it would change from run to run)."""
    text = f"{qualified}{inspect.signature(function)}"
    return None if " at 0x" in text else text


def docstring_conversation(kind: str, qualified: str, function: object, system: str | None) -> dict | None:
    """What X does (its docstring's first paragraph), its signature, and what else its docstring says (the next
    paragraph) where there is one; None when the first paragraph is unfit."""
    doc = inspect.getdoc(function)
    answer = first_paragraph(doc)
    if answer is None:
        return None
    turns = [("user", f"What does the Python {kind} `{qualified}` do?"), ("assistant", answer)]
    shape = signature(qualified, function)
    if shape:
        turns += [("user", "What is its signature?"), ("assistant", f"`{shape}`")]
    more = first_paragraph(doc, 1)
    if more:
        turns += [("user", "What else does its docstring say?"), ("assistant", more)]
    head = [("system", system)] if system else []
    return {"messages": [{"role": role, "content": content} for role, content in head + turns]}


def docstring_chats() -> list[dict]:
    """CHAT_DOC_RECORDS docstring conversations, picked and ordered by the SHA-256 of the name."""
    found = []
    for module_name in DOC_MODULES:
        summary = first_paragraph(inspect.getdoc(importlib.import_module(module_name)) or "")
        for kind, qualified, function in documented_functions(module_name):
            key = digest(qualified)
            system = summary if int(key, 16) % CHAT_SYSTEM_EVERY == 0 else None
            record = docstring_conversation(kind, qualified, function, system)
            if record:
                found.append((key, record))
    return [record for _, record in sorted(found, key=lambda pair: pair[0])[:CHAT_DOC_RECORDS]]


def riddle_exchanges(source: Path) -> list[list[tuple[str, str]]]:
    """Each entry of QA_FILE made only of `Q:`/`A:` pairs, as its list of (question, answer)."""
    found = []
    for text in entries(source / QA_FILE):
        pairs = re.findall(r"^\s*Q:(.+?)^\s*A:(.+?)(?=^\s*Q:|\Z)", text, flags=re.M | re.S)
        if pairs and text.lstrip().startswith("Q:"):
            found.append([(one_line(q), one_line(a)) for q, a in pairs])
    return found


def riddle_chats(source: Path) -> list[dict]:
    """An entry with several riddles is one conversation; single riddles are grouped
    CHAT_RIDDLES_PER_CONVERSATION at a time in content-hash order."""
    exchanges = riddle_exchanges(source)
    singles = sorted((pairs[0] for pairs in exchanges if len(pairs) == 1), key=lambda qa: digest(qa[0] + qa[1]))
    groups = [pairs for pairs in exchanges if len(pairs) > 1]
    groups += [singles[i:i + CHAT_RIDDLES_PER_CONVERSATION]
               for i in range(0, len(singles), CHAT_RIDDLES_PER_CONVERSATION)]
    return [{"messages": [{"role": role, "content": content} for q, a in pairs
                          for role, content in (("user", q), ("assistant", a))]} for pairs in groups]


def chat_records(source: Path) -> list[dict]:
    """The docstring and riddle conversations, mixed by the SHA-256 of each record."""
    records = docstring_chats() + riddle_chats(source)
    return sorted(records, key=lambda r: digest(json.dumps(r, ensure_ascii=False)))


def choice_records(qa: list[dict], count: int = CHOICE_QUESTIONS) -> list[dict]:
    """Multiple-choice questions from the docstring instructions: the question, then its own answer among the
    answers of three other questions (the next ones in SHA-256 order of their text), at a hash-picked place."""
    ordered = sorted(qa, key=lambda r: digest(r["prompt"]))
    records = []
    for i, record in enumerate(ordered[:count]):
        others = [ordered[(i + k) % len(ordered)]["response"] for k in range(1, CHOICES)]
        place = int(digest(record["prompt"]), 16) % CHOICES
        choices = [*others[:place], record["response"], *others[place:]]
        records.append({"question": f"{record['prompt']}\nAnswer:", "choices": choices, "answer": place})
    return records


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
    write_jsonl(args.output / "chat.jsonl", chat_records(args.source))
    qa = [json.loads(line) for line in (args.output / "python-docstrings-qa.jsonl").read_text("utf-8").splitlines()]
    write_jsonl(args.output / "docstring-choices.jsonl", choice_records(qa))


if __name__ == "__main__":
    main()
