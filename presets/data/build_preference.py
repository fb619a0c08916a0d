"""Build qa-preference.jsonl from the two committed question-and-answer sets (run once; the file is committed).

    python presets/data/build_preference.py

Every question keeps its own answer as `chosen`; `rejected` is an answer to a question of the other set (a riddle's
punchline for a docstring question, a docstring for a riddle), so the preference is the one a reader checks at a
glance: an answer to the question asked over an answer to some other question. Deterministic: records are ordered by
the SHA-256 of their prompt, and the i-th question of one set gets the answer of the i-th (cyclically) of the other.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("python-docstrings-qa.jsonl", "riddles-qa.jsonl")


def _read(name: str) -> list[dict]:
    lines = (HERE / name).read_text(encoding="utf-8").splitlines()
    return sorted((json.loads(line) for line in lines if line.strip()), key=lambda r: _digest(r["prompt"]))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def preference_records() -> list[dict]:
    docs, riddles = (_read(name) for name in SOURCES)
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": other["response"]}
             for own, others in ((docs, riddles), (riddles, docs))
             for r, other in zip(own, (others[i % len(others)] for i in range(len(own))), strict=True)]
    return sorted(pairs, key=lambda r: _digest(r["prompt"]))


def main() -> None:
    records = preference_records()
    (HERE / "qa-preference.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                              encoding="utf-8")


if __name__ == "__main__":
    main()
