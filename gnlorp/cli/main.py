"""Command-line entry point: ``python -m gnlorp <command>``.

Each subcommand is registered by a small ``add_<name>`` function (here, or in memory.py, try_cmd.py and
data_cmd.py for the larger ones) listed in ``_COMMANDS``. The modules they name keep torch out of their import
path, so ``--help`` and bad input answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .. import __version__, demo
from ..config import ConfigError, add_config_arguments, config_from_args
from .args import Parser, int_in_range
from .data_cmd import add_data
from .memory import add_estimate, add_plan
from .try_cmd import add_try


def _add_demo(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="train a tiny LLaMA on CPU with every optimizer mode and compare loss and state memory",
        description="Train a tiny byte-level LLaMA on the Zen of Python with AdamW, GaLore and "
        "GradNormLoRP (32- and 8-bit) from the same initialisation, then print a comparison table.",
    )
    parser.add_argument(
        "--steps",
        type=int_in_range(1),
        default=demo.DEFAULT_STEPS,
        help=f"training steps per mode ({demo.DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--rank",
        type=int_in_range(1, demo.HIDDEN_SIZE, " (the demo model's hidden size)"),
        default=demo.DEFAULT_RANK,
        help=f"projection rank of the GaLore and GradNormLoRP modes ({demo.DEFAULT_RANK})",
    )
    parser.add_argument(
        "--seed", type=int_in_range(0), default=demo.DEFAULT_SEED, help=f"random seed ({demo.DEFAULT_SEED})"
    )
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    results = demo.run_demo(steps=args.steps, rank=args.rank, seed=args.seed)
    print(demo.format_table(results))
    return 0


def _add_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train", help="train a model into a run folder",
        description="Train with any method; flags override --config. Ctrl-C stops after the current step "
        "and saves a checkpoint; --resume continues from the run folder's latest checkpoint.",
    )
    parser.add_argument("--config", help="a YAML run config (e.g. presets/tiny-gradnormlorp.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    add_config_arguments(parser)
    parser.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    if args.resume and not args.config and args.output and (Path(args.output) / "config.yaml").is_file():
        args.config = str(Path(args.output) / "config.yaml")
    cfg = config_from_args(args)  # bad settings are answered before torch is imported
    from gnlorp.cli.progress import follow
    from gnlorp.train.engine import TrainingRun

    return follow(TrainingRun(cfg, resume=args.resume))


def _add_export(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export", help="merge a run into a plain Hugging Face model folder (or a GGUF file) and verify it",
        description="Merge the run's trained weights (adapters folded in) into a safetensors model folder, "
        "reload it and compare its logits with the trained model. --format gguf writes one .gguf file for "
        "llama.cpp and Ollama instead, with an Ollama Modelfile, checked through transformers' GGUF reader.",
    )
    parser.add_argument("--run", dest="run_dir", required=True, help="the run folder written by `gnlorp train`")
    parser.add_argument("--output", required=True, help="the folder to write")
    parser.add_argument("--format", choices=("hf", "gguf"), default="hf",
                        help="hf: a Hugging Face model folder; gguf: one .gguf file and a Modelfile")
    parser.add_argument("--gguf-type", choices=("f16", "q8_0"), default="f16",
                        help="GGUF weight type: f16 (2 bytes a weight) or q8_0 (8-bit blocks, about 1.06 bytes)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output")
    parser.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from gnlorp.export import export_run

    report = export_run(args.run_dir, args.output, force=args.force, format=args.format, gguf_type=args.gguf_type)
    print(report.verdict())
    for name, size in sorted(report.files.items()):
        print(f"  {name}  {size:,} bytes")
    return 0


def _add_eval(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval", help="score a run and its base model on held-out data (and multiple-choice questions)",
        description="Held-out loss and perplexity (on the trained tokens only: the assistant's, for conversations), "
        "a classifier's accuracy and, with --choices, multiple-choice accuracy by the log-likelihood of each choice "
        "(as lm-evaluation-harness scores it), for the run's trained model and its starting point. Writes eval.json "
        "in the run folder.",
    )
    parser.add_argument("--run", dest="run_dir", required=True, help="the run folder written by `gnlorp train`")
    parser.add_argument("--data", help="score every record of this file instead of the run's held-out part")
    parser.add_argument("--choices", help="a JSONL of {\"question\", \"choices\", \"answer\"} "
                        "(e.g. presets/data/docstring-choices.jsonl)")
    parser.add_argument("--json", action="store_true", help="print eval.json's object instead of a table")
    parser.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from gnlorp.atomic import strict_json
    from gnlorp.export.evaluation import comparison, evaluate_run

    record = evaluate_run(args.run_dir, data=args.data, choices=args.choices)
    if args.json:
        print(strict_json(record))
    else:
        print(f"{args.run_dir} at step {record['step']} on {record['data']} ({record['examples']} examples):")
        print("\n".join(comparison(record)))
    return 0


def _add_methods(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("methods", help="list the training methods and what each trades")
    parser.set_defaults(run=_run_methods)


def _run_methods(args: argparse.Namespace) -> int:
    from gnlorp.methods import METHODS

    width = max(len(name) for name in METHODS)
    for name, method in METHODS.items():
        print(f"{name:<{width}}  {method.summary}")
    return 0


_COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_train, add_data, add_estimate, add_plan, _add_export, add_try, _add_eval, _add_methods, _add_demo,
)


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser with every registered subcommand."""
    parser = Parser(prog="gnlorp", description="Memory-efficient language-model training.")
    parser.add_argument("--version", action="version", version=f"gnlorp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit code (argparse exits 2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"gnlorp {args.command}: error: {exc}", file=sys.stderr)
        return 2
