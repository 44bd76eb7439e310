"""A tiny random BGE-M3-like folder, built offline: an XLM-RoBERTa body (2 layers, 32 wide)
saved by transformers, a small Unigram (sentencepiece-style) tokenizer trained here with the
`tokenizers` library and wrapped as XLMRobertaTokenizerFast, and random sparse_linear.pt /
colbert_linear.pt heads as FlagEmbedding saves them (nn.Linear state dicts)."""
from __future__ import annotations

from pathlib import Path

MAX_LENGTH = 64
CORPUS = ["a warm funny film with a great cast", "the slow plot of a long dull film",
          "great music and a good cast", "the ending was sad and quiet", "a bold new story",
          "actors play their parts well", "the camera work is clumsy", "an old tale retold",
          "children will love the songs", "a thriller that never lets go"]


def build_m3(path: Path, colbert_dim: int = 24, heads=("sparse", "colbert")) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, \
        processors, trainers
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast

    path = Path(path)
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's ids 0-4
    tok.train_from_iterator(CORPUS * 20, trainers.UnigramTrainer(
        vocab_size=200, special_tokens=special, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=MAX_LENGTH)
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=64,
                              max_position_embeddings=MAX_LENGTH + 2,
                              initializer_range=0.5)  # random vectors that differ
    XLMRobertaModel(config, add_pooling_layer=False).eval().save_pretrained(path)
    fast.save_pretrained(path)
    if "sparse" in heads:
        torch.save(torch.nn.Linear(32, 1).state_dict(), path / "sparse_linear.pt")
    if "colbert" in heads:
        torch.save(torch.nn.Linear(32, colbert_dim).state_dict(), path / "colbert_linear.pt")
    return path


def reference(folder: Path, texts: list[str]) -> tuple:
    """BGEM3FlagModel's arithmetic written out, one text at a time (no padding): transformers'
    AutoModel's last hidden state and the head files. (dense [n, 32], sparse: a {id: weight}
    dict a text, colbert: a [tokens - 1, d] array a text.)"""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    sparse_state = torch.load(folder / "sparse_linear.pt", weights_only=True)
    colbert_state = torch.load(folder / "colbert_linear.pt", weights_only=True)
    unused = {tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
              tokenizer.unk_token_id}
    dense, sparse, colbert = [], [], []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=MAX_LENGTH,
                            return_tensors="pt")["input_ids"]
            h = model(input_ids=ids).last_hidden_state[0]
            dense.append(torch.nn.functional.normalize(h[0], dim=-1).numpy())
            w = torch.relu(h @ sparse_state["weight"].T + sparse_state["bias"]).squeeze(-1)
            weights: dict[int, float] = {}
            for token, value in zip(ids[0].tolist(), w.tolist()):
                if token not in unused and value > 0:
                    weights[token] = max(weights.get(token, 0.0), value)
            sparse.append(weights)
            c = h[1:] @ colbert_state["weight"].T + colbert_state["bias"]
            colbert.append(torch.nn.functional.normalize(c, dim=-1).numpy())
    import numpy as np
    return np.stack(dense), sparse, colbert
