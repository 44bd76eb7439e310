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
from .model_files import ModelSource
from .st_folder import StFolder


def resolve_recipe(job: JobConfig, source: ModelSource) -> tuple[JobConfig, list[str]]:
    """(the job with its encoding settings made concrete, one note per choice: where it came
    from, for the summary)."""
    enc, st = job.encode, source.st
    notes = []
    pooling, normalize = enc.pooling, enc.normalize
    general = bool(enc.layers or enc.layer_combine or enc.token_pooling)
    follow_folder = pooling == "auto" and not general  # the folder's pooling and Normalize
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
