"""Gemma 3 text (Gemma3ForCausalLM): Gemma 2's block (embedding x sqrt(hidden), (1 + weight)
RMSNorm, norms after attention and the MLP, GeGLU, query_pre_attn_scalar, soft-caps where the
config sets them) with Qwen3's RMSNorm on each head's query and key (here (1 + weight) too), and
local layers that rotate with their own tables: layer_types (transformers derives it from
sliding_window_pattern, 5 sliding layers then 1 full) says which layers have the sliding window,
and rope_parameters["sliding_attention"] (rope_local_base_freq, unscaled) their rotary, while the
full layers take rope_parameters["full_attention"] (rope_theta, and the checkpoint's scaling).
attn_logit_softcapping is read from the config but never applied by transformers' Gemma 3
attention (it does not hand it to the attention function), so it is not applied here either;
final_logit_softcapping is."""

from __future__ import annotations

from dataclasses import replace

from xcompile.errors import UserError
from xcompile.frontend.decoder import DecoderSpec
from xcompile.frontend.gemma2 import GEMMA2_NAMES, gemma_like
from xcompile.frontend.llama import TENSOR_PARALLEL, require_static_rope  # noqa: F401

ARCHITECTURES = ("Gemma3ForCausalLM",)
# what Checkpoint.open says for an architecture of this family it does not compile
REFUSED = {
    "Gemma3ForConditionalGeneration": (
        "a vision tower and multimodal projector xcompile does not compile; use a text-only "
        "Gemma3ForCausalLM checkpoint (such as gemma-3-1b)"
    ),
}
LAYER_TYPES = ("sliding_attention", "full_attention")


def spec(config) -> DecoderSpec:
    from xcompile.quiet import quiet_imports

    with quiet_imports():
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    if getattr(config, "use_bidirectional_attention", False):
        raise UserError(
            "use_bidirectional_attention (an encoder's mask) is not supported; "
            "set it false for causal generation"
        )
    kinds = list(config.layer_types)
    unknown = sorted(set(kinds) - set(LAYER_TYPES))
    if unknown:
        raise UserError(f"layer_types {unknown} not supported (known: {', '.join(LAYER_TYPES)})")
    for kind in set(kinds):
        require_static_rope(config.rope_parameters[kind].get("rope_type", "default"))
    rotary = Gemma3RotaryEmbedding(config=config)
    tables = {
        kind: (
            tuple(float(f) for f in getattr(rotary, f"{kind}_inv_freq")),
            float(getattr(rotary, f"{kind}_attention_scaling")),
        )
        for kind in set(kinds)
    }
    full = tables.get("full_attention") or tables["sliding_attention"]
    local = tables.get("sliding_attention", full)
    return gemma_like(
        config,
        "gemma3",
        kinds,
        replace(GEMMA2_NAMES, q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
        rope_tables=full,
        attention_softcap=False,
        **({} if local == full else dict(local_inv_freq=local[0], local_rotary_scale=local[1])),
    )
