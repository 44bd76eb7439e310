"""The embedding recipe: pooling, normalisation, prompt, lower-casing and Matryoshka dimensions,
resolved once from the job and the model folder's own sentence-transformers settings. What the
job leaves open follows the folder, as `SentenceTransformer(folder).encode` would:
`pooling = "auto"` takes the folder's pooling and, with `normalize` unset, its Normalize module
(a pooling named in the job takes neither: `normalize` unset is then false); no prompt takes
the folder's default prompt. The result is written into the job, so the manifest, the config
guard and every worker see concrete values."""
from __future__ import annotations

import dataclasses

from ..config import ConfigError, JobConfig
from ..config.sections import REPRESENTATIONS
from .m3_folder import HEAD_OF, load_head
from .model_files import ModelSource
from .st_folder import StFolder


def resolve_recipe(job: JobConfig, source: ModelSource) -> tuple[JobConfig, list[str]]:
    """(the job with its encoding settings made concrete, one note per choice: where it came
    from, for the summary)."""
    enc, st = job.encode, source.st
    notes = []
    if source.m3 is not None:
        job = m3_job(job, source, notes)
        if job.output.representations not in (None, ("dense",)):
            return job, notes  # every setting made concrete there
        source = dataclasses.replace(source, m3=None)  # dense alone: a dense folder's recipe
        enc = job.encode
    representations = job.output.representations
    if enc.multivector or (st and st.multivector):
        if representations not in (None, ("multivector",)):
            raise ConfigError(f"output.representations = {list(representations)}: model folder "
                              f"{source.path} is a multi-vector (ColBERT) encoder, which stores "
                              f"multivector rows only")
        from .multivector_recipe import multivector_recipe
        return multivector_recipe(dataclasses.replace(job, output=dataclasses.replace(
            job.output, representations=None)), source, notes)
    if enc.sparse or (enc.pooling == "auto" and st and st.sparse):
        if representations not in (None, ("sparse",)):
            raise ConfigError(f"output.representations = {list(representations)}: model folder "
                              f"{source.path} is a sparse (SPLADE) encoder, which stores sparse "
                              f"rows only")
        return _sparse_recipe(dataclasses.replace(job, output=dataclasses.replace(
            job.output, representations=None)), source, notes)
    if representations not in (None, ("dense",)):
        raise ConfigError(f"output.representations = {list(representations)}: model folder "
                          f"{source.path} computes dense vectors only (sparse and multivector "
                          f"need a BGE-M3 folder's sparse_linear.pt / colbert_linear.pt: "
                          f"docs/multi-representation.md)")
    if representations is not None:
        job = dataclasses.replace(job, output=dataclasses.replace(job.output,
                                                                  representations=None))
    pooling, normalize = enc.pooling, enc.normalize
    general = bool(enc.layers or enc.layer_combine or enc.token_pooling)
    follow_folder = pooling == "auto" and not general  # the folder's pooling and Normalize
    if enc.max_active_dims:
        raise ConfigError("encode.max_active_dims applies to sparse (SPLADE) folders; "
                          f"{source.path} is a dense one")
    if pooling == "auto" and general:  # the general form overrides the mean preset's parts
        pooling = "mean"
    if pooling == "auto":
        if st is not None and st.pooling:
            pooling = st.pooling
            notes.append(f"pooling {pooling} (the model folder's 1_Pooling)")
        else:
            pooling = "mean"
            notes.append("pooling mean (default: the model folder names none)")
    if normalize is None:
        normalize = bool(follow_folder and st and st.normalize)
        notes.append("normalized (the model folder's Normalize module)" if normalize else
                     "not normalized (default)")
    prompt = _prompt(enc.prompt, enc.prompt_name, st, notes)
    query_prompt = enc.query_prompt
    if query_prompt is None:
        query_prompt = (st.prompts.get("query") if st and "query" in st.prompts else prompt) or ""
    if prompt and st is not None and not st.include_prompt:
        raise ConfigError(f"model folder {source.path} pools without its prompt tokens "
                          f"(include_prompt = false); embedpipe pools every token the model sees")
    dimensions = job.output.dimensions
    if dimensions is not None:
        if pooling == "concat-last-four" or (enc.layers and len(enc.layers) > 1
                                             and enc.layer_combine == "concat"):
            raise ConfigError("output.dimensions keeps the first dimensions of a single layer's "
                              "vector (Matryoshka); it does not apply to concatenated layers")
        if dimensions > source.hidden_size:
            raise ConfigError(f"output.dimensions = {dimensions} is more than the model's "
                              f"{source.hidden_size}")
        notes.append(f"first {dimensions} of {source.hidden_size} dimensions"
                     + (", re-normalized" if normalize else ""))
    encode = dataclasses.replace(enc, pooling=pooling, normalize=normalize, prompt=prompt or None,
                                 prompt_name=None, query_prompt=query_prompt)
    return dataclasses.replace(job, encode=encode), notes


def _prompt(prompt: str | None, name: str | None, st: StFolder | None, notes: list[str]) -> str:
    if prompt is not None:
        if prompt:
            notes.append(f"prompt {prompt!r}")
        return prompt
    prompts = st.prompts if st else {}
    if name is not None:
        if name not in prompts:
            raise ConfigError(f"encode.prompt_name = {name!r}: the model folder's prompts are "
                              f"{', '.join(map(repr, prompts)) or 'none'}")
        notes.append(f"prompt {prompts[name]!r} (the model folder's {name!r})")
        return prompts[name]
    if st is not None and st.default_prompt_name:
        if st.default_prompt_name not in prompts:
            raise ConfigError(f"the model folder's default prompt {st.default_prompt_name!r} is "
                              f"not among its prompts")
        value = prompts[st.default_prompt_name]
        notes.append(f"prompt {value!r} (the model folder's default, "
                     f"{st.default_prompt_name!r})")
        return value
    return ""


def _sparse_recipe(job: JobConfig, source: ModelSource, notes: list[str]
                   ) -> tuple[JobConfig, list[str]]:
    """A SparseEncoder folder (SPLADE): one sparse vector a row over the vocabulary, as its
    encode_document makes it; no FAISS index (search builds an inverted index: docs/sparse.md)."""
    enc, out, st = job.encode, job.output, source.st
    if st is None or st.sparse is None:
        raise ConfigError(f"encode.pooling = {enc.pooling!r} needs a sentence-transformers "
                          f"SparseEncoder folder (MLMTransformer + SpladePooling); "
                          f"{source.path} is not one")
    refused = [name for name, bad in (
        ("encode.layers / layer_combine / token_pooling",
         enc.layers or enc.layer_combine or enc.token_pooling),
        ("encode.normalize = true", enc.normalize), ("output.dimensions", out.dimensions),
        ("encode.long_text = 'chunk'", enc.long_text == "chunk"),
        ("output.granularity", out.granularity != "text"),
        ("a quantized output.precision", out.precision not in (None, "float32")),
        ("output.vector_dtype = 'float16'", out.vector_dtype != "float32"),
        ("output.rescore_precision", out.rescore_precision),
        ("input.text_pair_column", job.input.text_pair_column)) if bad]
    if job.model.forward == "fused":
        refused.append("model.forward = 'fused' (the MLM head runs in transformers' forward)")
    if refused:
        raise ConfigError(f"model folder {source.path} is a sparse (SPLADE) encoder: "
                          f"{refused[0]} does not apply to its sparse vectors; leave it unset")
    pooling = enc.pooling if enc.pooling != "auto" else f"splade-{st.sparse.pooling}"
    if pooling != f"splade-{st.sparse.pooling}":
        raise ConfigError(f"encode.pooling = {pooling!r}, but the folder's SpladePooling pools "
                          f"by {st.sparse.pooling!r}: use 'auto' or 'splade-{st.sparse.pooling}'")
    notes.append(f"sparse: {pooling} over the MLM logits, relu + log1p (the folder's "
                 f"SpladePooling)")
    dims = enc.max_active_dims or st.sparse.max_active_dims
    if dims:
        notes.append(f"at most {dims} active dimensions a row"
                     + ("" if enc.max_active_dims else " (the model folder's max_active_dims)"))
    prompt = enc.prompt
    if prompt is None and enc.prompt_name is None:  # encode_document's choice of prompt
        prompt = next((st.prompts[n] for n in ("document", "passage", "corpus")
                       if n in st.prompts), "")
    elif prompt is None:
        prompt = _prompt(None, enc.prompt_name, st, notes)
    query_prompt = enc.query_prompt
    if query_prompt is None:
        query_prompt = st.prompts.get("query", "")
    if st.sparse.query_static is not None:
        notes.append("queries: the folder's SparseStaticEmbedding (inference-free)")
    if job.index.enabled:
        notes.append("no FAISS index: search ranks sparse vectors through an inverted index")
    encode = dataclasses.replace(enc, pooling=pooling, normalize=False, prompt=prompt or None,
                                 prompt_name=None, query_prompt=query_prompt,
                                 max_active_dims=dims or None)
    model = dataclasses.replace(job.model, forward="transformers", compile=False)
    return dataclasses.replace(job, model=model, encode=encode, index=dataclasses.replace(
        job.index, enabled=False)), notes


def m3_job(job: JobConfig, source: ModelSource, notes: list[str]) -> JobConfig:
    """A multi-head (BGE-M3) folder: representations unset is dense alone (BGEM3FlagModel's
    encode returns only dense vectors unless asked, and a dense folder's layout and settings
    hash stay as they are); its dense vector is the normalized CLS token. With sparse or
    multivector asked, the heads are checked here and every setting the heads do not take is
    refused; all come from one forward (encode/m3_heads.py)."""
    enc, out, m3 = job.encode, job.output, source.m3
    asked = out.representations or ("dense",)
    missing = [r for r in asked if r not in m3.supports()]
    if missing:
        raise ConfigError(f"output.representations asks for {missing[0]}, but model folder "
                          f"{m3.path} has no {HEAD_OF[missing[0]]}")
    general = bool(enc.layers or enc.layer_combine or enc.token_pooling)
    if enc.pooling == "auto" and not general:
        enc = dataclasses.replace(enc, pooling="cls", normalize=True if enc.normalize is None
                                  else enc.normalize)
        notes.append("pooling cls, normalized (BGE-M3's dense vector)")
    representations = tuple(r for r in REPRESENTATIONS if r in asked)
    if representations == ("dense",):
        return dataclasses.replace(job, encode=enc, output=dataclasses.replace(
            out, representations=None))
    for name in representations:
        if name != "dense":
            load_head(m3, HEAD_OF[name], source.hidden_size)
    refused = [name for name, bad in (
        ("encode.pooling other than cls", enc.pooling != "cls" or general),
        ("encode.normalize = false", enc.normalize is False),
        ("encode.max_active_dims", enc.max_active_dims), ("output.dimensions", out.dimensions),
        ("encode.long_text = 'chunk'", enc.long_text == "chunk"),
        ("output.granularity", out.granularity != "text"),
        ("a quantized output.precision", out.precision not in (None, "float32")),
        ("output.vector_dtype = 'float16'", out.vector_dtype != "float32"),
        ("output.rescore_precision", out.rescore_precision),
        ("input.text_pair_column", job.input.text_pair_column),
        ("[[sink]] (sinks take dense-only folders, for now)", job.sink)) if bad]
    if job.model.forward == "fused":
        refused.append("model.forward = 'fused' (the heads take transformers' hidden states)")
    if refused:
        raise ConfigError(f"output.representations = {list(representations)} on {m3.path}: "
                          f"{refused[0]} does not apply; leave it unset or store dense alone")
    notes.append(f"representations {', '.join(representations)} from one forward "
                 f"(BGE-M3 heads: {', '.join(m3.heads)})")
    prompt = _prompt(enc.prompt, enc.prompt_name, source.st, notes)
    query_prompt = enc.query_prompt
    if query_prompt is None:
        st = source.st
        query_prompt = (st.prompts.get("query") if st and "query" in st.prompts else prompt) or ""
    index = job.index
    if "dense" not in representations and index.enabled:
        notes.append("no FAISS index: no dense vectors stored")
        index = dataclasses.replace(index, enabled=False)
    encode = dataclasses.replace(enc, pooling="cls", normalize=True, prompt=prompt or None,
                                 prompt_name=None, query_prompt=query_prompt)
    model = dataclasses.replace(job.model, forward="transformers", compile=False)
    return dataclasses.replace(job, model=model, encode=encode, index=index,
                               output=dataclasses.replace(out, representations=representations))
