"""Mistral: Llama's block with a sliding attention window on every layer."""

from __future__ import annotations

from xcompile.frontend.decoder import DecoderSpec
from xcompile.frontend.llama import TENSOR_PARALLEL, llama_like  # noqa: F401 (same layout)

ARCHITECTURES = ("MistralForCausalLM",)


def spec(config) -> DecoderSpec:
    from xcompile.quiet import quiet_imports

    with quiet_imports():
        from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding

    window = getattr(config, "sliding_window", None)
    return llama_like(
        config,
        "mistral",
        MistralRotaryEmbedding,
        (window,) * config.num_hidden_layers if window else (),
    )
