"""What the HF and GGUF writers share: read a run, rebuild and merge its model, probe it, report what was written.

The model is rebuilt, merged and saved in float32: the trained weights upcast losslessly, and the merge adds no
rounding of its own, which is what makes a 1e-4 tolerance meaningful for any run dtype. The probe logits of the
trained (unmerged) model are what each writer checks its written files against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import verify
from ..config import ConfigError, RunConfig
from ..methods import get_method
from ..run_folder import base_model, load_run_tokenizer, load_weights, read_labels

TOLERANCE = 1e-4  # max |logit difference| between reload and trained model, per unit of the largest |logit| (≥ 1)
# A run over a quantized base is exported merged into the base at full precision (the usual QLoRA practice), so its
# logits differ from the model as trained by what quantizing the base changes, and that is large on small models
# (max |logit difference| on the probes, base alone: SmolLM2-135M NF4 18.9 of logits up to 34, int8 9.8; tiny NF4
# 0.25 of 1.1). A fixed share of the logits would pass anything or fail SmolLM2, so the check is relative: the
# export may differ from the model as trained by at most this many times the gap quantizing the base alone makes on
# the same probes (the adapters then add no error of their own), plus TOLERANCE.
QUANTIZED_TOLERANCE = 1.5
QUANTIZED_NAMES = {4: "NF4", 8: "int8"}
PROBE_BATCH, PROBE_LEN = 2, 32  # at most the run's seq_len, the positions it trained on


@dataclass
class ExportReport:
    """What was written and how closely the written files reproduce the trained model."""

    output: Path
    max_abs_logit_diff: float
    files: dict[str, int]  # file name -> bytes
    architecture: str
    format: str = "hf"
    tolerance: float = TOLERANCE  # the bound max_abs_logit_diff was checked against
    greedy_equal: int | None = None  # GGUF: greedy tokens equal to the trained model's, of greedy_total
    greedy_total: int | None = None
    texts_checked: int | None = None  # GGUF: sample texts the file's tokenizer splits as the run's does
    weight_bits: int = 16  # the base the run trained on; below 16 the two fields after it are set
    quantized_logit_diff: float | None = None  # max |logit difference| from the model as trained, quantized base
    quantization_gap: float | None = None  # the same between the base at full precision and quantized, no adapters
    quantized_tolerance: float | None = None  # allowed: this many times quantization_gap (plus TOLERANCE)

    def verdict(self) -> str:
        """One line for the CLI and the studio: what was written and how it was checked."""
        checked = (f"max |logit difference| {self.max_abs_logit_diff:.2e} (allowed: {self.tolerance:g} x the largest "
                   "|logit|, at least 1)")
        if self.format == "hf":
            line = f"exported {self.architecture} to {self.output}; reloaded from disk: {checked}"
        else:
            line = (f"exported {self.architecture} to {self.output} as GGUF; read back through transformers' GGUF "
                    f"loader: every weight within rounding, {checked}, {self.greedy_equal} of {self.greedy_total} "
                    f"greedy tokens equal, and its tokenizer splits {self.texts_checked} sample texts into the run's "
                    "ids")
        if self.weight_bits == 16:
            return line
        return (f"{line}; merged into the full-precision base, it differs from the model as trained on its "
                f"{QUANTIZED_NAMES[self.weight_bits]} base by max |logit difference| {self.quantized_logit_diff:.3g} "
                f"(quantizing the base alone: {self.quantization_gap:.3g}; allowed: {self.quantized_tolerance:g} x "
                "that)")


@dataclass
class TrainedModel:
    """A run's model merged into plain weights, with the trained (unmerged) model's logits on probe inputs."""

    merged: torch.nn.Module | None
    tokenizer: Any
    probe: dict[str, torch.Tensor]
    expected: torch.Tensor
    architecture: str
    weight_bits: int = 16
    as_trained: torch.Tensor | None = None  # over a quantized base: the probe logits of the model as trained
    quantization_gap: float = 0.0  # and max |logit difference| of the base alone, full precision vs quantized

    def check_quantized(self, reloaded: torch.Tensor, output: Path) -> dict:
        """How far the written model's logits are from the model as trained on its quantized base, checked against
        QUANTIZED_TOLERANCE; the report's fields for it (none for a 16-bit run)."""
        if self.as_trained is None:
            return {}
        diff = float((reloaded - self.as_trained).abs().max())
        allowed = QUANTIZED_TOLERANCE * self.quantization_gap + TOLERANCE * max(1.0, float(self.as_trained.abs().max()))
        if not diff <= allowed:
            raise ConfigError(f"export check failed: merged into the full-precision base, the model's logits differ "
                              f"from the model as trained on its {QUANTIZED_NAMES[self.weight_bits]} base by "
                              f"{diff:.3g}, more than {QUANTIZED_TOLERANCE:g} x the {self.quantization_gap:.3g} that "
                              f"quantizing the base alone makes; nothing was written to {output}")
        return {"weight_bits": self.weight_bits, "quantized_logit_diff": diff,
                "quantization_gap": self.quantization_gap, "quantized_tolerance": QUANTIZED_TOLERANCE}


def load_trained(run: Path, cfg: RunConfig, weights: Path) -> TrainedModel:
    """Rebuild the run's model in float32, load its final weights, take the probe logits, then merge.

    Over a quantized base, the trained tensors go onto the base at full precision, which is what gets merged and
    checked for exactness; the model as trained (quantized base) is rebuilt only for its probe logits.
    """
    labels = read_labels(run) if cfg.task == "seq-cls" else None
    tokenizer = load_run_tokenizer(run / "final", cfg)
    method = get_method(cfg.method)
    model = method.prepare(base_model(cfg, labels, full_precision=True), cfg)
    load_weights(model, weights, cfg)
    probe = _probe_inputs(model, tokenizer.pad_token_id, min(PROBE_LEN, cfg.seq_len), cfg.seed)
    expected = logits(model, probe)
    as_trained, gap = None, 0.0
    if cfg.base_bits != 16:  # int8 trained weights need no second model: `model` holds them as trained
        quantized = method.prepare(base_model(cfg, labels), cfg)
        load_weights(quantized, weights, cfg)
        as_trained = logits(quantized, probe)
        with model.disable_adapter(), quantized.disable_adapter():
            gap = float((logits(model, probe) - logits(quantized, probe)).abs().max())
        del quantized
    merged = method.merge(model)
    if labels is not None:
        merged.config.id2label = dict(enumerate(labels))
        merged.config.label2id = {name: i for i, name in enumerate(labels)}
    return TrainedModel(merged, tokenizer, probe, expected, type(merged).__name__, cfg.base_bits, as_trained,
                        gap)


def written_files(output: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(output.iterdir()) if p.is_file()}


def read_run(run: Path) -> tuple[RunConfig, Path]:
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run} has no config.yaml; give --run the folder a training run wrote")
    cfg = RunConfig.from_yaml(run / "config.yaml")
    weights = run / "final" / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{run} has no final weights ({weights.relative_to(run)}); let the run finish "
                          "or resume it, then export")
    verify(weights.parent, required=False)  # runs from before manifests have none; any other mismatch is refused
    return cfg, weights


def check_output(run: Path, output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output {output} is a file; give a folder path")
    if output.resolve() == run.resolve() or output.resolve() in run.resolve().parents:
        raise ConfigError(f"output {output} would replace the run folder {run}; choose another folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ConfigError(f"output {output} is not empty; choose another folder or add --force to replace it")


def _probe_inputs(model: torch.nn.Module, pad_id: int | None, length: int,
                  seed: int) -> dict[str, torch.Tensor]:
    """Fixed random token ids, the second row right-padded so the padding path is checked too."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (PROBE_BATCH, length), generator=generator)
    mask = torch.ones_like(ids)
    if pad_id is not None:
        ids[1, length // 2:] = pad_id
        mask[1, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**inputs).logits.float()
