"""RunConfig: every knob of a run in one dataclass, the single source for the CLI flags, the YAML and the studio.

Each field carries its help text and its allowed values or range in `metadata`; `validate` checks them
generically, so a knob is described once and never re-described by a widget or a flag.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .atomic import write_text_atomic

METHOD_NAMES = ("full", "lora", "dora", "vera", "galore", "gradnormlorp")
ADAPTER_METHODS = ("lora", "dora", "vera")  # the ones that train on a frozen base
TASKS = ("causal-lm", "seq-cls")
DATA_FORMATS = ("auto", "text", "prompt-response", "alpaca", "messages", "sharegpt", "preference")
OBJECTIVES = ("sft", "dpo", "orpo", "simpo")


class ConfigError(ValueError):
    """A bad setting; the message is one line that says what is wrong and how to fix it."""


def knob(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
         max: float | None = None, group: str = "basic") -> Any:
    """A config field with what the CLI, the YAML and the studio need to show and check it."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": min, "max": max, "group": group})


@dataclass
class RunConfig:
    model: str = knob("tiny", "A preset (tiny, llama-60m … llama-7b from random init; minilm, smollm2 pretrained, "
                              "from their pip packages), a local Hugging Face model folder, or a Hub id "
                              "ORG/NAME[@REVISION] (fetched once into the Hugging Face cache; the run records the "
                              "commit it trained).")
    data: str = knob("presets/data/fortunes.jsonl",
                     "A .jsonl, .json, .csv, .tsv, .parquet or .txt file, a `datasets` save_to_disk folder, or a "
                     "Hugging Face Hub dataset ORG/NAME[@REVISION][:SPLIT] (read with `datasets`, cached as it "
                     "caches).")
    task: str = knob("causal-lm", "causal-lm: next-token prediction; seq-cls: classify each text.", choices=TASKS)
    method: str = knob("gradnormlorp", "What trains and how its optimizer state is kept.", choices=METHOD_NAMES)
    objective: str = knob("sft", "What the loss rewards: sft = the next token of the data; dpo, orpo, simpo = "
                          "preference tuning on prompt/chosen/rejected pairs (DPO against the starting model's "
                          "log-probabilities, computed once before step 0; ORPO and SimPO need no reference).",
                          choices=OBJECTIVES)
    beta: float = knob(0.1, "DPO and SimPO: the scale β of the implicit reward (DPO's paper uses 0.1; SimPO's 2 to "
                       "10).", min=1e-6, max=100.0)
    simpo_gamma: float = knob(0.5, "SimPO: the target reward margin γ.", min=0.0, max=100.0, group="advanced")
    orpo_lambda: float = knob(0.1, "ORPO: the weight λ of the odds-ratio term beside the SFT loss on the chosen "
                              "answer.", min=0.0, max=100.0, group="advanced")
    rank: int = knob(8, "Rank r of the adapter or of the gradient projection.", min=1, max=65536)
    optim_bits: int = knob(8, "Adam moments in 32-bit, or 8- or 4-bit blockwise quantized form.", choices=(32, 8, 4))
    weight_bits: int = knob(16, "Weights in memory: 16 = as loaded (dtype). lora, dora, vera: 8 = a frozen "
                            "bitsandbytes int8 base, 4 = NF4, double-quantized (QLoRA). full, galore, gradnormlorp: "
                            "8 = the trained attention and MLP weights held in int8 with a scale per 256 weights, "
                            "updated with stochastic rounding (Q-GaLore). Embeddings, norms, the head and adapters "
                            "stay in dtype.", choices=(16, 8, 4))
    weight_rounding: str = knob("stochastic", "How an update is rounded back into int8 trained weights "
                                "(weight_bits 8 with full, galore, gradnormlorp): stochastic keeps updates smaller "
                                "than a quantization step on average; nearest loses them (a control).",
                                choices=("stochastic", "nearest"), group="advanced")
    output: str = knob("runs/latest", "Run folder to write (config, metrics, checkpoints, weights).")
    max_steps: int = knob(100, "Optimizer steps to train.", min=1, max=10**9)
    batch_size: int = knob(8, "Sequences per micro-batch.", min=1, max=65536)
    seq_len: int = knob(128, "Tokens per sequence (longer texts are cut, shorter ones padded).", min=8, max=1 << 20)
    lr: float = knob(1e-3, "Peak learning rate.", min=0.0, max=10.0)
    seed: int = knob(0, "Seed for initialisation, data order and the held-out split.", min=0, max=2**32 - 1)
    data_config: str = knob("", "A Hub dataset's configuration (subset) name, as `datasets.load_dataset` takes it "
                            "(empty = its default).", group="data")
    text_column: str = knob("text", "Column holding the text.", group="data")
    prompt_column: str = knob("prompt", "Column holding the prompt (with response_column: loss on the response only).",
                              group="data")
    response_column: str = knob("response", "Column holding the response.", group="data")
    label_column: str = knob("label", "Column holding the class label (seq-cls).", group="data")
    data_format: str = knob("auto", "Layout of the records: auto detects it from the columns (prompt+chosen+rejected: "
                            "preference pairs, then messages, conversations, instruction+output, prompt+response, "
                            "else text).", choices=DATA_FORMATS, group="data")
    train_on: str = knob("assistant", "Chat formats: which tokens carry the loss: every assistant turn (its text and "
                         "end-of-turn marker), only the last one, or all tokens.",
                         choices=("assistant", "last", "all"), group="data")
    chat_template: str = knob("", "Chat formats: a Jinja chat template file to render conversations with (empty = "
                              "the tokenizer's own, or ChatML where it has none).", group="data")
    packing: bool = knob(True, "Put several prompt-response or chat examples in each sequence (their position ids "
                         "restart and no attention crosses between them), so little compute goes to padding; "
                         "pre-training text is one stream cut into full sequences either way.", group="data")
    eval_fraction: float = knob(0.1, "Share of the data held out for evaluation.", min=0.0, max=0.5, group="data")
    warmup_steps: int = knob(10, "Linear warm-up steps before the cosine decay.", min=0, max=10**9, group="advanced")
    grad_accum: int = knob(1, "Micro-batches per optimizer step.", min=1, max=4096, group="advanced")
    max_grad_norm: float = knob(1.0, "Clip the global gradient norm to this (0 = off).", min=0.0, max=1e6,
                                group="advanced")
    weight_decay: float = knob(0.0, "Decoupled weight decay.", min=0.0, max=1.0, group="advanced")
    update_proj_gap: int = knob(200, "Steps between projector refreshes (galore, gradnormlorp).", min=1,
                                max=10**9, group="advanced")
    scale: float = knob(0.25, "Scale α of the back-projected update (galore, gradnormlorp).", min=1e-6, max=100.0,
                        group="advanced")
    proj_type: str = knob("std", "Which side the gradient is projected on.",
                          choices=("std", "reverse_std", "left", "right"), group="advanced")
    proj_dtype: str = knob("auto", "How projectors are stored (galore, gradnormlorp): auto = float32 with 32-bit "
                           "states, bfloat16 with 8-bit; int8 = blockwise 8-bit codes, half of bfloat16's bytes.",
                           choices=("auto", "float32", "bfloat16", "int8"), group="advanced")
    stagger_refresh: bool = knob(True, "Spread projector refreshes over the update_proj_gap window, one matrix at "
                                 "its own step, so no step pays for every SVD (galore, gradnormlorp).",
                                 group="advanced")
    adaptive_refresh: bool = knob(False, "Refresh a matrix's projector less often while its subspace stays put: its "
                                  "gap doubles (up to 8x update_proj_gap) when at least 30% of the old subspace is in "
                                  "the new one, and returns to update_proj_gap when less is (galore, gradnormlorp).",
                                  group="advanced")
    svd: str = knob("exact", "How a refresh finds each gradient's top singular vectors (galore, gradnormlorp): exact "
                    "(LAPACK/cuSOLVER), or randomized (a range finder with r+8 directions and 2 power iterations: "
                    "faster on large matrices, approximate).", choices=("exact", "randomized"), group="advanced")
    lora_alpha: float = knob(16.0, "LoRA/DoRA scaling α (the update is scaled by α/r).", min=1e-6, max=1e6,
                             group="advanced")
    vera_d_initial: float = knob(0.1, "VeRA: initial value of the d vectors.", min=0.0, max=10.0, group="advanced")
    targets: str = knob("auto", "Comma-separated module names to adapt or project; auto = attention and MLP linears.",
                        group="advanced")
    grad_checkpointing: bool = knob(False, "Recompute activations in backward to save memory.", group="advanced")
    layerwise: bool = knob(False, "Step each weight in its gradient hook so full gradients never coexist.",
                           group="advanced")
    fsdp: bool = knob(False, "Shard weights, gradients and optimizer states over the processes (FSDP2): start "
                      "with torchrun --nproc_per_node N -m gnlorp train ... or accelerate launch.", group="advanced")
    chunked_loss: bool = knob(False, "Compute the head and the loss over chunks of tokens, again in backward, so "
                              "whole-batch logits never exist (causal-lm; a third head matmul).", group="advanced")
    dtype: str = knob("float32", "Weight dtype (bfloat16 autocast is used on CUDA either way).",
                      choices=("float32", "bfloat16"), group="advanced")
    eval_every: int = knob(50, "Evaluate every N steps (and at the end).", min=1, max=10**9, group="advanced")
    sample_every: int = knob(0, "Causal LMs: every N steps (and at step 0 and the end) write the model's greedy "
                             "answers to the sample prompts into samples.jsonl (0 = off; skipped, with a warning, "
                             "under fsdp).", min=0, max=10**9, group="advanced")
    sample_prompts: str = knob("", "What to sample: a file with one prompt (or one JSON list of chat messages) a "
                               "line, or the prompts themselves, one a line; empty = a few prompts from the "
                               "held-out data.", group="advanced")
    sample_tokens: int = knob(32, "New tokens per sample (greedy).", min=1, max=4096, group="advanced")
    checkpoint_every: int = knob(50, "Save a checkpoint every N steps (and at the end).", min=1, max=10**9,
                                 group="advanced")
    report_to: str = knob("none", "Also write the metrics as TensorBoard event files in the run folder's "
                          "tensorboard/ (view them with `tensorboard --logdir RUN/tensorboard`); needs "
                          "pip install 'gnlorp[tensorboard]'.", choices=("none", "tensorboard"), group="advanced")
    trust_remote_code: bool = knob(False, "Run model code shipped inside a model folder. Only for folders you trust.",
                                   group="advanced")

    @property
    def base_bits(self) -> int:
        """Bits of the frozen bitsandbytes base an adapter trains on (16: none, the model loads as it is)."""
        return self.weight_bits if self.method in ADAPTER_METHODS else 16

    @property
    def int8_trained(self) -> bool:
        """Whether the trained weights themselves are held in int8 (full, galore, gradnormlorp at weight_bits 8)."""
        return self.weight_bits == 8 and self.method not in ADAPTER_METHODS

    def validate(self) -> RunConfig:
        """Check every field against its metadata and the fields against each other; return self."""
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            expected = type(f.default)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(f"{f.name} must be a {expected.__name__}, got {value!r}")
            if meta["choices"] and value not in meta["choices"]:
                valid = ", ".join(str(c) for c in meta["choices"])
                raise ConfigError(f"{f.name} must be one of: {valid} (got {value!r})")
            if meta["min"] is not None and value < meta["min"]:
                raise ConfigError(f"{f.name} must be at least {meta['min']}, got {value}")
            if meta["max"] is not None and value > meta["max"]:
                raise ConfigError(f"{f.name} must be at most {meta['max']}, got {value}")
        if self.layerwise and self.grad_accum > 1:
            raise ConfigError("layerwise cannot be combined with grad_accum > 1: set one of them off")
        if self.layerwise and self.max_grad_norm > 0:
            raise ConfigError("layerwise cannot clip the global gradient norm: set max_grad_norm to 0")
        if self.layerwise and self.fsdp:
            raise ConfigError("layerwise cannot run with fsdp (a sharded gradient arrives after its hook has fired): "
                              "set one of them off")
        if self.chunked_loss and self.task != "causal-lm":
            raise ConfigError("chunked_loss applies to causal-lm only (a classifier's logits are small): set it off")
        if self.task == "seq-cls" and self.data_format not in ("auto", "text"):
            raise ConfigError(f"data_format {self.data_format} applies to causal-lm; seq-cls reads text and label "
                              "columns: set data_format to auto")
        if self.layerwise and self.method not in ("full", "galore", "gradnormlorp"):
            raise ConfigError(f"layerwise applies to full, galore and gradnormlorp, not {self.method}")
        if self.objective != "sft" and self.task != "causal-lm":
            raise ConfigError(f"objective {self.objective} trains a causal-lm on preference pairs: use --task "
                              "causal-lm")
        self._validate_weight_bits()
        return self

    def _validate_weight_bits(self) -> None:
        """Adapters sit on a frozen bitsandbytes base (QLoRA); full, galore and gradnormlorp train int8 weights."""
        if self.weight_bits == 16:
            return
        if self.method not in ADAPTER_METHODS:
            if self.weight_bits == 4:
                raise ConfigError(f"{self.method} trains its weights, and 4-bit trained weights are not supported "
                                  "yet: use --weight-bits 8 (int8 with stochastic rounding), or an adapter method "
                                  "(lora, dora, vera) over a 4-bit base")
            if self.fsdp:
                raise ConfigError("fsdp cannot shard int8 trained weights yet (their scales would have to shard with "
                                  "them): use --weight-bits 16 with --fsdp, or train int8 weights in one process")
            return
        if self.method == "dora" and self.weight_bits == 8:  # peft 0.21.2 with bitsandbytes 0.50.2, measured on CPU
            raise ConfigError("dora cannot train over an int8 base yet (its weight norm drops the int8 row scales "
                              "after the first step): use --weight-bits 4 with dora, or lora with --weight-bits 8")
        if self.fsdp:
            raise ConfigError(f"fsdp cannot shard a bitsandbytes {self.weight_bits}-bit base (its quantization "
                              "state is lost in the shards): use --weight-bits 16 to shard, or train the quantized "
                              "base in one process without --fsdp")

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Write the resolved config atomically (temp file, then rename)."""
        write_text_atomic(Path(path), yaml.safe_dump(asdict(self), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> RunConfig:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}; check the path") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of setting: value")
        return cls.from_dict({**loaded, **overrides}, source=str(path))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "settings") -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r} in {source}; valid settings: {', '.join(sorted(known))}")
        return cls(**values).validate()


MULTI_LINE = frozenset({"sample_prompts"})  # text fields whose flag may repeat, each value one more line


class _JoinLines(argparse.Action):
    """A repeated --flag: its values become one text, one a line (how a multi-line text knob holds a list)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        before = getattr(namespace, self.dest)
        setattr(namespace, self.dest, values if before is None else f"{before}\n{values}")


def config_fields() -> list:
    """The dataclass fields, for anything that derives widgets or flags from them."""
    return list(fields(RunConfig))


def add_config_arguments(parser: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    """One --flag per RunConfig field (or the chosen ones); defaults stay None so a YAML value is kept unless given."""
    for f in config_fields():
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %: "30%" must stay text
        default = f.default if f.default is not MISSING else None
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name in MULTI_LINE:
            parser.add_argument(flag, action=_JoinLines, default=None, help=f"{help_text} Repeat the flag to give "
                                "several.", metavar="TEXT")
        else:
            parser.add_argument(flag, type=type(default), default=None, help=f"{help_text} (default: {default})",
                                metavar=type(default).__name__.upper())


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """--config YAML first, then every flag that was given on top of it."""
    overrides = {f.name: getattr(args, f.name) for f in config_fields()
                 if getattr(args, f.name, None) is not None}
    if getattr(args, "config", None):
        return RunConfig.from_yaml(args.config, **overrides)
    return RunConfig.from_dict(overrides, source="the command line")
