"""Command-line entry point: ``python -m gnlorp <command>``.

Each subcommand is registered by a small ``_add_<name>`` function listed in ``_COMMANDS``. The
modules they name keep torch out of their import path, so ``--help`` and bad input answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from gnlorp import __version__, demo
from gnlorp.config import METHOD_NAMES, ConfigError, add_config_arguments, config_from_args


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage dump) and exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see: {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _int_in_range(low: int, high: int | None = None, why: str = "") -> Callable[[str], int]:
    """An argparse type that accepts an integer in [low, high], saying why the bound exists."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}{why}, got {value}")
        return value

    return parse


def _add_demo(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="train a tiny LLaMA on CPU with every optimizer mode and compare loss and state memory",
        description="Train a tiny byte-level LLaMA on the Zen of Python with AdamW, GaLore and "
        "GradNormLoRP (32- and 8-bit) from the same initialisation, then print a comparison table.",
    )
    parser.add_argument(
        "--steps",
        type=_int_in_range(1),
        default=demo.DEFAULT_STEPS,
        help=f"training steps per mode ({demo.DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--rank",
        type=_int_in_range(1, demo.HIDDEN_SIZE, " (the demo model's hidden size)"),
        default=demo.DEFAULT_RANK,
        help=f"projection rank of the GaLore and GradNormLoRP modes ({demo.DEFAULT_RANK})",
    )
    parser.add_argument(
        "--seed", type=_int_in_range(0), default=demo.DEFAULT_SEED, help=f"random seed ({demo.DEFAULT_SEED})"
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
    from gnlorp.engine import TrainingRun
    from gnlorp.progress import follow

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


def _add_estimate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "estimate", help="predict the memory a run needs and whether it fits a device, from the model's shapes",
        description="The peak memory of a run, by part: weights, gradients, optimizer states and projectors counted "
        "exactly from the model config (nothing is loaded), activations from measured coefficients, and the "
        "framework's overhead; then whether it fits the device and the largest batch that does.",
    )
    parser.add_argument("--config", help="a YAML run config")
    parser.add_argument("--json", action="store_true", help="print one JSON object of byte counts")
    parser.add_argument("--device", default="this-machine",
                        help="rtx-4090, rtx-3090, l4, t4, a100-40gb, a100-80gb, h100-80gb or this-machine (its GPU, "
                        "else its free RAM)")
    parser.add_argument("--compare", action="store_true", help="every method side by side")
    parser.add_argument("--gpus", type=_int_in_range(1, 1 << 16), default=1,
                        help="memory per GPU on N of --device: one process, data-parallel (DDP) and sharded (FSDP) "
                        "side by side")
    add_config_arguments(parser, ["model", "task", "method", "rank", "optim_bits", "batch_size", "seq_len",
                                  "grad_accum", "targets", "proj_type", "proj_dtype", "layerwise",
                                  "grad_checkpointing", "chunked_loss", "dtype"])
    parser.set_defaults(run=_run_estimate)


def _run_estimate(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    cfg = config_from_args(args)
    from gnlorp.memory import fit, get_device

    device = get_device(args.device)
    if args.compare and args.gpus > 1:
        raise ConfigError("--compare and --gpus each print a table: choose one")
    if args.gpus > 1:
        return _print_per_gpu(cfg, device, args.gpus, args.json)
    if args.compare:
        fits = {name: fit(dataclasses.replace(cfg, method=name), device) for name in METHOD_NAMES}
        if args.json:
            print(json.dumps({name: _fit_json(verdict) for name, verdict in fits.items()}))
            return 0
        _print_fits("GiB", {name: name for name in fits}, fits, trainable=True)
        print(f"on {device.label}, batch {cfg.batch_size} x {cfg.seq_len} tokens")
        return 0
    verdict = fit(cfg, device)
    result = verdict.estimate
    if args.json:
        print(json.dumps({**result, "device": device.name} | _fit_json(verdict)))
        return 0
    for key, value in result.items():
        shown = f"{value:,}" if key == "trainable_params" else f"{value / 2**30:8.3f} GiB"
        print(f"{key:<18} {shown}")
    answer = "fits" if verdict.fits else "does NOT fit"
    print(f"{answer} on {device.label} (needs {verdict.total_bytes / 2**30:.2f} GiB of "
          f"{device.capacity_bytes / 2**30:.2f}); largest batch that fits at seq {cfg.seq_len}: "
          f"{verdict.max_batch_size}")
    return 0


def _fit_json(verdict) -> dict:
    """A Fit as `estimate --json` prints it: the byte counts, the verdict and the largest batch that fits."""
    return {**verdict.estimate, "fits": verdict.fits, "max_batch_size": verdict.max_batch_size}


def _print_fits(corner: str, headers: dict[str, str], fits: dict, trainable: bool) -> None:
    """Estimates side by side, a column per Fit: GiB per part and in total, (trainable parameters,) the verdict
    and the largest batch that fits."""
    from gnlorp.memory import PARTS

    columns = [*PARTS, "total"]
    label = max(map(len, columns)) + 1
    print(f"{corner:<{label}}" + "".join(f"{headers[name]:>13}" for name in fits))
    for key in columns:
        print(f"{key:<{label}}" + "".join(f"{f.estimate[key] / 2**30:13.3f}" for f in fits.values()))
    if trainable:
        counts = (_count(f.estimate["trainable_params"]) for f in fits.values())
        print(f"{'trainable':<{label}}" + "".join(f"{count:>13}" for count in counts))
    print(f"{'fits':<{label}}" + "".join(f"{'yes' if f.fits else 'no':>13}" for f in fits.values()))
    print(f"{'max batch':<{label}}" + "".join(f"{f.max_batch_size:13}" for f in fits.values()))


def _print_per_gpu(cfg, device, gpus: int, as_json: bool) -> int:
    """One GPU, then each of `gpus` data-parallel and sharded: every one holds cfg.batch_size sequences."""
    import dataclasses
    import json

    from gnlorp.memory import fit

    several = dataclasses.replace(cfg, layerwise=False)  # layer-wise steps are one process's (their hooks fire
    # before gradients are all-reduced or reduce-scattered)
    fits = {"one": fit(cfg, device), "ddp": fit(dataclasses.replace(several, fsdp=False), device, gpus),
            "fsdp": fit(dataclasses.replace(several, fsdp=True), device, gpus)}
    if as_json:
        print(json.dumps({"gpus": gpus, "device": device.name,
                          **{name: _fit_json(f) for name, f in fits.items() if name != "one"}}))
        return 0
    headers = {"one": "1 GPU", "ddp": f"DDP x{gpus}", "fsdp": f"FSDP x{gpus}"}
    _print_fits("GiB per GPU", headers, fits, trainable=False)
    print(f"on {device.label}, batch {cfg.batch_size} x {cfg.seq_len} tokens per GPU (a global batch of "
          f"{cfg.batch_size * gpus} on {gpus}); the CUDA context is in 'fits', not in the table")
    if cfg.layerwise:
        print("layer-wise steps run in one process only: the DDP and FSDP columns are without them")
    return 0


def _add_plan(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "plan", help="find the fastest settings of a run that fit a device, and write them as a config",
        description="Search the memory-saving settings (optimizer bits, projector dtype, weight dtype, layer-wise "
        "steps, activation checkpointing, the chunked loss, micro-batch and accumulation at the same tokens per "
        "step; the rank too unless given) with the estimator, and print the fastest run that fits. Exit 2 when "
        "nothing fits, with what comes closest.",
    )
    parser.add_argument("--config", help="a YAML run config to start from (its data, lr, steps are kept)")
    parser.add_argument("--device", default="this-machine",
                        help="rtx-4090, rtx-3090, l4, t4, a100-40gb, a100-80gb, h100-80gb or this-machine")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: fits, config, predicted_peak_bytes, device_bytes, parts")
    parser.add_argument("--write-config", metavar="FILE", help="write the planned run as YAML for train --config")
    add_config_arguments(parser, ["model", "task", "method", "rank", "batch_size", "seq_len", "grad_accum",
                                  "targets", "proj_type"])
    parser.set_defaults(run=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    import json

    cfg = config_from_args(args)
    if args.write_config and Path(args.write_config).exists():
        raise ConfigError(f"{args.write_config} already exists; choose another --write-config file")
    from gnlorp.memory import plan

    result = plan(cfg, args.device, search_rank=args.rank is None and args.config is None)
    gib = 2**30
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        chosen = result.config
        print(f"{'fits' if result.fits else 'nothing fits'} on {result.device.label}: {chosen.method} rank "
              f"{chosen.rank} needs {result.predicted_peak_bytes / gib:.2f} of {result.budget_bytes / gib:.2f} GiB "
              f"(the card's {result.device.capacity_bytes / gib:.2f} less {result.headroom:.0%} kept free); "
              f"{chosen.batch_size} x {chosen.grad_accum} sequences of {chosen.seq_len} tokens per step; rough step "
              f"time {result.time_factor:.2f}x the unconstrained run's")
        for change in result.changes:
            print(f"  {change}")
        for name, value in result.parts.items():
            print(f"  {name:<18} {value / gib:8.3f} GiB")
    if not result.fits:
        print(f"gnlorp plan: error: nothing fits on {result.device.label}; the closest, {_settings(result.config)}, "
              f"needs {result.predicted_peak_bytes / gib:.2f} GiB, {result.over_bytes / gib:.2f} GiB over the "
              f"{result.budget_bytes / gib:.2f} GiB it may use; try a "
              "shorter --seq-len, fewer sequences per step, another method or a larger device", file=sys.stderr)
        return 2
    if args.write_config:
        result.config.to_yaml(args.write_config)
        if not args.json:
            print(f"wrote {args.write_config}; train it with: python -m gnlorp train --config {args.write_config}")
    return 0


def _settings(cfg) -> str:
    """The settings a plan varies, in one phrase."""
    on = [name for name in ("layerwise", "grad_checkpointing", "chunked_loss") if getattr(cfg, name)]
    return (f"{cfg.optim_bits}-bit states, {cfg.proj_dtype} projectors, {cfg.dtype} weights, batch "
            f"{cfg.batch_size} x {cfg.grad_accum}" + "".join(f", {name}" for name in on))


def _count(number: int) -> str:
    """A parameter count short enough for a table column, to four digits: 8.030 B, 134.5 M, 49.66 k."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if number >= size:
            return f"{number / size:.4g} {unit}"
    return str(number)


def _add_methods(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("methods", help="list the training methods and what each trades")
    parser.set_defaults(run=_run_methods)


def _run_methods(args: argparse.Namespace) -> int:
    from gnlorp.methods import METHODS

    width = max(len(name) for name in METHODS)
    for name, method in METHODS.items():
        print(f"{name:<{width}}  {method.summary}")
    return 0


def _add_try(commands: argparse._SubParsersAction) -> None:
    from gnlorp import infer

    parser = commands.add_parser(
        "try", help="generate text or classify a sentence with a run or an exported model",
        description="Load a run folder (its final weights, adapters merged in; its latest checkpoint while it has "
        "no final weights) or an exported model folder. With --prompt a causal LM streams its continuation to "
        "stdout; with --text a classifier prints the label and every class's probability.",
    )
    parser.add_argument("--model", required=True, help="a run folder (gnlorp train) or a model folder (gnlorp export)")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="text for a causal LM to continue (or to answer, with a chat template)")
    given.add_argument("--text", help="a sentence for a classifier to label")
    parser.add_argument("--base", action="store_true",
                        help="try the run's untrained starting point instead, to compare with the same prompt and seed")
    parser.add_argument("--max-new-tokens", type=_int_in_range(1, infer.MAX_NEW_TOKENS),
                        default=infer.DEFAULT_MAX_NEW_TOKENS, help="tokens to generate (%(default)s)")
    parser.add_argument("--temperature", type=float, default=infer.DEFAULT_TEMPERATURE,
                        help="sampling temperature; 0 decodes greedily (%(default)s)")
    parser.add_argument("--top-p", type=float, default=infer.DEFAULT_TOP_P,
                        help="nucleus sampling: keep the likeliest tokens up to this probability (%(default)s)")
    parser.add_argument("--seed", type=_int_in_range(0), default=infer.DEFAULT_SEED,
                        help="sampling seed: the same prompt and seed give the same text (%(default)s)")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap the prompt in the tokenizer's chat template (default: when it has one)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object at the end (text, or label and probabilities) instead of streaming")
    parser.set_defaults(run=_run_try)


def _run_try(args: argparse.Namespace) -> int:
    import json

    from gnlorp import infer

    generating = args.prompt is not None
    infer.check_input(args.prompt if generating else args.text, "prompt" if generating else "text")
    if generating:
        infer.check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    model = infer.load_for_try(args.model, base=args.base, task="causal-lm" if generating else "seq-cls")
    if not args.json:
        print(f"gnlorp try: {model.description}", file=sys.stderr)
    if generating:
        pieces = []
        for piece in model.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p, seed=args.seed, chat=args.chat):
            pieces.append(piece)
            if not args.json:
                print(piece, end="", flush=True)
        print(json.dumps({"model": model.description, "text": "".join(pieces)}) if args.json else "")
        return 0
    result = model.classify(args.text)
    if args.json:
        print(json.dumps({"model": model.description, "label": result.label, "probabilities": result.probabilities}))
        return 0
    print(result.label)
    width = max(map(len, result.probabilities))
    for name, p in sorted(result.probabilities.items(), key=lambda item: -item[1]):
        print(f"  {name:<{width}}  {p:6.1%}  {'#' * round(p * 40)}")
    return 0


_COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_train, _add_estimate, _add_plan, _add_export, _add_try, _add_methods, _add_demo,
)


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser with every registered subcommand."""
    parser = _Parser(prog="gnlorp", description="Memory-efficient language-model training.")
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


if __name__ == "__main__":
    sys.exit(main())
