"""The general case, not the example: config variants each family's users meet, compiled and
held to transformers' greedy tokens and logits."""

from __future__ import annotations

import pytest
import torch

from tests.runtime.test_parity import PROMPT, hf_greedy
from xcompile.quantize import quantize
from xcompile.runtime.generate import generate
from xcompile.runtime.model import Model
from xcompile.runtime.sampling import Sampler, SamplingParams
from xcompile.runtime.tokenizer import TextTokenizer
from xcompile.toy import TINY, make_checkpoint

VARIANTS = {
    "llama-biases-llama3-rope": (
        "llama",
        dict(
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "llama-mha-tied-headdim32": (
        "llama",
        dict(num_key_value_heads=4, head_dim=32, tie_word_embeddings=True),
    ),
    "qwen2-sliding-window": (
        "qwen2",
        dict(
            use_sliding_window=True,
            sliding_window=6,
            max_window_layers=1,
            layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        ),
    ),
    "gptj-full-rotary-gelu": ("gptj", dict(rotary_dim=16, activation_function="gelu")),
    "qwen3-biases-full-attention-tied": (
        "qwen3",
        dict(
            attention_bias=True,
            use_sliding_window=False,
            layer_types=["full_attention"] * 3,
            tie_word_embeddings=True,
        ),
    ),
    "granite-tied-multipliers-below-one": (
        "granite",
        dict(
            embedding_multiplier=0.5,
            residual_multiplier=0.25,
            attention_multiplier=0.2,
            logits_scaling=0.5,
            tie_word_embeddings=True,
        ),
    ),
    # the prompt stays within the switch; the decode step at position 30 crosses it, where
    # transformers re-runs the whole sequence with the long factors (and so must we)
    "phi3-longrope-switch-during-decode": (
        "phi3",
        dict(
            original_max_position_embeddings=30,
            rope_parameters=dict(
                TINY["phi3"]["rope_parameters"], original_max_position_embeddings=30
            ),
        ),
    ),
    # the config fields a Gemma 3 may set that the toy leaves alone: soft-caps (the final one
    # applied; the attention one stored but not applied by transformers' Gemma 3, so not by us),
    # a 1:1 sliding_window_pattern that transformers turns into layer_types, unscaled global
    # rope, tied embeddings
    "gemma3-softcaps-pattern-2": (
        "gemma3",
        dict(
            num_hidden_layers=4,
            sliding_window_pattern=2,
            attn_logit_softcapping=0.5,
            final_logit_softcapping=2.0,
            rope_scaling=None,
            tie_word_embeddings=True,
        ),
    ),
    "phi3-default-rope-sliding-window-mha": (
        "phi3",
        dict(rope_parameters=None, sliding_window=6, num_key_value_heads=4),
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_transformers(variant, tmp_path):
    from transformers import AutoModelForCausalLM

    family, overrides = VARIANTS[variant]
    ckpt = make_checkpoint(family, tmp_path / "ckpt", seed=3, **overrides)
    art = tmp_path / "art"
    quantize(ckpt, art, "fp32", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model = Model.load(art)
    ids = TextTokenizer(art).encode(PROMPT)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    ours = torch.from_numpy(model.forward(ids, 0, model.new_cache(len(ids))))
    assert (ours - theirs).abs().max().item() <= 1e-4
    result = generate(model, ids, 16, Sampler(SamplingParams()), eos_ids=set())
    assert result.tokens == hf_greedy(hf, ids, 16)


def test_half_precision_sharded_checkpoint(tmp_path):
    """An FP16 checkpoint split into shards with an index: compiled to FP32 it gives the logits
    transformers gives on the same FP16 weights upcast."""
    from transformers import AutoModelForCausalLM

    ckpt = make_checkpoint("llama", tmp_path / "fp32", seed=5)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float16)
    hf.save_pretrained(tmp_path / "fp16", max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "fp16" / f).write_bytes((ckpt / f).read_bytes())
    assert (tmp_path / "fp16" / "model.safetensors.index.json").is_file()
    quantize(tmp_path / "fp16", tmp_path / "art", "fp32", progress=False)
    model = Model.load(tmp_path / "art")
    ids = TextTokenizer(tmp_path / "art").encode(PROMPT)
    ours = torch.from_numpy(model.forward(ids, 0, model.new_cache(len(ids))))
    ref = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp16", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_sampling_is_seeded_and_respects_top_k(compiled):
    art = compiled("llama")
    model = Model.load(art)
    ids = TextTokenizer(art).encode(PROMPT)

    def sample(seed, **kw):
        params = SamplingParams(temperature=1.0, seed=seed, **kw)
        return generate(model, ids, 12, Sampler(params), eos_ids=set()).tokens

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    greedy = generate(model, ids, 12, Sampler(SamplingParams()), eos_ids=set()).tokens
    assert sample(7, top_k=1) == greedy  # top-1 sampling is greedy
    assert sample(9, top_p=1e-6) == greedy  # so is a vanishing nucleus


def test_eos_stops_generation(compiled):
    art = compiled("llama")
    model = Model.load(art)
    ids = TextTokenizer(art).encode(PROMPT)
    greedy = generate(model, ids, 8, Sampler(SamplingParams()), eos_ids=set()).tokens
    stopped = generate(model, ids, 8, Sampler(SamplingParams()), eos_ids={greedy[3]})
    assert stopped.tokens == greedy[: greedy.index(greedy[3]) + 1]
    assert stopped.finish_reason == "stop"
