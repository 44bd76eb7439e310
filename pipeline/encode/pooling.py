"""Sentence vectors from a transformer's hidden states.

A pooling is (layers, layer_combine, token_pooling): pick hidden_states[layer] for each layer
(0 = the embedding layer's output), combine them per token (concat | mean | sum), then pool over
the real tokens (mean | cls | max), padding ignored. The named modes are presets of this form.
"""
from __future__ import annotations

import torch


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, token_pooling: str) -> torch.Tensor:
    """Pool [batch, tokens, width] to [batch, width] over the tokens whose mask is 1."""
    if token_pooling == "cls":
        return hidden[:, 0]
    if token_pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    if token_pooling == "max":
        return hidden.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(1).values
    raise ValueError(f"unknown token pooling {token_pooling!r}")


def pool(hidden_states: tuple[torch.Tensor, ...], mask: torch.Tensor,
         layers: tuple[int, ...], layer_combine: str, token_pooling: str) -> torch.Tensor:
    """Pool in float32 whatever dtype the model ran in, so low-precision runs lose no more."""
    chosen = [hidden_states[i].float() for i in layers]
    if layer_combine == "concat":
        if token_pooling in ("mean", "cls"):
            # Both poolings are per-feature linear maps, so pooling each layer and concatenating
            # the results equals concatenating first, without a 4x-wide token tensor.
            return torch.cat([pool_tokens(h, mask, token_pooling) for h in chosen], dim=-1)
        combined = torch.cat(chosen, dim=-1)
    elif layer_combine == "mean":
        combined = torch.stack(chosen).mean(0)
    elif layer_combine == "sum":
        combined = torch.stack(chosen).sum(0)
    else:
        raise ValueError(f"unknown layer combine {layer_combine!r}")
    return pool_tokens(combined, mask, token_pooling)


def combine_layers(hidden_states: tuple[torch.Tensor, ...], layers: tuple[int, ...],
                   layer_combine: str) -> torch.Tensor:
    """Per-token vectors [batch, tokens, width] in float32: the chosen layers combined as pool
    combines them, with no pooling over tokens (token-level output)."""
    chosen = [hidden_states[i].float() for i in layers]
    if len(chosen) == 1:
        return chosen[0]
    if layer_combine == "concat":
        return torch.cat(chosen, dim=-1)
    if layer_combine == "mean":
        return torch.stack(chosen).mean(0)
    if layer_combine == "sum":
        return torch.stack(chosen).sum(0)
    raise ValueError(f"unknown layer combine {layer_combine!r}")


def output_width(hidden_size: int, layers: tuple[int, ...] | None, layer_combine: str | None) -> int:
    if layers is None:  # the model's pooler
        return hidden_size
    return hidden_size * len(layers) if layer_combine == "concat" else hidden_size
