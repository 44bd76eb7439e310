"""Turning FAISS results into stored rows: a search that skips tombstoned labels (HNSW keeps
removed vectors in its graph, index/maintain.py) and the map from label to row position."""
from __future__ import annotations

import math

import faiss
import numpy as np

from .family import hnsw_of


class LiveIndex:
    """An index searched for its live vectors only, with hits as row positions (-1: none).

    The id map (ids.parquet) lists each stored row's label in row order; a hit's label is
    looked up there, never taken for a position. Tombstones are excluded by an ID selector
    inside the search (FAISS's SearchParameters), so k hits stay k live hits; HNSW's efSearch
    is widened for them (widened_ef)."""

    def __init__(self, index: faiss.Index, labels: np.ndarray, tombstones: np.ndarray):
        self.index = index
        self.order = np.argsort(labels, kind="stable")
        self.sorted_labels = labels[self.order]
        self.count = len(labels)  # live vectors
        self.params = None
        if len(tombstones):
            self._batch = faiss.IDSelectorBatch(np.ascontiguousarray(tombstones, np.int64))
            self._not = faiss.IDSelectorNot(self._batch)
            hnsw = hnsw_of(index)
            if hnsw is not None:
                self.params = faiss.SearchParametersHNSW(
                    sel=self._not, efSearch=widened_ef(hnsw.efSearch,
                                                       len(tombstones) / max(1, index.ntotal)))
            else:
                self.params = faiss.SearchParameters(sel=self._not)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row positions) of the k best live vectors a query."""
        scores, found = self.index.search(vectors, k, params=self.params)
        return scores, self.positions(found)

    def positions(self, labels: np.ndarray) -> np.ndarray:
        """Row positions of the labels; -1 stays -1, as does a label the id map lacks."""
        if not len(self.sorted_labels):
            return np.full(labels.shape, -1, np.int64)
        at = np.minimum(np.searchsorted(self.sorted_labels, labels), len(self.sorted_labels) - 1)
        known = (labels >= 0) & (self.sorted_labels[at] == labels)
        return np.where(known, self.order[at], -1)


def widened_ef(ef: int, dead: float) -> int:
    """efSearch for a graph whose `dead` share of nodes are tombstones: they still take places
    in the candidate list (and their links still route), so the list is widened by twice that
    share to keep the recall measured at build (tests/index/test_maintain.py compares)."""
    return math.ceil(ef * (1 + 2 * dead))
