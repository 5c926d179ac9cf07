"""Qwen2: Llama's block with Q/K/V biases and a sliding window on the layers its config marks."""

from __future__ import annotations

from xcompile.frontend.decoder import DecoderSpec
from xcompile.frontend.llama import TENSOR_PARALLEL, llama_like  # noqa: F401 (same layout)

ARCHITECTURES = ("Qwen2ForCausalLM",)


def spec(config) -> DecoderSpec:
    from xcompile.quiet import quiet_imports

    with quiet_imports():
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    return llama_like(config, "qwen2", Qwen2RotaryEmbedding, windows(config))


def windows(config) -> tuple[int | None, ...]:
    """The sliding window of each layer its config marks (layer_types), or () for none."""
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = config.sliding_window if getattr(config, "use_sliding_window", False) else None
    found = tuple(window if kind == "sliding_attention" else None for kind in kinds)
    return found if any(w is not None for w in found) else ()
