"""gnlorp: memory-efficient language-model training (GaLore, GradNormLoRP, LoRA family, full)."""

import os

# Nothing is ever fetched from a hub: set before transformers/peft import huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
