"""The dataset preview's training view: what a causal-lm run would train on, computed exactly as `gnlorp train` and
`gnlorp data` compute it (prepare_data + describe with the form's config and the model's tokenizer), with the
tokens that carry the loss highlighted, so a person sees the effect of Train on, the chat template, packing and
the sequence length before paying for a run.
"""

from __future__ import annotations

import functools
from typing import Any

from gnlorp.config import RunConfig
from gnlorp.data import describe, prepare_data, summary_line, trained_pieces
from gnlorp.models import load_tokenizer

from .widgets import form_fields, group_of

SHOWN_ROWS = 3  # training rows rendered with their trained tokens highlighted
TRAINED = "trained"  # the HighlightedText label of tokens that carry the loss; context has none
COLOR_MAP = {TRAINED: "#34a853"}
# The form fields whose change changes what training would see (the preview recomputes on each): a few basic
# ones and every knob of RunConfig's "data" group, so a new data knob is followed without a change here.
FIELDS = ("model", "data", "task", "seq_len", "seed", "trust_remote_code",
          *(f.name for f in form_fields() if group_of(f) == "data"))


@functools.lru_cache(maxsize=4)
def tokenizer_for(model: str, trust_remote_code: bool) -> Any:
    """The model's tokenizer, loaded once per model (the preview follows every keystroke of the form)."""
    return load_tokenizer(model, trust_remote_code=trust_remote_code)


def training_view(cfg: RunConfig) -> tuple[str, list[str], list[list[tuple[str, str | None]]]]:
    """The summary line, the warnings and the first training rows as (text, TRAINED or None) stretches.

    cfg must hold checked paths (Studio.check_inputs); a ConfigError says in one line why nothing would train.
    """
    tokenizer = tokenizer_for(cfg.model, cfg.trust_remote_code)
    described = describe(prepare_data(cfg, tokenizer), SHOWN_ROWS)
    rows = [[(text, TRAINED if trained else None)
             for text, trained in trained_pieces(tokenizer, row["input_ids"], row["labels"])]
            for row in described["preview"]]
    return summary_line(described), list(described["warnings"]), rows
