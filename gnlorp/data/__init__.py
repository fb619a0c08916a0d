"""Data: read a file, a folder or a Hub dataset of records, detect its columns, tokenize, split off the held-out
part, and batch."""

from .hub_data import parse_dataset_id
from .preview import describe, summary_line, trained_pieces
from .readers import SUPPORTED, resolve_data_path
from .records import IGNORE_INDEX, prepare_data, read_records, read_table

__all__ = ["IGNORE_INDEX", "SUPPORTED", "describe", "parse_dataset_id", "prepare_data", "read_records", "read_table",
           "resolve_data_path", "summary_line", "trained_pieces"]
