"""Gemma 2: Llama's block with the embedding rows times sqrt(hidden), RMSNorm scaling by
(1 + weight), a norm after attention and after the MLP too (before each residual add), GeGLU
(tanh GELU on the gate), q·k scaled by query_pre_attn_scalar^-0.5, the attention scores and the
final logits soft-capped (cap * tanh(x / cap)), and sliding-window layers alternating with
global ones (layer_types)."""

from __future__ import annotations

from dataclasses import replace

from xcompile.frontend.decoder import DecoderSpec, WeightNames
from xcompile.frontend.llama import NAMES, TENSOR_PARALLEL, llama_like  # noqa: F401 (same layout)

ARCHITECTURES = ("Gemma2ForCausalLM",)

GEMMA2_NAMES = replace(
    NAMES,
    mlp_norm="pre_feedforward_layernorm",
    post_attn_norm="post_attention_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
)


def spec(config) -> DecoderSpec:
    from xcompile.quiet import quiet_imports

    with quiet_imports():
        from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding

    kinds = config.layer_types or ["full_attention"] * config.num_hidden_layers
    return gemma_like(config, "gemma2", kinds, GEMMA2_NAMES, Gemma2RotaryEmbedding)


def gemma_like(
    config,
    family: str,
    kinds: list[str],
    names: WeightNames,
    rotary_cls=None,
    attention_softcap: bool = True,
    **variant,
) -> DecoderSpec:
    """What Gemma 2 and 3 share; kinds: each layer's type (sliding_attention: the window);
    attention_softcap: whether the family applies attn_logit_softcapping at all."""
    cap = config.attn_logit_softcapping if attention_softcap else None
    windows = tuple(config.sliding_window if k == "sliding_attention" else None for k in kinds)
    return llama_like(
        config,
        family,
        rotary_cls,
        windows if any(windows) else (),
        names,
        embed_scale=float(config.hidden_size**0.5),
        attention_scale=float(config.query_pre_attn_scalar**-0.5),
        norm_offset=1.0,
        attn_softcap=float(cap or 0.0),
        final_softcap=float(config.final_logit_softcapping or 0.0),
        **variant,
    )
