"""Data loading for tether's trainers: preference pairs (``tether.data.preference``) and text for
SFT (``tether.data.text``)."""

from .preference import (
    PackedPairs,
    PreferenceDataError,
    StepBatches,
    TruncationReport,
    check_rows,
    collate_pairs,
    epoch_batches,
    implicit_prompt,
    load_preference_rows,
    pack_pairs,
    read_raw_rows,
    sentiment_pairs,
    split_holdout,
    tokenize_pairs,
    truncate_pair,
)

__all__ = [
    "PackedPairs",
    "PreferenceDataError",
    "StepBatches",
    "TruncationReport",
    "check_rows",
    "collate_pairs",
    "epoch_batches",
    "implicit_prompt",
    "load_preference_rows",
    "pack_pairs",
    "read_raw_rows",
    "sentiment_pairs",
    "split_holdout",
    "tokenize_pairs",
    "truncate_pair",
]
