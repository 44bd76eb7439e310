"""MaxSim (late interaction) over multi-vector rows, exact and through a token index.

A row is a [tokens, dim] matrix; a query too. MaxSim(q, d) = sum over the query's tokens of the
largest dot product with any of d's tokens (ColBERT; sentence-transformers' `maxsim`). Rows
are held as every token vector in one [T, dim] matrix plus row offsets [rows + 1]
(io/multivectors.stored_tokens), so scoring a block of rows is one matrix product and one
segmented max.

- `maxsim_scores(query, tokens, offsets)`: exact, every row (a row of no tokens scores -inf);
- `top_rows(scores, k)`: the k best, ties to the lower row;
- `TokenIndex`: a FAISS index over every token vector, its labels the token positions (a
  position maps to its row through the offsets). `candidates` gives, for each query token, the
  rows of its `k_token` nearest tokens: PLAID-style candidate generation, rescored exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_TOKENS = 1 << 20  # token vectors scored at once: [block, query tokens] float32


def maxsim_scores(query: np.ndarray, tokens: np.ndarray, offsets: np.ndarray,
                  rows: np.ndarray | None = None) -> np.ndarray:
    """Exact MaxSim of one query [q, dim] against rows (all, or these row numbers) whose token
    vectors are tokens[offsets[r]:offsets[r + 1]]. float32 [len(rows)]."""
    query = np.ascontiguousarray(query, np.float32)
    offsets = np.asarray(offsets, np.int64)
    if rows is None:
        starts, ends = offsets[:-1], offsets[1:]
    else:
        rows = np.asarray(rows, np.int64)
        starts, ends = offsets[rows], offsets[rows + 1]
    scores = np.full(len(starts), -np.inf, np.float32)
    filled = np.flatnonzero(ends > starts)
    at = 0
    while at < len(filled):  # blocks of rows of at most BLOCK_TOKENS tokens (one row at least)
        lengths = ends[filled[at:]] - starts[filled[at:]]
        take = max(1, int(np.searchsorted(np.cumsum(lengths), BLOCK_TOKENS, "right")))
        pick = filled[at:at + take]
        if rows is None:  # contiguous rows: one slice of the token matrix
            block = tokens[starts[pick[0]]:ends[pick[-1]]]
            local = starts[pick] - starts[pick[0]]
        else:
            spans = [np.arange(a, b) for a, b in zip(starts[pick], ends[pick])]
            block = tokens[np.concatenate(spans)]
            local = np.r_[0, np.cumsum([len(s) for s in spans])[:-1]]
        sims = np.asarray(block, np.float32) @ query.T  # [block tokens, q]
        scores[pick] = np.maximum.reduceat(sims, local, axis=0).sum(axis=1)
        at += take
    return scores


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """The k best rows, best first, ties to the lower row."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((np.arange(len(scores)), -scores.astype(np.float64)))
    return order[:k].astype(np.int64)


@dataclass
class TokenIndex:
    """A FAISS index over every stored token vector (labels: token positions) and the row
    offsets that map a token to its row."""
    index: object  # faiss.Index (inner product)
    offsets: np.ndarray

    @classmethod
    def build(cls, tokens: np.ndarray, offsets: np.ndarray, kind: str = "flat",
              nlist: int | None = None, nprobe: int = 16, seed: int = 0) -> "TokenIndex":
        """kind "flat": exact inner product over every token; "ivf": IVF-Flat (inner product),
        nlist ~ sqrt(T) unless given, trained on at most 64 tokens a list (built at every search
        open: the k-means is kept small)."""
        import faiss

        tokens = np.ascontiguousarray(tokens, np.float32)
        dim = tokens.shape[1]
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            nlist = nlist or max(1, min(int(np.sqrt(len(tokens))), len(tokens) // 39 or 1))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist,
                                       faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            train = tokens if len(tokens) <= nlist * 64 else tokens[
                np.sort(rng.choice(len(tokens), nlist * 64, replace=False))]
            index.cp.seed = seed
            index.train(train)
            index.nprobe = min(nprobe, nlist)
        else:
            raise ValueError(f"token index kind {kind!r}: flat or ivf")
        index.add(tokens)
        return cls(index, np.asarray(offsets, np.int64))

    def candidates(self, query: np.ndarray, k_token: int) -> np.ndarray:
        """Rows holding one of each query token's k_token nearest tokens, ascending."""
        _, labels = self.index.search(np.ascontiguousarray(query, np.float32), k_token)
        labels = labels[labels >= 0]
        return np.unique(np.searchsorted(self.offsets, labels, "right") - 1)


def search_rows(query: np.ndarray, tokens: np.ndarray, offsets: np.ndarray, k: int,
                index: TokenIndex | None = None, k_token: int = 64
                ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of the k best rows by MaxSim: every row scored (index None), or the
    index's candidate rows rescored exactly."""
    if index is None:
        scores = maxsim_scores(query, tokens, offsets)
        best = top_rows(scores, k)
        return best, scores[best]
    rows = index.candidates(query, k_token)
    scores = maxsim_scores(query, tokens, offsets, rows)
    best = top_rows(scores, k)
    return rows[best], scores[best]
