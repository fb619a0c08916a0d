"""`gnlorp eval`: a run's trained model and its starting point side by side, written to the run's eval.json.

Both are rebuilt the way try and export rebuild them (load_for_try: the base from config.yaml, the method's
`prepare`, the trained tensors, merged in float32; or the base alone before training), so the figures are the
models a person would export and compare. The data is tokenized exactly as training tokenized it: the run's own
held-out part by default (the same seeded split), or every record of --data.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig


def evaluate_run(run: str | Path, data: str | None = None, choices: str | None = None) -> dict[str, Any]:
    """eval.json's record for a run folder (also written there): held-out loss, perplexity, a classifier's accuracy
    and, with `choices`, multiple-choice accuracy, for the trained model and (under `base`) its starting point."""
    from ..train.evaluate import read_choices, write_eval
    from .infer import inspect_source, load_for_try

    source = inspect_source(run)
    if source.kind != "run":
        raise ConfigError(f"{source.path} is a model folder; eval takes a run folder (from `gnlorp train`), which "
                          "records its base model and data")
    cfg = source.cfg
    questions = read_choices(choices) if choices else None  # a bad file is refused before anything loads
    if questions and cfg.task != "causal-lm":
        raise ConfigError(f"--choices scores a language model's likelihoods; {source.path} is a {cfg.task} run")
    examples = _examples(cfg, source.path, data)
    record: dict[str, Any] = {"data": data or "held-out", "examples": len(examples), "step": _step(source.weights)}
    if questions:
        record |= {"choices_file": str(choices), "questions": len(questions)}
    base = load_for_try(source.path, base=True)  # first: a DPO run's reference is its starting model
    if cfg.objective == "dpo":
        _attach_reference(base, cfg, examples)
    base_figures = _figures(base, cfg, examples, questions)
    del base
    record |= _figures(load_for_try(source.path), cfg, examples, questions)
    record["base"] = base_figures
    write_eval(source.path, record)
    return record


def _attach_reference(loaded, cfg: RunConfig, pairs: list) -> None:
    """DPO's reference log-probabilities of `pairs`, from the starting model: what the run trained against."""
    from tqdm import tqdm

    from ..train.preference import attach_reference, compute_reference

    with tqdm(total=len(pairs), disable=True) as progress:
        attach_reference(pairs, compute_reference(loaded.model, pairs, cfg.batch_size, loaded.tokenizer.pad_token_id,
                                                  loaded.model.device, progress))


def _examples(cfg: RunConfig, run: Path, data: str | None) -> list:
    """The examples to score, tokenized as the run was: its held-out part, or all of `data`."""
    from ..data import prepare_data
    from ..models.load import load_tokenizer
    from ..run_folder import read_labels

    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if data is None:
        prepared = prepare_data(cfg, tokenizer)
        examples = prepared.eval
        if not examples:
            raise ConfigError(f"{run} held nothing out (eval_fraction 0); give --data FILE to evaluate on")
    else:
        prepared = prepare_data(dataclasses.replace(cfg, data=data, eval_fraction=0.0), tokenizer)
        examples = prepared.train
    if cfg.task == "seq-cls" and prepared.label_names != read_labels(run):
        raise ConfigError(f"{data} has the classes {prepared.label_names}, the run was trained on "
                          f"{read_labels(run)}; give data with the run's classes")
    return examples


def _figures(loaded, cfg: RunConfig, examples: list, questions: list | None) -> dict[str, Any]:
    from ..train.evaluate import choice_accuracy, figures, held_out
    from ..train.loss import loss_function

    model = loaded.model
    if cfg.objective != "sft":  # preference pairs: the objective's loss and how often chosen beats rejected
        from ..train.preference import PreferenceObjective

        loss, rewards = PreferenceObjective(cfg, model).held_out(examples, cfg.batch_size,
                                                                 loaded.tokenizer.pad_token_id, model.device)
        return {"loss": loss} | {key.removeprefix("eval_"): value for key, value in rewards.items()}
    loss, accuracy = held_out(model, loss_function(model, model, False), examples, cfg,
                              loaded.tokenizer.pad_token_id, model.device)
    result = figures(loss, accuracy)
    if questions:
        result |= choice_accuracy(model, loaded.tokenizer, questions)
    return result


def _step(weights: Path) -> int | None:
    """The step the evaluated weights were saved at (final/ or a checkpoint), from their manifest."""
    try:
        return json.loads((weights.parent / "manifest.json").read_text(encoding="utf-8"))["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def comparison(record: dict[str, Any]) -> list[str]:
    """The figures as lines a person reads: each one trained against base."""
    base = record.get("base", {})
    lines = []
    for key in ("loss", "perplexity", "accuracy", "choices_accuracy", "choices_accuracy_norm", "reward_accuracy",
                "reward_margin"):
        if key in record:
            lines.append(f"{key:<22} {record[key]:>12.4f}   base {base.get(key, float('nan')):>12.4f}")
    return lines
