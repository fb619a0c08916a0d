"""A chat run is evaluated on the assistant's tokens only: its logged held-out loss equals the mean cross-entropy,
computed here with its final weights, over the assistant contents (and their `<|im_end|>`) of the held-out
conversations, found in hand-written ChatML through the tokenizer's offsets rather than from gnlorp's masks. And
the shipped chat set reads whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_model as load_safetensors

from gnlorp.config import RunConfig
from gnlorp.data.chat import CHATML
from gnlorp.data.records import prepare_data, split_records
from gnlorp.models.load import load_model, load_tokenizer
from gnlorp.run_folder import load_run_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "presets" / "data" / "chat.jsonl"
END = "<|im_end|>"
SEQ_LEN = 512


def chatml(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation in ChatML and the character spans of each assistant content with its end marker."""
    text, spans = "", []
    for message in messages:
        text += f"<|im_start|>{message['role']}\n"
        if message["role"] == "assistant":
            spans.append((len(text), len(text) + len(message["content"]) + len(END)))
        text += f"{message['content']}{END}\n"
    return text, spans


def assistant_loss(model: torch.nn.Module, tokenizer, conversations: list[list[dict]]) -> tuple[float, int]:
    """Mean next-token cross-entropy over the tokens that overlap an assistant span, and how many there were."""
    total, count = 0.0, 0
    for messages in conversations:
        text, spans = chatml(messages)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        assert len(ids) <= SEQ_LEN  # whole in the run too, so both sides see the same tokens
        trained = [any(start < b and end > a for a, b in spans) for start, end in encoded["offset_mapping"]]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        for t in range(1, len(ids)):
            if trained[t]:
                total -= float(logp[t - 1, ids[t]])
                count += 1
    return total / count, count


def test_logged_eval_loss_is_the_assistant_tokens_mean(tmp_path: Path) -> None:
    records = [json.loads(line) for line in CHAT.read_text(encoding="utf-8").splitlines()[:16]]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "gnlorp", "train", "--model", "tiny", "--data", str(data), "--max-steps", "2",
         "--eval-every", "1", "--eval-fraction", "0.25", "--batch-size", "4", "--seq-len", str(SEQ_LEN),
         "--warmup-steps", "1", "--lr", "0.01", "--output", str(run)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cfg = RunConfig.from_yaml(run / "config.yaml")
    assert cfg.packing  # the default: held-out conversations share rows, and must be scored as if alone
    logged = [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in row]
    assert [row["step"] for row in logged] == [1, 2]

    _, held = split_records(records, cfg.eval_fraction, cfg.seed, data)
    model = load_model("tiny", "causal-lm", dtype=torch.float32)
    load_safetensors(model, run / "final" / "model.safetensors")  # strict: every tensor must fit
    tokenizer = load_tokenizer("tiny")
    loss, count = assistant_loss(model.eval(), tokenizer, [r["messages"] for r in held])
    assert len(held) == 4 and count > 4 * 10
    assert abs(loss - logged[-1]["eval_loss"]) <= 1e-4 * loss
    assert logged[0]["eval_loss"] != logged[-1]["eval_loss"]  # the check would notice stale weights
    # the run keeps the template it rendered with, so trying the model renders a prompt the same way
    assert load_run_tokenizer(run / "final", cfg).chat_template == CHATML


def test_shipped_chat_set_reads_whole() -> None:
    cfg = RunConfig.from_yaml(ROOT / "presets" / "tiny-chat.yaml")
    lines = CHAT.read_text(encoding="utf-8").splitlines()
    data = prepare_data(cfg, load_tokenizer(cfg.model))
    report = data.report
    assert (report["format"], report["records"], report["skipped"]) == ("messages", len(lines), {})
    assert set(report["outcomes"]) <= {"kept", "shortened"} and report["examples"] == len(lines)
    assert data.eval and report["rows"] < report["examples"]  # packed: several conversations to a row
