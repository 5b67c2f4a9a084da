"""Data loading for tether's trainers (preference pairs; see ``tether.data.preference``)."""

from .preference import (
    PreferenceDataError,
    TruncationReport,
    check_rows,
    collate_pairs,
    implicit_prompt,
    load_preference_rows,
    read_raw_rows,
    tokenize_pairs,
    truncate_pair,
)

__all__ = [
    "PreferenceDataError", "TruncationReport", "check_rows", "collate_pairs", "implicit_prompt",
    "load_preference_rows", "read_raw_rows", "tokenize_pairs", "truncate_pair",
]
