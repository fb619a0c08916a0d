"""What a run would train on, told to a person: counts, what was lost and where, and the rows with the tokens
that carry the loss marked. `gnlorp data`, `gnlorp train` and the studio's dataset preview all show this."""

from __future__ import annotations

from typing import Any

from gnlorp.data.examples import IGNORE_INDEX, TokenizedData


def describe(data: TokenizedData, show: int) -> dict[str, Any]:
    """Counts over both parts of the split, what was dropped by reason, and the first `show` training rows (as
    the model sees them: packed rows hold several examples, their position ids restarting at each)."""
    rows = data.train + data.eval
    per_token = bool(rows) and isinstance(rows[0].labels, list)
    report = data.report
    outcomes = report.get("outcomes", {})
    return {
        "format": report["format"], "records": report["records"], "examples": report.get("examples", len(rows)),
        "rows": len(rows), "tokens": sum(len(r.input_ids) for r in rows),
        "trained_tokens": sum(label != IGNORE_INDEX for r in rows for label in r.labels) if per_token else None,
        "outcomes": {status: n for status, n in outcomes.items() if not status.startswith("dropped")},
        "dropped": dict(report.get("skipped", {})) | {
            status.removeprefix("dropped: "): n for status, n in outcomes.items() if status.startswith("dropped")},
        "first": {key.removeprefix("dropped: "): where for key, where in report.get("first", {}).items()},
        "warnings": report.get("warnings", []),
        **({"bad_pairs": report["bad_pairs"]} if "bad_pairs" in report else {}),  # preference data: every line
        "preview": [{"input_ids": r.input_ids, "labels": r.labels,
                     "position_ids": r.position_ids or list(range(len(r.input_ids)))} for r in data.train[:show]],
    }


def summary_line(described: dict[str, Any]) -> str:
    """`describe`'s counts in one line: the format, what was kept, cut and dropped by reason, and where each of
    those first happened, so a person knows where in the file to look."""
    first = described["first"]
    parts = [f"{n} {status}" + (f" (first at {first[status]})" if status in first else "")
             for status, n in described["outcomes"].items()]
    parts += [f"{n} dropped, {reason}" + (f" (first at {first[reason]})" if reason in first else "")
              for reason, n in described["dropped"].items()]
    packed = f" packed in {described['rows']} row(s)" if described["rows"] != described["examples"] else ""
    trained = f", {described['trained_tokens']} trained" if described["trained_tokens"] is not None else ""
    return (f"data: {described['format']}, {described['records']} record(s) -> {described['examples']} example(s)"
            f"{packed}, {described['tokens']} token(s){trained}" + (f"; {', '.join(parts)}" if parts else ""))


def trained_pieces(tokenizer: Any, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The row as text in stretches, each marked whether its tokens carry the loss (what HighlightedText and the
    CLI's [[ ]] show)."""
    pieces: list[tuple[str, bool]] = []
    run: list[int] = []
    trained = False
    for token, label in zip(input_ids, labels, strict=True):
        if (label != IGNORE_INDEX) != trained and run:
            pieces.append((tokenizer.decode(run), trained))
            run = []
        trained = label != IGNORE_INDEX
        run.append(token)
    if run:
        pieces.append((tokenizer.decode(run), trained))
    return pieces
