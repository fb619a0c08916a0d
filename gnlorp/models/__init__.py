"""Models: presets, local folders and packaged GGUF models as transformers models and tokenizers, or on the meta
device (config only) for estimates."""

from .load import describe_origin, is_random_init, load_model, load_tokenizer, meta_model, preset_names

__all__ = ["describe_origin", "is_random_init", "load_model", "load_tokenizer", "meta_model", "preset_names"]
