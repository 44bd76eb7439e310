"""embedpipe's attention kernel, both kinds of products (AMX tiles, AVX-512 BF16), against
float64 attention computed by hand, against SDPA, inside the model (eager and compiled), and its
choice by `model.attention`. Each kind's kernel tests run only on a CPU that has it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import encoder_for, runtime_for
from pipeline.config import ConfigError
from pipeline.runtime import cpu_attention, hardware
from pipeline.runtime import runtime as runtime_mod
from pipeline.encode.batching import encode_texts
from pipeline.encode.encoder import EncoderSettings
from pipeline.encode.tokenizer import TextTokenizer

MEAN = EncoderSettings(layers=(-1,), layer_combine="concat", token_pooling="mean", normalize=True)
HERE = hardware.this_cpu()
AMX, AVX512_BF16 = HERE.amx_bf16, HERE.avx512_bf16
needs_amx = pytest.mark.skipif(not AMX, reason=f"the kernel needs a CPU with AMX bf16 ({HERE.kind} here)")
needs_avx512 = pytest.mark.skipif(not AVX512_BF16,
                                  reason=f"the kernel needs a CPU with AVX-512 BF16 ({HERE.kind} here)")
# every kind of the kernel, each run where this CPU has it
KINDS = [pytest.param("amx", marks=needs_amx), pytest.param("avx512", marks=needs_avx512)]
# the three kinds of CPU users have, made by hand: the runtime's choices are tested on each
CPUS = {"amx": hardware.cpu_with("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx512bw",
                                 "avx512vl", "avx512dq", "avx2", "fma"),
        "avx512": hardware.cpu_with("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
                                    "avx2", "fma"),
        "neither": hardware.cpu_with("avx2", "fma")}


class _Config:
    num_attention_heads, hidden_size = 12, 384


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def kernel(kind):
    cpu_attention.build()
    return cpu_attention.op(kind)


def _inputs(batch: int, length: int, heads: int, dim: int, seed: int):
    """q, k, v as transformers hands them over: (batch, heads, length, dim) views of one
    (batch, length, 3, heads, dim) projection, so positions are strided, not contiguous."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, length, 3, heads, dim, generator=gen) * 2).to(torch.bfloat16)
    return tuple(x[:, :, i].transpose(1, 2) for i in range(3))


def _reference(q, k, v, keep, scale):
    """Attention in float64 on the same bf16 inputs, written out: (batch, length, heads, dim)."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("batch, length, heads, dim", [
    (3, 1, 12, 32), (4, 7, 12, 32), (5, 16, 12, 32), (6, 17, 2, 32), (2, 31, 12, 32),
    (2, 33, 4, 32), (33, 122, 12, 32), (2, 300, 12, 32), (3, 45, 4, 64), (2, 70, 2, 128),
])
def test_kernel_matches_float64_attention_as_closely_as_sdpa(kernel, batch, length, heads, dim):
    q, k, v = _inputs(batch, length, heads, dim, seed=length * 7 + dim)
    gen = torch.Generator().manual_seed(length)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length
    keep = torch.arange(length)[None, :] < lengths[:, None]  # right padding, as collate makes it
    scale = dim ** -0.5
    with torch.inference_mode():
        ours = kernel(q, k, v, keep, scale)
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :],
                                              scale=scale).transpose(1, 2)
    exact = _reference(q, k, v, keep, scale)
    assert ours.shape == (batch, length, heads, dim) and ours.dtype == torch.bfloat16
    ours_error = (ours.double() - exact).abs().max().item()
    sdpa_error = (sdpa.double() - exact).abs().max().item()
    # bf16 output rounding is ~0.4 % of |v| (~2 here): both kernels sit at that level
    assert ours_error <= 1.25 * sdpa_error + 1e-3, (ours_error, sdpa_error)
    assert ours_error < 0.05


def test_kernel_takes_any_key_mask_not_only_right_padding(kernel):
    q, k, v = _inputs(4, 50, 12, 32, seed=1)
    gen = torch.Generator().manual_seed(2)
    keep = torch.rand(4, 50, generator=gen) < 0.6
    keep[:, 0] = True  # every query keeps at least one key
    with torch.inference_mode():
        ours = kernel(q, k, v, keep, 0.2)
    exact = _reference(q, k, v, keep, 0.2)
    assert (ours.double() - exact).abs().max().item() < 0.05
    # a masked key's value changes nothing
    v2 = v.clone()
    v2[~keep[:, None, :, None].expand_as(v)] = 100.0
    with torch.inference_mode():
        assert torch.equal(kernel(q, k, v2, keep, 0.2), ours)


def test_kernel_leaves_pytorchs_own_kernels_working(kernel):
    """The tile configuration is per thread and PyTorch's brgemm caches it: SDPA's bf16 flash
    kernel and a bf16 oneDNN product must give the same bits after the kernel ran as before (the
    AVX-512 kind touches no tile state; it must not disturb them either)."""
    q, k, v = _inputs(8, 100, 12, 32, seed=3)
    a = torch.randn(256, 384).to(torch.bfloat16)
    w = torch.randn(1536, 384).to(torch.bfloat16)
    with torch.inference_mode():
        sdpa_before = F.scaled_dot_product_attention(q, k, v)
        linear_before = F.linear(a, w)
        for _ in range(3):
            kernel(q, k, v, torch.ones(8, 100, dtype=torch.bool), 0.17)
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), sdpa_before)
        assert torch.equal(F.linear(a, w), linear_before)


def test_inputs_the_kernel_does_not_take_go_to_sdpa(kernel, kind):
    q, k, v = (t.float() for t in _inputs(2, 9, 4, 32, seed=4))
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 6:] = False
    module = torch.nn.Module().eval()
    forward = {"amx": cpu_attention.attention_forward,
               "avx512": cpu_attention.avx512_attention_forward}[kind]
    with torch.inference_mode():
        out, _ = forward(module, q, k, v, keep, scaling=0.3)
    exact = _reference(q, k, v, keep, 0.3)
    assert out.dtype == torch.float32
    assert (out.double() - exact).abs().max().item() < 1e-5


def test_kernel_and_attention_names():
    assert cpu_attention.transformers_name("amx") == cpu_attention.ATTENTION == "embedpipe_amx"
    assert cpu_attention.transformers_name("avx512") == "embedpipe_avx512"
    assert cpu_attention.transformers_name("sdpa") == "sdpa"


@pytest.mark.parametrize("compile, forward", [(False, "transformers"), (False, "fused"),
                                              (True, "transformers")])
def test_model_with_the_kernel_matches_sdpa_and_float32(bundled_model, mixed_texts, kind, compile,
                                                        forward):
    """In transformers' model (eager and compiled) and in embedpipe's fused forward."""
    tokenizer = TextTokenizer(bundled_model.path, bundled_model.max_length)

    def encode(encoder):
        return encode_texts(tokenizer, encoder, mixed_texts, 4096, 256)

    kernel = encoder_for(bundled_model, "cpu", "bfloat16", MEAN, compile=compile, attention=kind,
                         forward=forward)
    assert kernel.attention == kind and kernel.runtime.forward == forward
    if forward == "fused":
        assert kernel.model.kernel is cpu_attention.op(kind)
    else:
        model = getattr(kernel.model, "_orig_mod", kernel.model)
        assert model.config._attn_implementation == cpu_attention.transformers_name(kind)
    ours = encode(kernel)
    sdpa = encode(encoder_for(bundled_model, "cpu", "bfloat16", MEAN, attention="sdpa",
                              forward=forward))
    fp32 = encode(encoder_for(bundled_model, "cpu", "float32", MEAN))
    cos = lambda a, b: (a * b).sum(1)  # noqa: E731 (normalised vectors)
    assert cos(ours, fp32).min() >= 0.9995
    assert cos(ours, sdpa).min() >= 0.9999
    assert not np.array_equal(ours, sdpa)  # it really ran another kernel


@pytest.mark.skipif(not AVX512_BF16, reason="a CPU with AMX or AVX-512 BF16")
def test_auto_attention_is_the_kernel_for_bf16_on_this_cpu(bundled_model):
    """On real hardware: AMX products on an AMX CPU, else the AVX-512 BF16 ones."""
    assert runtime_for(bundled_model, "cpu", "bfloat16", "auto").attention == ("amx" if AMX else "avx512")
    assert runtime_for(bundled_model, "cpu", "float32", "auto").attention == "sdpa"
    assert runtime_for(bundled_model, "cpu", "bfloat16", "sdpa").attention == "sdpa"


@pytest.mark.parametrize("cpu, expected", [("amx", "amx"), ("avx512", "avx512"), ("neither", "sdpa")])
def test_auto_attention_follows_the_cpu(bundled_model, cpu, expected):
    """On every machine: a CPU made by hand is planned for, and nothing is built for it."""
    assert runtime_for(bundled_model, "cpu", "bfloat16", "auto", cpu=CPUS[cpu]).attention == expected
    assert runtime_for(bundled_model, "cpu", "float32", "auto", cpu=CPUS[cpu]).attention == "sdpa"


@pytest.mark.parametrize("cpu, refused, reason", [
    ("avx512", "amx", "no AMX"), ("neither", "amx", "no AMX"),
    ("neither", "avx512", "no AVX-512 BF16"), ({"avx512f", "avx512_bf16"}, "avx512", "no AVX-512 BF16"),
])
def test_a_kernel_the_cpu_lacks_is_refused(bundled_model, cpu, refused, reason):
    cpu = CPUS[cpu] if isinstance(cpu, str) else hardware.Cpu(frozenset(cpu))
    with pytest.raises(ConfigError, match=f"'{refused}' cannot run here: .*{reason}"):
        runtime_for(bundled_model, "cpu", "bfloat16", refused, cpu=cpu)


@pytest.mark.parametrize("kind", cpu_attention.KINDS)
def test_kernel_attention_in_float32_is_refused(bundled_model, kind):
    with pytest.raises(ConfigError, match="bfloat16 on CPU only"):
        runtime_for(bundled_model, "cpu", "float32", kind)


def test_a_worker_without_the_planned_kernel_refuses_the_run(bundled_model, monkeypatch):
    planned = runtime_for(bundled_model, "cpu", "bfloat16", "avx512", forward="transformers",
                          cpu=CPUS["avx512"])
    assert planned.attn_implementation == "embedpipe_avx512"
    if AVX512_BF16:
        runtime_mod.check_here(planned, bundled_model)  # this machine can
    monkeypatch.setattr(hardware, "this_cpu", lambda: CPUS["neither"])  # the worker's CPU
    with pytest.raises(ConfigError, match="planned with attention 'avx512'.*no AVX-512 BF16"):
        runtime_mod.check_here(planned, bundled_model)


@pytest.mark.parametrize("kind", cpu_attention.KINDS)
@pytest.mark.parametrize("changes, reason", [
    ({"num_attention_heads": 8}, "head width 48"),
    ({"is_decoder": True}, "bidirectional"),
])
def test_kernel_refuses_models_it_does_not_compute(kind, changes, reason):
    config = _Config()
    for key, value in changes.items():
        setattr(config, key, value)
    assert reason in cpu_attention.unsupported_reason(torch.device("cpu"), "bfloat16", config, kind,
                                                      CPUS["amx"])
