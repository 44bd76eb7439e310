"""The reject policy: which input rows cannot be embedded, and why.

Reasons, in the order they are checked: null id, null text, invalid utf-8, empty text (empty
or whitespace only), duplicate id. An id belongs to the first row, in input order, that has it and can be
embedded; ids already stored in the output folder by earlier runs come before all of them.
Duplicates are found in one pass over the ids before any unit is embedded (registry.py:
scan_input), so units can then be embedded independently (in threads here, on other machines
with Ray) with the same result.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


NULL_ID, NULL_TEXT, EMPTY_TEXT, DUPLICATE_ID = "null id", "null text", "empty text", "duplicate id"
INVALID_UTF8 = "invalid utf-8"
NULL_PAIR_TEXT, EMPTY_PAIR_TEXT = "null pair text", "empty pair text"
_BINARY_VIEWS = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}


def plain_texts(texts: pa.Array) -> pa.Array:
    """A text column as plain strings: dictionary-encoded columns decoded."""
    return texts.dictionary_decode() if pa.types.is_dictionary(texts.type) else texts


def invalid_utf8(texts: pa.Array) -> np.ndarray | None:
    """Which rows hold bytes that are not UTF-8 (Parquet does not check them on write or read);
    None when every row is valid, the common case, found without a per-row pass."""
    try:
        texts.validate(full=True)
        return None
    except pa.ArrowInvalid:
        pass
    raw = texts.cast(pa.string_view()).cast(pa.binary_view()) if texts.type not in _BINARY_VIEWS \
        else texts.view(_BINARY_VIEWS[texts.type])
    return np.array([value is not None and not _decodes(value) for value in raw.to_pylist()])


def readable_texts(texts: pa.Array) -> pa.Array:
    """Plain strings with the rows that are not UTF-8 made null (for texts that are skipped, not
    rejected: queries, texts to classify)."""
    texts = plain_texts(texts)
    bad = invalid_utf8(texts)
    return texts if bad is None else pc.if_else(pa.array(bad), pa.scalar(None, texts.type), texts)


def _decodes(value: bytes) -> bool:
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def blank_texts(texts: pa.Array) -> pa.BooleanArray:
    """Empty or white space only (Unicode White_Space), per row; false for nulls. The one rule for
    blank text everywhere: runs, queries, texts to classify, the bench."""
    return pc.fill_null(pc.equal(pc.utf8_trim_whitespace(texts), ""), False)


def _text_reasons(texts: pa.Array, null: str, empty: str) -> list[str | None]:
    texts = plain_texts(texts)
    text_null = texts.is_null().to_pylist()
    bad = invalid_utf8(texts)
    if bad is not None:
        texts = pc.if_else(pa.array(bad), pa.scalar(None, texts.type), texts)
    blank = blank_texts(texts).to_pylist()
    bad = bad.tolist() if bad is not None else [False] * len(texts)
    return [null if b else INVALID_UTF8 if u else empty if c else None
            for b, u, c in zip(text_null, bad, blank)]


def row_reasons(ids: pa.Array, texts: pa.Array, pairs: pa.Array | None = None) -> list[str | None]:
    """Per-row reasons that need no other row (None: the row can be embedded). With sentence
    pairs, the second text follows the first one's rules."""
    id_null = ids.is_null().to_pylist()
    first = _text_reasons(texts, NULL_TEXT, EMPTY_TEXT)
    second = (_text_reasons(pairs, NULL_PAIR_TEXT, EMPTY_PAIR_TEXT) if pairs is not None
              else [None] * len(first))
    return [NULL_ID if a else b or c for a, b, c in zip(id_null, first, second)]


def reasons_for_window(ids: pa.Array, texts: pa.Array, row_numbers: np.ndarray,
                       duplicate_rows: np.ndarray, pairs: pa.Array | None = None) -> list[str | None]:
    """duplicate_rows: the unit's row numbers whose id an earlier row holds (sorted)."""
    reasons = row_reasons(ids, texts, pairs)
    if len(duplicate_rows):
        for i in np.flatnonzero(np.isin(row_numbers, duplicate_rows)).tolist():
            if reasons[i] is None:
                reasons[i] = DUPLICATE_ID
    return reasons
