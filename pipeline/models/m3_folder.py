"""A multi-head (BGE-M3) model folder: its encoder body beside the head files FlagEmbedding's
BGEM3FlagModel loads, `sparse_linear.pt` (nn.Linear(hidden, 1): a weight a token) and
`colbert_linear.pt` (nn.Linear(hidden, d): a vector a token). The rule: a folder is M3 when the
folder holding its config.json (the transformer's, also for a sentence-transformers folder)
has at least one of the two files. `load_head` reads one as plain tensors and checks its
shape; encode/m3_heads.py runs them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPARSE_HEAD = "sparse_linear.pt"
COLBERT_HEAD = "colbert_linear.pt"
HEAD_FILES = (SPARSE_HEAD, COLBERT_HEAD)
# which head file each representation beyond dense needs
HEAD_OF = {"sparse": SPARSE_HEAD, "multivector": COLBERT_HEAD}


@dataclass(frozen=True)
class M3Folder:
    path: Path  # the folder holding config.json and the head files
    heads: tuple[str, ...]  # the head files present

    def supports(self) -> tuple[str, ...]:
        """The representations this folder can compute (dense always: the CLS vector)."""
        return ("dense",) + tuple(r for r, f in HEAD_OF.items() if f in self.heads)


def read_m3(path: Path) -> M3Folder | None:
    heads = tuple(f for f in HEAD_FILES if (path / f).is_file())
    return M3Folder(path, heads) if heads else None


def load_head(folder: M3Folder, name: str, hidden_size: int) -> dict:
    """A head file's nn.Linear state dict (weights_only: no code runs), refused in one line when
    missing, unreadable or not a Linear from the body's hidden size (sparse: to 1)."""
    import torch

    from ..config import ConfigError

    path = folder.path / name
    if not path.is_file():
        raise ConfigError(f"model folder {folder.path} has no {name}, the head that "
                          f"output.representations asks for; add it or leave that out")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that is not plain tensors, a truncated file
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = next((line for line in lines if "Unpickler error" in line), lines[0] if lines
                   else type(exc).__name__)
        raise ConfigError(f"{path} cannot be read as a torch state dict of tensors "
                          f"(torch.load weights_only=True): {why}") from None
    weight, bias = (state.get("weight"), state.get("bias")) if isinstance(state, dict) else (None,
                                                                                              None)
    out = 1 if name == SPARSE_HEAD else None
    ok = (isinstance(weight, torch.Tensor) and weight.dim() == 2
          and weight.shape[1] == hidden_size and (out is None or weight.shape[0] == out)
          and isinstance(bias, torch.Tensor) and tuple(bias.shape) == (weight.shape[0],)
          and set(state) == {"weight", "bias"})
    if not ok:
        shape = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)} \
            if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"{path}: expected an nn.Linear state dict (weight [{out or 'd'}, "
                          f"{hidden_size}], bias), found {shape}")
    return {"weight": weight.float(), "bias": bias.float()}
