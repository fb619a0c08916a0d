"""`gnlorp data`: what a run would train on, read and tokenized exactly as `gnlorp train` does, without training,
so a person sees the detected format, the records skipped and where the loss falls before paying for a run."""

from __future__ import annotations

import argparse

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


def _run_data(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # bad settings are answered before torch is imported
    from gnlorp.data import describe, prepare_data, summary_line, trained_pieces
    from gnlorp.models.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    result = describe(prepare_data(cfg, tokenizer), args.show)
    if args.json:
        print(strict_json(result))
        return 0
    print(summary_line(result))
    for i, row in enumerate(result["preview"], start=1):
        if isinstance(row["labels"], int):
            print(f"--- row {i}: {tokenizer.decode(row['input_ids'])!r} -> class {row['labels']}")
            continue
        marked = "".join(f"[[{text}]]" if trained else text
                         for text, trained in trained_pieces(tokenizer, row["input_ids"], row["labels"]))
        print(f"--- row {i} ([[ ]] carries the loss)\n{marked}")
    return 0
