"""The report's own numbers against independent references: VeRA's closed forms, DESIGN §3's byte count, and
the report runner naming a missing or failing script."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import lora_vera  # noqa: E402
import optimizer_memory  # noqa: E402
import report  # noqa: E402


@pytest.mark.parametrize(("rank", "lora_reported", "vera_reported"), [(64, 159.9e6, None), (1024, None, 1.6e6)])
def test_llama_7b_counts_from_peft_are_vera_papers_formulas(rank, lora_reported, vera_reported):
    # LLaMA-7B: 32 layers; q, k, v, o are 4096 x 4096, gate and up 11008 x 4096, down 4096 x 11008.
    layers, h, f = 32, 4096, 11008
    lora = lora_vera.count("llama-7b", "lora", rank)
    vera = lora_vera.count("llama-7b", "vera", rank)
    assert lora.trainable == layers * rank * (4 * 2 * h + 3 * (h + f))
    assert vera.trainable == layers * (4 * h + 2 * f + h + 7 * rank)
    assert vera.frozen_shared == rank * f + f * rank  # one shared A (r x largest d_in), B (largest d_out x r)
    # What the VeRA paper's Table 4 reports for LLaMA-7B (LoRA r=64: 159.9M, VeRA r=1024: 1.6M), to its rounding.
    if lora_reported:
        assert round(lora.trainable / 1e5) * 1e5 == lora_reported
    if vera_reported:
        assert round(vera.trainable / 1e5) * 1e5 == vera_reported


def test_roberta_large_glue_setting_is_the_papers_ten_times():
    lora, vera = lora_vera.count("roberta-large", "lora", 8), lora_vera.count("roberta-large", "vera", 256)
    assert lora.trainable == 24 * 2 * 8 * (1024 + 1024)  # the paper's 2 L d r with L = 48 query/value matrices
    assert vera.trainable == 24 * 2 * (1024 + 256)  # L (d + r)
    assert 10 < lora.trainable / vera.trainable < 13


def test_measured_tiny_gradnormlorp_8bit_state_is_design_formula():
    """One real step on the tiny model; bytes in optimizer.state against DESIGN §3 written out by hand."""
    from gnlorp.models.load import load_model

    cfg = optimizer_memory.config("tiny", "gradnormlorp", 8)
    measured = optimizer_memory.measure(cfg)

    def moment(numel: int) -> int:  # 8-bit codes plus one fp32 scale per 256; under 4096 values fp32 (bitsandbytes)
        return numel + 4 * -(-numel // 256) if numel >= 4096 else 4 * numel

    r, expected = cfg.rank, 0
    for name, p in load_model("tiny", "causal-lm").named_parameters():
        expected += 8  # the step counter, int64
        if name.endswith("_proj.weight"):  # a target: moments r x max(m, n), bf16 projector r x min(m, n), g and its
            m, n = p.shape  # two fp32 moments
            expected += 2 * moment(r * max(m, n)) + 2 * r * min(m, n) + 3 * 4 * m
        else:  # embeddings, head, norms: plain AdamW
            expected += 2 * moment(p.numel())
    assert measured == expected


def test_report_names_a_missing_and_a_failing_script(tmp_path):
    missing = report.Table("9", "nothing", "no_such_table.py")
    assert report.run(missing, quick=True, out=tmp_path) == "benchmarks/no_such_table.py is missing"
    failing = tmp_path / "fails.py"
    failing.write_text("import sys\nprint('boom')\nsys.exit(3)\n")
    why = report.run(report.Table("9", "fails", str(failing)), quick=True, out=tmp_path)
    assert "fails.py failed (exit 3)" in why
    assert "boom" in (tmp_path / "logs" / "fails.log").read_text()
