"""Samples during training: the model's greedy answers to a few fixed prompts, every N steps, in samples.jsonl.

A loss curve says that a model learns; its answers say what it learns. They come from the model as it is at that
step (adapters active; GradNormLoRP keeps ordinary weights, so there is nothing to fold), decoded greedily with the
KV cache and no gradients, and they leave training exactly as it was: the random states a run draws from (torch on
the CPU and every GPU, Python's, NumPy's) and every module's train/eval mode are put back afterwards. The data order
needs nothing: it is a function of the seed and the epoch (data/batches.py), not of a global generator.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, RunConfig
from ..data.examples import TokenizedData
from ..export.chat import check_messages, encode_messages, end_of_turn, until
from ..export.infer import encode_prompt

DEFAULT_PROMPTS = 3  # held-out openings sampled when no prompts are given
PATH_SUFFIXES = (".txt", ".jsonl", ".json")
# Generating under fsdp would need every rank's shards gathered: such a run trains on and says so once.
SKIPPED_WITH_FSDP = "no samples with --fsdp yet (generating would need every rank's shards): training goes on without"

Prompt = str | list[dict[str, str]]


def read_prompts(spec: str, held_out: list[Prompt]) -> list[Prompt]:
    """The prompts to sample: a file's lines or the text's own lines (a JSON list of messages is a conversation),
    else the first few held-out openings."""
    if not spec.strip():
        if not held_out:
            raise ConfigError("sample_every needs prompts and this data holds none out (eval_fraction 0); give "
                              "--sample-prompts or set --sample-every 0")
        return held_out[:DEFAULT_PROMPTS]
    lines, where = spec.splitlines(), "sample_prompts"
    if len(lines) == 1:
        path = Path(lines[0].strip()).expanduser()
        if path.is_file():
            try:
                lines, where = path.read_text(encoding="utf-8").splitlines(), str(path)
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or "not UTF-8 text"
                raise ConfigError(f"cannot read sample prompts {path} ({reason}); check the file") from None
        elif path.suffix in PATH_SUFFIXES and " " not in lines[0].strip():
            raise ConfigError(f"sample prompts file {path} does not exist; check the path, or give the prompts "
                              "themselves")
    prompts = [_prompt(line, f"{where} line {i}") for i, line in enumerate(lines, start=1) if line.strip()]
    if not prompts:
        raise ConfigError(f"{where} holds no prompt; write one a line, or leave sample_prompts empty")
    return prompts


def _prompt(line: str, where: str) -> Prompt:
    text = line.strip()
    if not text.startswith("["):
        return text
    try:
        messages = json.loads(text)
    except ValueError:
        return text  # a prompt that starts with a bracket
    try:
        return check_messages(messages)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


@contextmanager
def untouched(model: torch.nn.Module) -> Iterator[None]:
    """Run the body in eval mode without gradients, then restore every random state and module mode it may change."""
    modes = [(module, module.training) for module in model.modules()]
    python, numpy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training
        random.setstate(python)
        np.random.set_state(numpy)


def skipped_with_fsdp(cfg: RunConfig) -> bool:
    """A run that asks for samples under fsdp: it trains without them and says so once (SKIPPED_WITH_FSDP)."""
    return bool(cfg.sample_every) and cfg.task == "causal-lm" and cfg.fsdp


class Sampler:
    """The prompts of a run, encoded once, and the greedy answers of the model to them at a step."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, prompts: list[Prompt], chat: bool, tokens: int):
        self.model, self.tokenizer, self.prompts, self.tokens = model, tokenizer, prompts, tokens
        device = next(model.parameters()).device
        self.inputs = [{k: v.to(device) for k, v in encode_messages(tokenizer, p).items()} if isinstance(p, list)
                       else encode_prompt(tokenizer, p, chat, device)[0] for p in prompts]
        self.marker = end_of_turn(tokenizer) if chat or any(isinstance(p, list) for p in prompts) else None

    @classmethod
    def for_run(cls, cfg: RunConfig, model: torch.nn.Module, tokenizer: Any, data: TokenizedData) -> Sampler | None:
        """The run's sampler, or None when it samples nothing (sample_every 0, a classifier, or fsdp)."""
        if not cfg.sample_every or cfg.task != "causal-lm" or skipped_with_fsdp(cfg):
            return None
        chat = data.chat_template is not None  # conversations and templated prompt/response: answer as a user turn
        return cls(model, tokenizer, read_prompts(cfg.sample_prompts, data.prompts), chat, cfg.sample_tokens)

    def sample(self, step: int) -> list[dict[str, Any]]:
        """One samples.jsonl record per prompt: `step`, `prompt`, `text` (the greedy continuation)."""
        with untouched(self.model):
            return [{"step": step, "prompt": prompt, "text": self._answer(inputs)}
                    for prompt, inputs in zip(self.prompts, self.inputs, strict=True)]

    def _answer(self, inputs: dict[str, torch.Tensor]) -> str:
        stop = {"stop_strings": [self.marker], "tokenizer": self.tokenizer} if self.marker else {}
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.tokens, use_cache=True,
                                  pad_token_id=self.tokenizer.pad_token_id, **stop)
        text = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return "".join(until(iter([text]), self.marker)) if self.marker else text
