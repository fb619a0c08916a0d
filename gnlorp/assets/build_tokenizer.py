"""Build the byte-level BPE tokenizer shipped with gnlorp's presets (gnlorp/assets/tokenizer/).

Training text: the docstrings of the Python standard library's top-level modules (every
`<stdlib>/*.py`, read with `ast`, never imported) plus the Zen of Python decoded from `this.py`.
That text is part of CPython, distributed under the PSF License Agreement, so the tokenizer
trained on it can be shipped. It is English prose with code in it, which suits the English
text people train the `tiny` preset on.

The build is deterministic: the same Python version gives byte-identical files (the corpus is
read in sorted order, training is single-pass BPE with fixed settings). The Python version and
a SHA-256 of the corpus are written to SOURCE.md so a rebuild can be checked.

Run: python gnlorp/assets/build_tokenizer.py [--output DIR]
"""

from __future__ import annotations

import argparse
import ast
import codecs
import hashlib
import json
import os
import platform
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 4096
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "tokenizer"
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def zen_of_python(stdlib: Path) -> str:
    """The Zen, taken from this.py's rot13 string without importing it (importing prints it)."""
    tree = ast.parse((stdlib / "this.py").read_text(encoding="utf-8"))
    encoded = next(node.value.value for node in tree.body
                   if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant))
    return codecs.decode(encoded, "rot13")


def module_docstrings(path: Path) -> list[str]:
    """Docstrings of a module, its classes and functions, in a fixed (breadth-first) order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return []
    docs = (ast.get_docstring(node, clean=True) for node in ast.walk(tree) if isinstance(node, _DOC_NODES))
    return [doc for doc in docs if doc]


def corpus() -> list[str]:
    """All training texts, in sorted file order so the build is reproducible."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [zen_of_python(stdlib)]
    for path in sorted(stdlib.glob("*.py")):
        texts.extend(module_docstrings(path))
    return texts


def train(texts: list[str]) -> Tokenizer:
    """Byte-level BPE: every string round-trips, so no text ever maps to <unk>."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def transformers_files() -> dict[str, dict]:
    """What PreTrainedTokenizerFast needs beside tokenizer.json to load offline with the right specials."""
    specials = {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_input_names": [
                  "input_ids", "attention_mask"]}
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


def source_note(texts: list[str]) -> str:
    """Provenance: where the text came from, and the hash a rebuild must reproduce."""
    digest = hashlib.sha256("\n\n".join(texts).encode("utf-8")).hexdigest()
    return (
        "# gnlorp preset tokenizer\n\n"
        f"Byte-level BPE, vocabulary {VOCAB_SIZE}, special tokens {', '.join(SPECIAL_TOKENS)} (ids 0-3).\n"
        "Trained by `gnlorp/assets/build_tokenizer.py` on the docstrings of the Python standard library's\n"
        "top-level modules and the Zen of Python (CPython, PSF License Agreement).\n\n"
        f"- Python: {platform.python_version()}\n"
        f"- texts: {len(texts)}\n"
        f"- corpus sha256: {digest}\n"
    )


def build(output: Path) -> None:
    """Write tokenizer.json, the transformers configs and SOURCE.md into `output`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    texts = corpus()
    output.mkdir(parents=True, exist_ok=True)
    train(texts).save(str(output / "tokenizer.json"), pretty=False)
    for name, content in transformers_files().items():
        (output / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (output / "SOURCE.md").write_text(source_note(texts), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="folder to write (default: the one inside the package)")
    build(parser.parse_args().output)


if __name__ == "__main__":
    main()
