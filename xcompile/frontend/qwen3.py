"""Qwen3: Qwen2's block without the QKV biases, and an RMSNorm over each head's query and key
(q_norm, k_norm, weights (head_dim,)) before rotary."""

from __future__ import annotations

from dataclasses import replace

from xcompile.frontend.decoder import DecoderSpec
from xcompile.frontend.llama import NAMES, TENSOR_PARALLEL, llama_like  # noqa: F401 (same layout)
from xcompile.frontend.qwen2 import windows

ARCHITECTURES = ("Qwen3ForCausalLM",)


def spec(config) -> DecoderSpec:
    from xcompile.quiet import quiet_imports

    with quiet_imports():
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    names = replace(NAMES, q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
    return llama_like(config, "qwen3", Qwen3RotaryEmbedding, windows(config), names)
