"""`gnlorp data`: what a run would train on, read and tokenized exactly as `gnlorp train` does, without training,
so a person sees the detected format, the records skipped and where the loss falls before paying for a run."""

from __future__ import annotations

import argparse
from typing import Any

from ..atomic import strict_json
from ..config import add_config_arguments, config_from_args
from .args import int_in_range


def add_data(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "data", help="show how a data file is read and tokenized for training",
        description="Read --data and tokenize it for --model exactly as `gnlorp train` would with the same flags, "
        "then print the detected format, the counts of records, examples and tokens, what was skipped or dropped "
        "and why, and with --show N the first N training examples with the tokens that carry the loss.",
    )
    parser.add_argument("--config", help="a YAML run config (e.g. presets/tiny-gradnormlorp.yaml)")
    parser.add_argument("--show", type=int_in_range(0), default=0, help="training examples to preview (0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_config_arguments(parser)
    parser.set_defaults(run=_run_data)


def summary(data: Any, show: int) -> dict[str, Any]:
    """Counts over both parts of the split, what was dropped by reason, and the first `show` training rows."""
    from gnlorp.data.examples import IGNORE_INDEX

    examples = data.train + data.eval
    per_token = bool(examples) and isinstance(examples[0].labels, list)
    report = data.report
    dropped = dict(report.get("skipped", {}))
    dropped |= {status.removeprefix("dropped: "): n for status, n in report.get("examples", {}).items()
                if status.startswith("dropped: ")}
    return {
        "format": report["format"], "records": report["records"], "examples": len(examples),
        "tokens": sum(len(e.input_ids) for e in examples),
        "trained_tokens": sum(label != IGNORE_INDEX for e in examples for label in e.labels) if per_token else None,
        "outcomes": {status: n for status, n in report.get("examples", {}).items() if not status.startswith("dropped")},
        "dropped": dropped, "warnings": report.get("warnings", []),
        "preview": [{"input_ids": e.input_ids, "labels": e.labels, "position_ids": list(range(len(e.input_ids)))}
                    for e in data.train[:show]],
    }


def _marked(tokenizer: Any, row: dict[str, Any]) -> str:
    """The example's text with each stretch that carries the loss in [[ ]]."""
    from gnlorp.data.examples import IGNORE_INDEX

    if not isinstance(row["labels"], list):
        return f"{tokenizer.decode(row['input_ids'])!r} -> class {row['labels']}"
    pieces, run, trained = [], [], False
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if (label != IGNORE_INDEX) != trained and run:
            pieces.append(f"[[{tokenizer.decode(run)}]]" if trained else tokenizer.decode(run))
            run = []
        trained = label != IGNORE_INDEX
        run.append(token)
    pieces.append(f"[[{tokenizer.decode(run)}]]" if trained else tokenizer.decode(run))
    return "".join(pieces)


def _run_data(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # bad settings are answered before torch is imported
    from gnlorp.data.records import prepare_data
    from gnlorp.models.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    result = summary(prepare_data(cfg, tokenizer), args.show)
    if args.json:
        print(strict_json(result))
        return 0
    print(f"format: {result['format']}, {result['records']} record(s) -> {result['examples']} example(s), "
          f"{result['tokens']} token(s)" + (f", {result['trained_tokens']} trained" if result["trained_tokens"]
                                            is not None else ""))
    for status, n in result["outcomes"].items():
        print(f"  {status}: {n}")
    for reason, n in result["dropped"].items():
        print(f"  dropped, {reason}: {n}")
    for message in result["warnings"]:
        print(f"warning: {message}")
    for i, row in enumerate(result["preview"], start=1):
        print(f"--- example {i} ([[ ]] carries the loss)\n{_marked(tokenizer, row)}")
    return 0
