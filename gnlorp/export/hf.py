"""Export a run as a plain Hugging Face folder: merge the trained model, save, reload, check.

The folder must load with `AutoModelFor...from_pretrained` and compute what the run trained, so the
export proves it before it is put in place: the reloaded folder's logits are compared with the
trained (unmerged) model's on fixed probe inputs. Everything is written to a temp folder beside the
output and renamed into place only after that check, so a failed export leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ..atomic import atomic_dir
from ..config import ConfigError
from .report import TOLERANCE, ExportReport, check_output, load_trained, logits, read_run, written_files

AUTO_CLASSES = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification}


def export_hf(run_dir: str | Path, output_dir: str | Path, *, force: bool = False) -> ExportReport:
    """Merge the run's final weights into a model folder `output_dir`, verified by reloading it.

    Refuses a non-empty `output_dir` unless `force`, in which case the old folder is replaced only once the new one
    has passed the check.
    """
    run, output = Path(run_dir), Path(output_dir)
    cfg, weights = read_run(run)
    check_output(run, output, force)
    trained = load_trained(run, cfg, weights)
    with atomic_dir(output) as tmp:
        trained.merged.save_pretrained(tmp)
        trained.tokenizer.save_pretrained(tmp)
        trained.merged = None  # freed before the reload: the check holds one model in memory, not two
        reloaded = AUTO_CLASSES[cfg.task].from_pretrained(tmp, dtype=torch.float32, local_files_only=True,
                                                          trust_remote_code=cfg.trust_remote_code)
        reloaded_logits = logits(reloaded, trained.probe)
        diff = float((reloaded_logits - trained.expected).abs().max())
        # Merging rounds in fp32; deep models with large logits differ by more than 1e-4 absolute for that alone.
        allowed = TOLERANCE * max(1.0, float(trained.expected.abs().max()))
        if not diff <= allowed:
            raise ConfigError(f"export check failed: the saved model's logits differ from the trained "
                              f"model's by {diff:.3g} (> {allowed:.3g}); nothing was written to {output}")
        quantized = trained.check_quantized(reloaded_logits, output)
    return ExportReport(output, diff, written_files(output), trained.architecture, **quantized)
