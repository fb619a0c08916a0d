"""gnlorp: memory-efficient language-model training (GaLore, GradNormLoRP, LoRA family, full)."""

import logging
import os
import warnings

# No library fetches anything on its own (bitsandbytes would fetch a CPU kernel at import): set before
# transformers/peft import huggingface_hub, which reads it once. A model or dataset the user names by its Hub id is
# still fetched (gnlorp.models.hub), unless the user set HF_HUB_OFFLINE: GNLORP_HUB_DOWNLOADS says it was gnlorp.
if "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["GNLORP_HUB_DOWNLOADS"] = "1"


class _DropLine(logging.Filter):
    """Drops one library log line that concerns nothing gnlorp does."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# bitsandbytes (peft imports it) warns on every CPU with AVX512-BF16 that an optional 4-bit inference kernel
# is not installed; gnlorp never runs 4-bit inference, and the line would open every run's log and error output.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropLine("Failed to load CPU gemm_4bit_forward"))
# kernels (>= 0.19, which bitsandbytes imports) says it skips a hub check in offline mode, which gnlorp always sets:
# nothing the user asked for or can act on. Its other warnings still reach the user.
logging.getLogger("kernels._internals.hf_hub").addFilter(_DropLine("Skipping publisher trust check"))

# peft asks transformers 5 for `is_gradient_checkpointing` when it wraps a model, which warns that the name is going;
# the user can do nothing about it.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__version__ = "0.1.0"
