"""`gnlorp estimate` and `gnlorp plan`: a run's memory by part against a device, and the fastest settings that fit."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..atomic import strict_json
from ..config import METHOD_NAMES, ConfigError, add_config_arguments, config_from_args
from .args import int_in_range

# gnlorp.memory's GPU_NAMES, written out: importing it here would load torch before every command's parser.
DEVICES = ("rtx-4090, rtx-3090, rtx-4080, rtx-4060ti-16gb, rtx-4070, rtx-3060-12gb, rtx-4060, l4, t4, a100-40gb, "
           "a100-80gb, h100-80gb")


def add_estimate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "estimate", help="predict the memory a run needs and whether it fits a device, from the model's shapes",
        description="The peak memory of a run, by part: weights, gradients, optimizer states and projectors counted "
        "exactly from the model config (nothing is loaded), activations from measured coefficients, and the "
        "framework's overhead; then whether it fits the device and the largest batch that does.",
    )
    parser.add_argument("--config", help="a YAML run config")
    parser.add_argument("--json", action="store_true", help="print one JSON object of byte counts")
    parser.add_argument("--device", default="this-machine",
                        help=f"{DEVICES} or this-machine (its GPU, else its free RAM)")
    parser.add_argument("--compare", action="store_true", help="every method side by side")
    parser.add_argument("--gpus", type=int_in_range(1, 1 << 16), default=1,
                        help="memory per GPU on N of --device: one process, data-parallel (DDP) and sharded (FSDP) "
                        "side by side")
    add_config_arguments(parser, ["model", "task", "method", "rank", "optim_bits", "weight_bits", "batch_size",
                                  "seq_len", "grad_accum", "targets", "proj_type", "proj_dtype", "layerwise",
                                  "grad_checkpointing", "chunked_loss", "dtype", "objective"])
    parser.set_defaults(run=_run_estimate)


def _run_estimate(args: argparse.Namespace) -> int:

    cfg = config_from_args(args)
    from gnlorp.memory import describe_weights, fit, get_device, with_method

    device = get_device(args.device)
    if args.compare and args.gpus > 1:
        raise ConfigError("--compare and --gpus each print a table: choose one")
    if args.gpus > 1:
        return _print_per_gpu(cfg, device, args.gpus, args.json)
    if args.compare:
        fits = {name: fit(with_method(cfg, name), device) for name in METHOD_NAMES}
        if args.json:
            print(strict_json({name: _fit_json(verdict) for name, verdict in fits.items()}))
            return 0
        _print_fits("GiB", {name: name for name in fits}, fits, trainable=True)
        print(f"on {device.label}, batch {cfg.batch_size} x {cfg.seq_len} tokens")
        return 0
    verdict = fit(cfg, device)
    result = verdict.estimate
    if args.json:
        print(strict_json({**result, "device": device.name} | _fit_json(verdict)))
        return 0
    for key, value in result.items():
        shown = f"{value:,}" if key == "trainable_params" else f"{value / 2**30:8.3f} GiB"
        print(f"{key:<18} {shown}")
    answer = "fits" if verdict.fits else "does NOT fit"
    print(f"{answer} on {device.label} with {describe_weights(cfg.method, cfg.weight_bits, cfg.dtype)} (needs "
          f"{verdict.total_bytes / 2**30:.2f} GiB of "
          f"{device.capacity_bytes / 2**30:.2f}); largest batch that fits at seq {cfg.seq_len}: "
          f"{verdict.max_batch_size}" + (" pairs (two sequences each; DPO's reference log-probs are precomputed, "
                                         "no reference model)" if cfg.objective != "sft" else ""))
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

    from gnlorp.memory import fit

    several = dataclasses.replace(cfg, layerwise=False)  # layer-wise steps are one process's (their hooks fire
    # before gradients are all-reduced or reduce-scattered)
    fits = {"one": fit(cfg, device), "ddp": fit(dataclasses.replace(several, fsdp=False), device, gpus),
            "fsdp": fit(dataclasses.replace(several, fsdp=True), device, gpus)}
    if as_json:
        print(strict_json({"gpus": gpus, "device": device.name,
                          **{name: _fit_json(f) for name, f in fits.items() if name != "one"}}))
        return 0
    headers = {"one": "1 GPU", "ddp": f"DDP x{gpus}", "fsdp": f"FSDP x{gpus}"}
    _print_fits("GiB per GPU", headers, fits, trainable=False)
    print(f"on {device.label}, batch {cfg.batch_size} x {cfg.seq_len} tokens per GPU (a global batch of "
          f"{cfg.batch_size * gpus} on {gpus}); the CUDA context is in 'fits', not in the table")
    if cfg.layerwise:
        print("layer-wise steps run in one process only: the DDP and FSDP columns are without them")
    return 0


def add_plan(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "plan", help="find the fastest settings of a run that fit a device, and write them as a config",
        description="Search the memory-saving settings (optimizer bits, projector dtype, weight dtype, layer-wise "
        "steps, activation checkpointing, the chunked loss, micro-batch and accumulation at the same tokens per "
        "step; the rank and the sequences per step too unless given) with the estimator, and print the fastest run "
        "that fits, with weights as loaded if any does, else int8, else (adapters) NF4. Exit 2 when nothing fits, "
        "with what comes closest.",
    )
    parser.add_argument("--config", help="a YAML run config to start from (its data, lr, steps are kept)")
    parser.add_argument("--device", default="this-machine",
                        help=f"{DEVICES} or this-machine")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: fits, config, predicted_peak_bytes, device_bytes, parts")
    parser.add_argument("--write-config", metavar="FILE", help="write the planned run as YAML for train --config")
    add_config_arguments(parser, ["model", "task", "method", "rank", "batch_size", "seq_len", "grad_accum",
                                  "targets", "proj_type"])
    parser.set_defaults(run=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:

    cfg = config_from_args(args)
    if args.write_config and Path(args.write_config).exists():
        raise ConfigError(f"{args.write_config} already exists; choose another --write-config file")
    from gnlorp.memory import describe_weights, plan

    chosen_here = args.config is None  # a config's rank and sequences are the user's; without one, the planner's
    result = plan(cfg, args.device, search_rank=args.rank is None and chosen_here,
                  search_sequences=args.batch_size is None and chosen_here)
    gib = 2**30
    if args.json:
        print(strict_json(result.to_json()))
    else:
        chosen = result.config
        print(f"{'fits' if result.fits else 'nothing fits'} on {result.device.label}: {chosen.method} rank "
              f"{chosen.rank}, {describe_weights(chosen.method, chosen.weight_bits, chosen.dtype)}, needs "
              f"{result.predicted_peak_bytes / gib:.2f} of {result.budget_bytes / gib:.2f} GiB "
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
    from gnlorp.memory import describe_weights

    on = [name for name in ("layerwise", "grad_checkpointing", "chunked_loss") if getattr(cfg, name)]
    return (f"{cfg.optim_bits}-bit states, {cfg.proj_dtype} projectors, "
            f"{describe_weights(cfg.method, cfg.weight_bits, cfg.dtype)}, batch "
            f"{cfg.batch_size} x {cfg.grad_accum}" + "".join(f", {name}" for name in on))


def _count(number: int) -> str:
    """A parameter count short enough for a table column, to four digits: 8.030 B, 134.5 M, 49.66 k."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if number >= size:
            return f"{number / size:.4g} {unit}"
    return str(number)
