"""Llama (and the families built like it): RMSNorm, half-split rotary, GQA, gated SiLU MLP.

Biases (Llama's attention_bias / mlp_bias, Qwen2's QKV biases) need no flag: a linear gets its
bias when the checkpoint has one.
"""

from __future__ import annotations

from xcompile.errors import UserError
from xcompile.frontend.decoder import ACTIVATIONS, DecoderSpec, TensorParallel, WeightNames

ARCHITECTURES = ("LlamaForCausalLM",)

NAMES = WeightNames(
    embed="model.embed_tokens.weight",
    final_norm="model.norm",
    lm_head="lm_head",
    layer="model.layers.{i}.",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
)

TENSOR_PARALLEL = TensorParallel(
    column=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
    ),
    row=("self_attn.o_proj", "mlp.down_proj"),
    vocab=("model.embed_tokens", "lm_head"),
)


def rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def rope(config, rotary_cls) -> tuple[tuple[float, ...], float]:
    """inv_freq and the cos/sin scale, computed by transformers' own rotary module for this
    config (so every static rope type it knows: default, linear, llama3, yarn, ...)."""
    require_static_rope(rope_type(config))
    rotary = rotary_cls(config=config)
    return tuple(float(f) for f in rotary.inv_freq), float(rotary.attention_scaling)


def require_static_rope(kind: str) -> None:
    """Refuse a rope type whose tables change with sequence length, or one transformers lacks."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind in ("dynamic", "longrope"):
        raise UserError(
            f"rope_type {kind!r} changes with sequence length and is not supported; "
            "use a checkpoint with a static rope type (default, linear, llama3, yarn)"
        )
    if kind != "default" and kind not in ROPE_INIT_FUNCTIONS:
        raise UserError(
            f"rope_type {kind!r} is not supported (known: default, "
            f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))}); fix config.json's rope settings"
        )


def llama_like(
    config,
    family: str,
    rotary_cls,
    windows: tuple[int | None, ...] = (),
    names: WeightNames = NAMES,
    rope_tables: tuple[tuple[float, ...], float] | None = None,
    **variant,
) -> DecoderSpec:
    """variant: DecoderSpec fields the family sets beyond Llama's (multipliers, longrope, ...);
    rope_tables: (inv_freq, scale) when the family computes them itself. The rotary dims are
    twice inv_freq's length (partial rotary when fewer than head_dim)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    act = getattr(config, "hidden_activation", None) or config.hidden_act  # Gemma's name for it
    if act not in ACTIVATIONS:
        raise UserError(
            f"activation {act!r} is not supported (supported: {', '.join(sorted(ACTIVATIONS))})"
        )
    inv_freq, scale = rope_tables or rope(config, rotary_cls)
    return DecoderSpec(
        family=family,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        max_positions=config.max_position_embeddings,
        norm="rms",
        norm_eps=config.rms_norm_eps,
        rotary="half",
        rotary_dim=2 * len(inv_freq),
        inv_freq=inv_freq,
        rotary_scale=scale,
        activation=ACTIVATIONS[act],
        names=names,
        sliding_window=windows,
        **variant,
    )


def spec(config) -> DecoderSpec:
    from xcompile.quiet import quiet_imports

    with quiet_imports():
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return llama_like(config, "llama", LlamaRotaryEmbedding)
