"""IBM Granite (3.x): Llama's block with four multipliers: the embedding rows times
embedding_multiplier, attention's and the MLP's outputs times residual_multiplier before each
residual add, attention_multiplier as the q·k scale (instead of head_dim^-0.5), and the logits
divided by logits_scaling."""

from __future__ import annotations

from xcompile.frontend.decoder import DecoderSpec
from xcompile.frontend.llama import TENSOR_PARALLEL, llama_like  # noqa: F401 (same layout)

ARCHITECTURES = ("GraniteForCausalLM",)


def spec(config) -> DecoderSpec:
    from xcompile.quiet import quiet_imports

    with quiet_imports():
        from transformers.models.granite.modeling_granite import GraniteRotaryEmbedding

    return llama_like(
        config,
        "granite",
        GraniteRotaryEmbedding,
        embed_scale=float(config.embedding_multiplier),
        residual_scale=float(config.residual_multiplier),
        attention_scale=float(config.attention_multiplier),
        logits_divisor=float(config.logits_scaling),
    )
