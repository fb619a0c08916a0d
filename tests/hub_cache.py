"""A Hugging Face cache on disk, laid out as huggingface_hub writes it, for tests that name models by their Hub id.

`REPO/blobs/SHA256` holds each file's bytes, `REPO/snapshots/COMMIT/NAME` links to its blob and `REPO/refs/BRANCH`
names the commit, as huggingface_hub's downloads leave them; nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gnlorp.models.load import load_tokenizer


def add_snapshot(cache: Path, repo: str, files: dict[str, bytes], commit: str, *, kind: str = "models",
                 ref: str | None = "main") -> Path:
    """Put `files` into the cache as the snapshot `commit` of `repo`; `ref` (a branch) points at it."""
    root = cache / f"{kind}--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snapshot


def tiny_model_files(folder: Path, seed: int) -> dict[str, bytes]:
    """A two-layer LLaMA with the shipped tokenizer, saved as a model repository holds it (safetensors)."""
    tokenizer = load_tokenizer("tiny")
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def text_dataset_files(count: int = 40) -> dict[str, bytes]:
    """A dataset repository with one JSON-lines training file."""
    lines = [json.dumps({"text": f"Line {i}: simple is better than complex."}) for i in range(count)]
    return {"train.jsonl": "\n".join(lines).encode()}
