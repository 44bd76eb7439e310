"""The needle query of a document: a real prose sentence from its last third, removed from it."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .pages import WORDY, Block

_SENT_SPLIT = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(]?[A-Z])")
_CODE_CHARS = re.compile(r">>>|[{}=<>;\\$#|@~`_]|\(\)|\.\.\.|::|/")
_ABBREV_END = re.compile(r"\b(?:e\.g|i\.e|etc|vs|cf|Mr|Dr|No|approx)\.$")


@dataclass(frozen=True)
class PickedQuery:
    """A sentence taken out of a document: where it was, and the text without it."""

    sentence: str
    start: int          # character offset of the sentence in the original text
    original_len: int   # length of the original text
    text: str           # the document text with the sentence removed

    @property
    def position(self) -> float:
        return self.start / max(self.original_len, 1)


def split_sentences(paragraph: str) -> list[str]:
    """Split one prose paragraph into sentences (on ., ! or ? followed by a capital)."""
    parts = _SENT_SPLIT.split(paragraph.strip())
    out: list[str] = []
    for part in parts:
        part = part.strip()
        if out and _ABBREV_END.search(out[-1]):
            out[-1] = f"{out[-1]} {part}"  # "e.g. Foo" is not a sentence break
        elif part:
            out.append(part)
    return out


def is_prose_sentence(sentence: str, min_words: int = 8, max_words: int = 40) -> bool:
    """A natural-language sentence: 8-40 words, capitalised, ending in . ! or ?, without
    code punctuation, and at least 80% plain words (no dotted names, numbers, identifiers)."""
    words = sentence.split()
    if not min_words <= len(words) <= max_words:
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if _CODE_CHARS.search(sentence) or "\n" in sentence:
        return False
    wordy = sum(bool(WORDY.match(w)) for w in words)
    return wordy >= 0.8 * len(words)


def pick_query(blocks: Sequence[Block], rng: random.Random, *, tail: float = 1 / 3,
               avoid: frozenset[str] | set[str] = frozenset(),
               min_words: int = 8, max_words: int = 40) -> PickedQuery | None:
    """Pick one prose sentence from the last ``tail`` of the text and remove it.

    Candidates are the sentences of ``prose`` blocks that start at or after
    ``(1 - tail) * len(text)``, pass :func:`is_prose_sentence`, occur once in the text and are
    not in ``avoid`` (sentences seen in other documents). One is drawn with ``rng``; the
    returned text is ``blocks`` joined as by :func:`blocks_to_text`, without that sentence (a
    block left empty is dropped). None when no sentence qualifies.
    """
    texts = [b.text for b in blocks if b.text]
    kinds = [b.kind for b in blocks if b.text]
    full = "\n\n".join(texts)
    cut = (1 - tail) * len(full)
    offset = 0
    candidates: list[tuple[int, int, str]] = []  # (block index, start in full, sentence)
    for i, (kind, text) in enumerate(zip(kinds, texts, strict=True)):
        if kind == "prose" and offset + len(text) > cut:
            for sentence in split_sentences(text):
                local = text.find(sentence)
                start = offset + local
                if (local >= 0 and start >= cut and sentence not in avoid
                        and is_prose_sentence(sentence, min_words, max_words)
                        and full.count(sentence) == 1):
                    candidates.append((i, start, sentence))
        offset += len(text) + 2
    rng.shuffle(candidates)
    for i, start, sentence in candidates:
        block = texts[i]
        local = block.find(sentence)
        rest = " ".join((block[:local] + " " + block[local + len(sentence):]).split())
        new_texts = texts[:i] + ([rest] if rest else []) + texts[i + 1:]
        new_full = "\n\n".join(new_texts)
        if sentence not in new_full:
            return PickedQuery(sentence, start, len(full), new_full)
    return None
