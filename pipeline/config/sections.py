"""The job file's tables as frozen dataclasses: every key with its type, its default, its
one-sentence description and, for an enumeration, its closed set of values (field metadata
"doc" and "choices"; docs/hooks/job_reference.py renders the reference from them)."""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# output.precision: the kinds of sentence-transformers' quantize_embeddings, and float16
PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
RESCORE_PRECISIONS = ("float32", "float16", "int8", "uint8")
PRECISION_BYTES = {"binary": 1 / 8, "ubinary": 1 / 8, "int8": 1, "uint8": 1, "float16": 2,
                   "float32": 4}  # a dimension's

# Named pooling modes are presets of the general (layers, layer_combine, token_pooling) form.
POOLING_PRESETS: dict[str, tuple[tuple[int, ...], str, str]] = {
    "cls": ((-1,), "concat", "cls"),
    "mean": ((-1,), "concat", "mean"),
    "max": ((-1,), "concat", "max"),
    "concat-last-four": ((-4, -3, -2, -1), "concat", "mean"),
}
# output.representations: what a row can be stored as (docs/multi-representation.md)
REPRESENTATIONS = ("dense", "sparse", "multivector")
# a SparseEncoder (SPLADE) folder's SpladePooling: docs/sparse.md
SPARSE_POOLINGS = ("splade-max", "splade-sum")
# a MultiVectorEncoder (ColBERT) folder: every token's vector kept: docs/multivector.md
MULTIVECTOR_POOLING = "multivector"


def key(default: Any = MISSING, doc: str = "", *, choices: tuple[str, ...] = (),
        shown: str = "") -> Any:
    """A job-file key: its default, what it does in one sentence, and its allowed values;
    `shown`: how the reference states the default of a key the dataclass requires."""
    meta = {"doc": doc, **({"choices": choices} if choices else {}),
            **({"shown": shown} if shown else {})}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class InputConfig:
    """The Parquet input: where it is and which columns to read."""
    path: str = key("data/movie_reviews", "A folder (every *.parquet below it, sorted), one "
                    "file, a glob, or an s3:// or gs:// URI.")
    text_column: str = key("text", "The column holding the text to embed.")
    id_column: str = key("id", "The column holding each row's id, integer or string.")
    text_pair_column: str | None = key(None, "Sentence pairs: the column of each row's second "
                                       "text, encoded as (text, pair), [CLS] a [SEP] b [SEP] "
                                       "with segment ids 0 / 1 (or the family's own template).")
    pair_truncation: str = key("longest_first", "How a pair over max_length is cut: tokens off "
                               "the longer text one at a time, or only off the second text.",
                               choices=("longest_first", "only_second"))
    unit_rows: int = key(1_000_000, "A Parquet file with more rows is split into row-group "
                         "ranges, each its own unit of work.")


@dataclass(frozen=True)
class ModelConfig:
    """The model and how it runs."""
    name: str = key(DEFAULT_MODEL, "The bundled model, or a local Hugging Face / "
                    "sentence-transformers folder (never downloaded).")
    max_length: int | None = key(None, "Tokens a text at most (longer texts are truncated and "
                                 "flagged); unset: the model's own limit.")
    device: str = key("auto", "Where the model runs: auto, cpu, cuda or cuda:N (auto: the GPU "
                      "when there is one).")
    dtype: str = key("float32", "The model's number type; auto: bfloat16 where the CPU or "
                     "GPU runs it natively (float16 on a GPU without it), else float32; float16 "
                     "is CUDA only; int8 is CPU and BERT families only, never picked by auto.",
                     choices=("auto", "float32", "bfloat16", "float16", "int8"))
    # ~1.5x on CPU bf16, ~15-30 s to compile first. auto: when the input (all its rows, done or
    # not, so a rerun decides alike) is long enough to repay that
    compile: bool | str = key("auto", "torch.compile of transformers' forward with frozen "
                              "weights; auto: never where the fused forward runs, else bf16 on "
                              "CPU with enough input rows to repay the compile.",
                              choices=("auto",))
    # auto: embedpipe's kernel for bf16 on CPU (amx on AMX CPUs, avx512 on AVX-512 BF16 ones),
    # FA2 on CUDA if installed, else SDPA, or eager for model classes without SDPA (MPNet, DeBERTa)
    attention: str = key("auto", "The attention kernel; auto: embedpipe's amx / avx512 kernel "
                         "for bf16 on CPUs that have them, FA2 on CUDA if installed, else sdpa, "
                         "or eager for families without SDPA (MPNet, DeBERTa).",
                         choices=("auto", "sdpa", "eager", "amx", "avx512", "flash_attention_2"))
    forward: str = key("auto", "The forward pass; auto: embedpipe's fused forward for "
                       "BERT-family models run eagerly on a CPU with oneDNN, transformers' "
                       "own forward otherwise.", choices=("auto", "fused", "transformers"))


@dataclass(frozen=True)
class EncodeConfig:
    """How texts become vectors: pooling, prompts, batching and long texts."""
    pooling: str = key("auto", "How token vectors become one vector; auto: the pooling the "
                       "model folder was trained with (1_Pooling), else mean; a SparseEncoder "
                       "folder's splade-*, a MultiVectorEncoder folder's multivector (every "
                       "token's vector kept).",
                       choices=("auto", "cls", "mean", "max", "concat-last-four", "pooler",
                                *SPARSE_POOLINGS, MULTIVECTOR_POOLING))
    layers: tuple[int, ...] | None = key(None, "Hidden-state layers to pool (0 = the embedding "
                                         "layer's output, -1 the last); unset: the pooling "
                                         "mode's own.")
    layer_combine: str | None = key(None, "How the chosen layers combine per token; unset: the "
                                    "pooling mode's own (concat).",
                                    choices=("concat", "mean", "sum"))
    token_pooling: str | None = key(None, "How a text's tokens pool (padding never counts); "
                                    "unset: the pooling mode's own.",
                                    choices=("mean", "cls", "max"))
    normalize: bool | None = key(None, "L2-normalise each vector; unset: as the model folder's "
                                 "Normalize module says, otherwise false.")
    prompt: str | None = key(None, "Text put before every text, e.g. \"passage: \" (its tokens "
                             "count in pooling and n_tokens).")
    prompt_name: str | None = key(None, "Or one of the model folder's prompts, by name; unset: "
                                  "the folder's default prompt.")
    query_prompt: str | None = key(None, "The prompt for search queries; unset: the folder's "
                                   "\"query\" prompt, else prompt.")
    batch_tokens: int | None = key(None, "Token budget of one batch (rows x longest row); "
                                   "unset: 4,096 on CPU, 8,192 on CUDA.")
    max_batch_size: int = key(256, "Rows in one batch at most.")
    sort_window: int = key(4096, "Rows read ahead and sorted by token length before batching.")
    long_text: str = key("truncate", "Texts longer than one window: embed the first max_length "
                         "tokens and flag them (truncate), embed every window (chunk), or "
                         "reject them as too long.", choices=("truncate", "chunk", "reject"))
    chunk_tokens: int | None = key(None, "chunk: a window's own tokens; unset: max_length less "
                                   "the special tokens and the prompt.")
    chunk_overlap: int = key(32, "chunk: tokens that consecutive windows share.")
    max_chunks: int = key(1024, "chunk: windows a text at most; past them the text is flagged "
                          "truncated.")
    max_active_dims: int | None = key(None, "Sparse (SPLADE) folders: keep each row's N "
                                      "largest values; unset: the folder's max_active_dims, "
                                      "else every non-zero value.")
    # Vectors do not depend on reuse, so it is not a vector setting.
    reuse: str = key("id+content", "Rows of new or changed input whose (id, text hash), or text "
                     "hash alone with content, already have a vector in the folder take it "
                     "instead of being encoded; off encodes them all.",
                     choices=("id+content", "content", "off"))

    def token_budget(self, device_type: str) -> int:
        """batch_tokens, or by device: 4,096 on CPU, where a batch's activations then stay in
        cache (float32 ran 20% faster than at 8,192 here; bfloat16 the same), 8,192 on CUDA."""
        if self.batch_tokens is not None:
            return self.batch_tokens
        return 8192 if device_type == "cuda" else 4096

    @property
    def sparse(self) -> bool:
        """A SparseEncoder (SPLADE) pooling: rows over the vocabulary (encode/sparse.py)."""
        return self.pooling in SPARSE_POOLINGS

    @property
    def multivector(self) -> bool:
        """A MultiVectorEncoder (ColBERT) folder's rows: token vectors (encode/multivector.py)."""
        return self.pooling == MULTIVECTOR_POOLING

    def pooling_spec(self) -> tuple[tuple[int, ...], str, str] | None:
        """The effective (layers, layer_combine, token_pooling); None for the model's pooler."""
        if self.pooling == "auto":
            raise ValueError("pooling 'auto' is resolved against the model first (resolve_recipe)")
        if self.pooling == "pooler" or self.sparse or self.multivector:
            return None
        layers, combine, token = POOLING_PRESETS[self.pooling]
        return (self.layers or layers, self.layer_combine or combine, self.token_pooling or token)


@dataclass(frozen=True)
class OutputConfig:
    """The output folder and what its parts hold."""
    path: str = key("", "A local folder or an s3:// or gs:// prefix; empty: out/<job name>.")
    precision: str | None = key(None, "What the vector parts store: float32, float16, or "
                                "sentence-transformers' quantize_embeddings kinds (int8 / uint8 "
                                "with per-dimension ranges calibrated once a folder, binary / "
                                "ubinary one bit a dimension); unset: vector_dtype.",
                                choices=PRECISIONS)
    rescore_precision: str | None = key(None, "A second copy of each vector, finer than "
                                        "precision, kept in the parts for `search --rescore` "
                                        "(e.g. binary vectors with int8 kept); unset: none.",
                                        choices=RESCORE_PRECISIONS)
    vector_dtype: str = key("float32", "The older name of precision's float kinds, still "
                            "accepted (with precision set it must agree or stay unset).",
                            choices=("float32", "float16"))
    rows_per_file: int = key(100_000, "Rows in one Parquet part at most.")
    keep_columns: tuple[str, ...] = key((), "Input columns copied next to the vectors, e.g. "
                                        "[\"text\", \"label\"].")
    dimensions: int | None = key(None, "Matryoshka: keep the first N dimensions (re-normalised "
                                 "when normalize); unset: all.")
    chunks: str = key("pool", "With encode.long_text = \"chunk\": one row a text (its windows' "
                      "token-weighted mean) or one row a window, with its offsets.",
                      choices=("pool", "rows"))
    granularity: str = key("text", "Token-level vectors, in a token table beside the text "
                           "vectors: none (text), a row per sub-token, or a row per word.",
                           choices=("text", "subword", "word"))
    word_pooling: str = key("first", "word: a word's vector from its first sub-token, or the "
                            "mean of its sub-tokens.", choices=("first", "mean"))
    special_tokens: bool = key(False, "subword: rows for the model's special tokens ([CLS], "
                               "[SEP]) too; padding never.")
    representations: tuple[str, ...] | None = key(
        None, "What each row is stored as, any non-empty subset of dense, sparse and "
        "multivector that the model folder computes, all from one forward pass (a BGE-M3 "
        "folder's heads: docs/multi-representation.md); unset: dense (a SPLADE folder: sparse, "
        "a ColBERT folder: multivector).")


@dataclass(frozen=True)
class IndexConfig:
    """The FAISS index built over the vectors."""
    enabled: bool = key(True, "Build an index after the vectors are written.")
    type: str = key("flat", "The FAISS index kind; auto chooses by vector count within "
                    "max_memory, factory takes the factory string.",
                    choices=("flat", "hnsw", "ivf-flat", "ivf-pq", "auto", "factory"))
    metric: str = key("ip", "Inner product (cosine on normalised vectors) or L2 distance.",
                      choices=("ip", "l2"))
    hnsw_m: int = key(32, "hnsw: neighbours a node (also a pgvector hnsw index's m).")
    ef_construction: int = key(200, "hnsw: candidates considered while building.")
    ef_search: int = key(128, "hnsw: candidates considered while searching.")
    nlist: int | None = key(None, "IVF: the number of lists; unset: chosen from the vector "
                            "count.")
    nprobe: int | None = key(None, "IVF: lists searched a query; unset: the smallest that reaches "
                             "recall@10 0.95 on a sample.")
    pq_m: int | None = key(None, "ivf-pq: sub-quantizers a vector (must divide the "
                           "dimension); unset: chosen from the dimension.")
    factory: str | None = key(None, "With type = \"factory\": any FAISS index_factory string, "
                              "e.g. \"OPQ16,IVF256,PQ16\".")
    max_memory: str = key("4GB", "The memory budget type = \"auto\" chooses within, a size "
                          "like 512MB or 4GB.")
    layout: str = key("single", "IVF kinds: one index in RAM (single), one memory-mapped IVF "
                      "index per group of parts searched together (shards), or shards merged "
                      "into memory-mapped lists (ondisk).", choices=("single", "shards", "ondisk"))
    shard_rows: int = key(1_000_000, "shards / ondisk: consecutive parts grouped up to this "
                          "many rows.")


# The keys each sink kind takes (a manifest's recorded config lists every field).
SINK_KEYS = {"lancedb": ("kind", "name", "table", "uri"),
             "pgvector": ("kind", "name", "table", "dsn_env", "vector_type", "index")}


@dataclass(frozen=True)
class SinkConfig:
    """One `[[sink]]`: a vector store kept in step with the folder (pipeline/sinks/)."""
    kind: str = key(doc="The vector store.", choices=tuple(SINK_KEYS))
    table: str = key(doc="The table kept in step with the folder (pgvector: table or "
                     "schema.table).")
    name: str = key("", "How commands and the manifest name the sink; empty: the table's "
                    "name.")
    uri: str | None = key(None, "lancedb: the database, a local folder or an object-store URI "
                          "(required for lancedb).")
    dsn_env: str = key("EMBEDPIPE_PG_DSN", "pgvector: the environment variable holding the "
                       "connection string (never the job file).")
    vector_type: str = key("auto", "pgvector: the column type; auto follows output.precision "
                           "(float32: vector, float16: halfvec, binary / ubinary: bit, "
                           "pgvector >= 0.7 for the last two; a sparse folder: sparsevec); "
                           "halfvec on float32 rounds.",
                           choices=("auto", "vector", "halfvec", "bit"))
    index: str = key("none", "pgvector: the ANN index built after the load; none drops it, "
                     "so search is exact. A sparse folder: hnsw only with max_active_dims <= "
                     "1000, no ivfflat.", choices=("none", "hnsw", "ivfflat"))


@dataclass(frozen=True)
class JobConfig:
    name: str = key(doc="The job's name; output.path defaults to out/<name>.",
                    shown="the job file's stem")
    input: InputConfig = field(default_factory=InputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    sink: tuple[SinkConfig, ...] = ()  # [[sink]] tables; they change no vector

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def vector_settings(self) -> dict[str, Any]:
        """Everything that changes a stored row: its vector or its columns (not batch sizes).
        Runs record them resolved against the model (pooling 'auto' made concrete)."""
        spec = None if self.encode.pooling == "auto" else self.encode.pooling_spec()
        return {
            "model.name": self.model.name,
            "model.max_length": self.model.max_length,
            "model.dtype": self.model.dtype,
            "encode.pooling": self.encode.pooling,
            "encode.pooling_spec": None if spec is None else {
                "layers": list(spec[0]), "layer_combine": spec[1], "token_pooling": spec[2]},
            "encode.normalize": self.encode.normalize,
            "output.vector_dtype": self.output.vector_dtype,
            "output.keep_columns": list(self.output.keep_columns),
            # recorded only when set, so folders made before these settings existed still match
            **({"encode.prompt": self.encode.prompt} if self.encode.prompt else {}),
            **({"input.text_pair": True, "input.pair_truncation": self.input.pair_truncation}
               if self.input.text_pair_column else {}),
            **({"output.dimensions": self.output.dimensions} if self.output.dimensions else {}),
            # recorded only when quantized: float32 / float16 folders keep their settings hash
            **({"output.precision": self.output.precision}
               if self.output.precision not in (None, "float32", "float16") else {}),
            **({"output.rescore_precision": self.output.rescore_precision}
               if self.output.rescore_precision else {}),
            **self.chunk_settings(),
            **self.token_settings(),
            **({"encode.max_active_dims": self.encode.max_active_dims}
               if self.encode.max_active_dims else {}),
            # recorded only beyond dense alone, so dense folders keep their settings hash
            **({"output.representations": list(self.output.representations)}
               if self.output.representations not in (None, ("dense",)) else {}),
        }

    def token_settings(self) -> dict[str, Any]:
        """What the token table holds, recorded only when there is one (folders made before
        token-level output existed still match)."""
        out = self.output
        if out.granularity == "text":
            return {}
        return {"output.granularity": out.granularity,
                **({"output.word_pooling": out.word_pooling} if out.granularity == "word" else
                   {"output.special_tokens": out.special_tokens})}

    def chunk_settings(self) -> dict[str, Any]:
        """How long texts are cut, recorded only when they are not truncated (folders made before
        chunking existed still match)."""
        enc = self.encode
        if enc.long_text == "truncate":
            return {}
        settings = {"encode.long_text": enc.long_text, "encode.chunk_tokens": enc.chunk_tokens}
        if enc.long_text == "chunk":
            settings.update({"encode.chunk_overlap": enc.chunk_overlap,
                             "encode.max_chunks": enc.max_chunks,
                             "output.chunks": self.output.chunks})
        return settings


# The job file's tables, in the order the reference and the error messages list them.
SECTIONS: dict[str, type] = {
    "input": InputConfig, "model": ModelConfig, "encode": EncodeConfig,
    "output": OutputConfig, "index": IndexConfig,
}
CHOICES: dict[str, tuple[str, ...]] = {
    f"{section}.{f.name}": f.metadata["choices"]
    for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
    if "choices" in f.metadata
}
SINK_CHOICES: dict[str, tuple[str, ...]] = {
    f.name: f.metadata["choices"] for f in dataclasses.fields(SinkConfig)
    if "choices" in f.metadata and f.name != "kind"
}
POSITIVE = {
    "input.unit_rows", "model.max_length", "encode.batch_tokens", "encode.max_batch_size",
    "encode.sort_window", "output.rows_per_file", "index.hnsw_m", "index.ef_construction",
    "index.ef_search", "index.nlist", "index.nprobe", "index.pq_m", "index.shard_rows",
    "output.dimensions", "encode.chunk_tokens", "encode.max_chunks", "encode.max_active_dims",
}
