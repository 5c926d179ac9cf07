"""The runtime against transformers on the same seeded weights: greedy tokens and logits."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import FAMILIES, bf16_matmul_atol
from xcompile.runtime.generate import generate
from xcompile.runtime.model import Model
from xcompile.runtime.sampling import Sampler, SamplingParams
from xcompile.runtime.tokenizer import TextTokenizer

PROMPT = "The quick brown fox jumps over the lazy dog and then"


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


GRAPHS = {"fused": None, "primitive": []}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("graph", sorted(GRAPHS))
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
def test_fp32_greedy_tokens_equal_transformers(family, graph, kernels, compiled, hf_model):
    art = compiled(family, passes=GRAPHS[graph])
    model = Model.load(art, use_kernels=kernels)
    ids = TextTokenizer(art).encode(PROMPT)
    result = generate(model, ids, 16, Sampler(SamplingParams()), eos_ids=set())
    assert result.tokens == hf_greedy(hf_model(family), ids, 16)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("graph", sorted(GRAPHS))
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
def test_fp32_prefill_logits_within_1e4(family, graph, kernels, compiled, hf_model):
    art = compiled(family, passes=GRAPHS[graph])
    model = Model.load(art, use_kernels=kernels)
    ids = TextTokenizer(art).encode(PROMPT)
    cache = model.new_cache(len(ids) + 1)
    ours = torch.from_numpy(model.forward(ids, 0, cache))
    with torch.no_grad():
        theirs = hf_model(family)(torch.tensor([ids])).logits[0]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    # and a decode step on top of the cache
    nxt = int(ours[-1].argmax())
    step = torch.from_numpy(model.forward([nxt], len(ids), cache))
    with torch.no_grad():
        full = hf_model(family)(torch.tensor([ids + [nxt]])).logits[0, -1]
    assert (step[-1] - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "family", ["llama", "gptj", "qwen3", "granite", "phi3", "gemma2", "gemma3"]
)
def test_bf16_logits_close_to_transformers_bf16(family, compiled, hf_model):
    """BF16 artifacts keep activations in FP32 with BF16 matrices. Against transformers on the
    same BF16-rounded weights in FP32 they agree to 1e-4; against transformers run fully in
    BF16 (every activation rounded to 8 bits of mantissa too) the largest difference stays
    within 10 % of the largest logit and the mean within 1.5 %."""
    art = compiled(family, "bf16")
    model = Model.load(art, kv_cache="float32")  # transformers' FP32 run keeps an FP32 cache
    ids = TextTokenizer(art).encode(PROMPT)
    ours = torch.from_numpy(model.forward(ids, 0, model.new_cache(len(ids))))
    hf32 = hf_model(family)
    rounded = type(hf32)(hf32.config).eval()
    rounded.load_state_dict(hf32.state_dict())
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() >= 2:
                p.copy_(p.to(torch.bfloat16).float())
        same_weights = rounded(torch.tensor([ids])).logits[0]
        bf16 = hf_model(family, torch.bfloat16)(torch.tensor([ids])).logits[0].float()
    scale = max(1.0, same_weights.abs().max().item())
    assert (ours - same_weights).abs().max().item() <= bf16_matmul_atol(scale)
    scale = bf16.abs().max().item()
    diff = (ours - bf16).abs()
    print(
        f"bf16 vs transformers-bf16: max {diff.max():.4f} mean {diff.mean():.4f} scale {scale:.3f}"
    )
    assert diff.max().item() <= 0.10 * scale
    assert diff.mean().item() <= 0.015 * scale


def test_bf16_weights_are_half_the_fp32_size(compiled):
    fp32 = (compiled("llama") / "rank0.safetensors").stat().st_size
    bf16 = (compiled("llama", "bf16") / "rank0.safetensors").stat().st_size
    assert 0.49 <= bf16 / fp32 <= 0.52


def test_bf16_generates_requested_tokens(compiled):
    art = compiled("llama", "bf16")
    model = Model.load(art)
    ids = TextTokenizer(art).encode(PROMPT)
    result = generate(model, ids, 12, Sampler(SamplingParams()), eos_ids=set())
    assert len(result.tokens) == 12


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_artifacts_under_onnxruntime_agree_with_xrun(family, compiled):
    """The fused graph means what it says: onnxruntime runs it with its own com.microsoft
    kernels (and the SiluMul function body) and gets the logits xrun gets."""
    from tests.passes.conftest import IDS, run_ort

    art = compiled(family)
    prefill, step = run_ort(art, IDS, steps=1)
    model = Model.load(art)
    cache = model.new_cache(len(IDS) + 1)
    ours = torch.from_numpy(model.forward(IDS, 0, cache))
    assert (ours - torch.from_numpy(prefill["logits"][0])).abs().max().item() <= 1e-4
    ours = torch.from_numpy(model.forward([5], len(IDS), cache))
    assert (ours - torch.from_numpy(step["logits"][0])).abs().max().item() <= 1e-4


def test_soft_capped_attention_runs_on_the_kernel(compiled, hf_model, monkeypatch):
    """Gemma 2's soft-capped GroupQueryAttention goes to csrc/attention.cpp (its softcap), never
    to a reference (torch's or numpy's): with the references made to fail, prefill and a decode
    step still give transformers' logits."""
    from xcompile.runtime import fallback_ops, kernels, reference_attention

    def refuse(*_, **__):
        raise AssertionError("soft-capped attention ran on the reference")

    for module in (fallback_ops, kernels, reference_attention):
        monkeypatch.setattr(module, "attention_reference", refuse)
    art = compiled("gemma2")
    model = Model.load(art)
    ids = TextTokenizer(art).encode(PROMPT)
    cache = model.new_cache(len(ids) + 1)
    ours = torch.from_numpy(model.forward(ids, 0, cache))
    step = torch.from_numpy(model.forward([int(ours[-1].argmax())], len(ids), cache))
    with torch.no_grad():
        full = hf_model("gemma2")(torch.tensor([ids + [int(ours[-1].argmax())]])).logits[0]
    assert (ours - full[:-1]).abs().max().item() <= 1e-4
    assert (step[-1] - full[-1]).abs().max().item() <= 1e-4
