"""The recipe of a MultiVectorEncoder (ColBERT) folder: each row's token vectors as its
encode_document makes them (the document prompt, document_length, the skiplist, Dense,
Normalize, truncate_dim); queries as encode_query makes them. What does not apply to token
vectors is refused in one line (docs/multivector.md)."""
from __future__ import annotations

import dataclasses

from ..config import ConfigError, JobConfig
from ..config.sections import MULTIVECTOR_POOLING
from .model_files import ModelSource


def multivector_recipe(job: JobConfig, source: ModelSource, notes: list[str]
                       ) -> tuple[JobConfig, list[str]]:
    enc, out, st = job.encode, job.output, source.st
    if st is None or st.multivector is None:
        raise ConfigError(f"encode.pooling = {enc.pooling!r} needs a sentence-transformers "
                          f"MultiVectorEncoder folder (Transformer + Dense + MultiVectorMask); "
                          f"{source.path} is not one")
    if enc.pooling not in ("auto", MULTIVECTOR_POOLING):
        raise ConfigError(f"model folder {source.path} is a multi-vector (ColBERT) encoder: "
                          f"encode.pooling = {enc.pooling!r} does not apply; use 'auto' or "
                          f"'{MULTIVECTOR_POOLING}'")
    refused = [name for name, bad in (
        ("encode.layers / layer_combine / token_pooling",
         enc.layers or enc.layer_combine or enc.token_pooling),
        ("encode.normalize = true", enc.normalize),
        ("encode.max_active_dims", enc.max_active_dims),
        ("output.dimensions (the folder's truncate_dim applies)", out.dimensions),
        ("encode.long_text = 'chunk'", enc.long_text == "chunk"),
        ("output.granularity", out.granularity != "text"),
        ("a quantized output.precision", out.precision not in (None, "float32", "float16")),
        ("output.rescore_precision", out.rescore_precision),
        ("input.text_pair_column", job.input.text_pair_column),
        ("[[sink]] tables (LanceDB ranks multi-vector rows by cosine, and this folder's tokens "
         "are not of unit length: no Normalize last, or its truncate_dim cuts them)",
         job.sink and not st.multivector.unit_tokens)) if bad]
    if refused:
        raise ConfigError(f"model folder {source.path} is a multi-vector (ColBERT) encoder: "
                          f"{refused[0]} does not apply to its token vectors; leave it unset")
    spec = st.multivector
    _refuse_split_prefixes(source, spec)
    notes.append(f"multi-vector: every token's {spec.dim}-dim vector kept (the folder's Dense"
                 + (", Normalize" if spec.normalize else "")
                 + (f", truncate_dim {spec.truncate_dim}" if spec.truncate_dim else "")
                 + (f"; skiplist of {len(spec.skiplist)} words dropped from documents"
                    if spec.skiplist and "document" in spec.skiplist_tasks else "") + ")")
    prompt = enc.prompt
    if prompt is None and enc.prompt_name is None:  # encode_document's prompt
        prompt = st.prompts.get("document", "")
    elif prompt is None:
        if enc.prompt_name not in st.prompts:
            raise ConfigError(f"encode.prompt_name = {enc.prompt_name!r}: the model folder has "
                              f"prompts {sorted(st.prompts)}")
        prompt = st.prompts[enc.prompt_name]
    query_prompt = enc.query_prompt if enc.query_prompt is not None else st.prompts.get("query", "")
    if prompt:
        notes.append(f"documents prefixed {prompt!r}, queries {query_prompt!r}")
    model = job.model
    if model.max_length is None and spec.document_length:
        length = min(spec.document_length, source.position_limit)
        notes.append(f"max_length {length} (the folder's document_length)")
        model = dataclasses.replace(model, max_length=length)
    if job.index.enabled:
        notes.append("no FAISS index over rows: search ranks by MaxSim over the token vectors")
    encode = dataclasses.replace(enc, pooling=MULTIVECTOR_POOLING, normalize=False,
                                 prompt=prompt or None, prompt_name=None,
                                 query_prompt=query_prompt)
    model = dataclasses.replace(model, compile=False)
    return dataclasses.replace(job, model=model, encode=encode, index=dataclasses.replace(
        job.index, enabled=False)), notes


def _refuse_split_prefixes(source: ModelSource, spec) -> None:
    """A PyLate / Stanford prefix that the tokenizer holds as one token but splits ([unused0],
    an added "[Q] "): sentence-transformers registers it as a special token at load, so its
    vectors would differ from embedpipe's plain tokenizing; refused, never approximated."""
    if not spec.prompts:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    known = set(getattr(tokenizer, "added_tokens_encoder", None) or {}) | set(
        tokenizer.get_vocab())
    for _, value in spec.prompts:
        for prefix in ((value, value.split(None, 1)[0]) if value.split() else ()):
            if prefix not in known:
                continue
            if tokenizer.tokenize(prefix) != [prefix]:
                raise ConfigError(
                    f"model folder {source.path}: its prefix {prefix!r} is one token of its "
                    f"vocabulary that the tokenizer splits; sentence-transformers registers it as "
                    f"a special token, which embedpipe does not: save the folder with the token "
                    f"registered (MultiVectorEncoder(folder).save(...)) and run that")
            break
