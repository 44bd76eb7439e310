"""sentence-transformers 6.3's HierarchicalTokenPooling on one row's token vectors [tokens, dim]:
the first `protected` tokens kept as they are, the rest clustered by Ward linkage on the cosine
distance 1 - x.x (clamped to [0, 2]) into floor(rest / pool_factor) clusters (or max_tokens -
protected, or the tree cut at distance_threshold), each cluster replaced by its mean, in the
order of its fcluster label; then every token L2-normalized if normalize_embeddings. The same
arithmetic as its reference clustering (fastcluster's linkage where installed, else scipy's, as
sentence-transformers picks), row by row; its batching pads rows but reads each row alone.
No hub kernel is used."""
from __future__ import annotations

from functools import cache

import numpy as np
import torch

from ..models.multivector_folder import TokenPooling


@cache
def _linkage():
    try:
        from fastcluster import linkage
    except (ImportError, OSError, RuntimeError):
        from scipy.cluster.hierarchy import linkage
    return linkage


def _labels(rest: torch.Tensor, pooling: TokenPooling, target: int) -> np.ndarray:
    """Dense zero-based cluster labels, numbered as sorted fcluster labels (ties may give fewer)."""
    from scipy.cluster.hierarchy import fcluster
    from scipy.spatial.distance import squareform

    distances = (1 - rest @ rest.T).clamp_(0, 2).numpy()
    tree = _linkage()(squareform(distances, checks=False), method="ward")
    if pooling.distance_threshold is None:
        labels = fcluster(tree, t=target, criterion="maxclust")
    else:
        labels = fcluster(tree, t=pooling.distance_threshold, criterion="distance")
    return np.unique(labels, return_inverse=True)[1].reshape(-1)


def pool_row(row: torch.Tensor, pooling: TokenPooling) -> torch.Tensor:
    """One row's pooled token vectors (float32 [tokens, dim] in, float32 [pooled, dim] out)."""
    active = pooling.pool_factor > 1 or pooling.max_tokens is not None \
        or pooling.distance_threshold is not None
    out = row
    protected = min(pooling.protected, len(row))
    rest = row[protected:]
    if active and len(rest) > 1:
        if pooling.max_tokens is not None:
            target = pooling.max_tokens - pooling.protected
        else:  # as sentence-transformers divides: float64 floor division
            target = int(torch.tensor(len(rest), dtype=torch.float64) // pooling.pool_factor)
        target = min(max(target, 1), len(rest))
        if pooling.distance_threshold is not None or target < len(rest):
            labels = torch.from_numpy(_labels(rest, pooling, target).astype(np.int64))
            count = int(labels.max()) + 1
            sums = rest.new_zeros((count, rest.shape[1])).index_add_(0, labels, rest)
            sizes = rest.new_zeros(count).index_add_(0, labels, torch.ones_like(labels,
                                                                            dtype=rest.dtype))
            out = torch.cat((row[:protected], sums / sizes[:, None]))
    if pooling.normalize_embeddings:
        out = torch.nn.functional.normalize(out, dim=-1)
    return out
