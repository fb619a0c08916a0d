"""Data: read a file or folder of records, detect its columns, tokenize, split off the held-out part, and batch."""

from .records import IGNORE_INDEX, SUPPORTED, prepare_data, read_records, read_table, resolve_data_path

__all__ = ["IGNORE_INDEX", "SUPPORTED", "prepare_data", "read_records", "read_table", "resolve_data_path"]
