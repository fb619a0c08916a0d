"""Models: presets, local folders, Hugging Face Hub ids and packaged GGUF models as transformers models and
tokenizers, or on the meta device (config only) for estimates."""

from .hub import cached_folder, cached_models, gigabytes, parse_hub_id, pin
from .load import (
    describe_origin,
    download_bytes,
    is_random_init,
    load_model,
    load_tokenizer,
    meta_model,
    preset_names,
)

__all__ = ["cached_folder", "cached_models", "describe_origin", "download_bytes", "gigabytes", "is_random_init",
           "load_model", "load_tokenizer", "meta_model", "parse_hub_id", "pin", "preset_names"]
