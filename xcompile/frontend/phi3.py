"""Phi-3 (and Phi-4-mini): Llama's block with the checkpoint's fused linears, qkv_proj (rows:
q heads*d, k kv*d, v kv*d) and gate_up_proj (rows: gate, then up), read as Llama's q/k/v and
gate/up row views (so the passes' QKV and gate/up fusions, the TP table and the quantizers see
Llama's linears); partial rotary; `longrope` scaling: short factors while a forward's longest
position + 1 stays within original_max_position_embeddings, long factors past it."""

from __future__ import annotations

from dataclasses import replace

from xcompile.artifacts import TensorInfo
from xcompile.errors import UserError
from xcompile.frontend.checkpoint import row_views
from xcompile.frontend.decoder import DecoderSpec
from xcompile.frontend.llama import NAMES, TENSOR_PARALLEL, llama_like, rope_type  # noqa: F401

ARCHITECTURES = ("Phi3ForCausalLM",)

QKV = ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
GATE_UP = ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))
PHI3_NAMES = replace(NAMES, fused=(QKV, GATE_UP))


def tensor_views(config: dict, tensors: dict[str, TensorInfo]) -> dict[str, tuple[str, TensorInfo]]:
    """The q/k/v and gate/up weights as row ranges of each layer's fused tensors."""
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    views = {}
    for name, info in tensors.items():
        if name.endswith(QKV[0] + ".weight"):
            d = info.shape[0] // (heads + 2 * kv)
            rows = (heads * d, kv * d, kv * d)
        elif name.endswith(GATE_UP[0] + ".weight"):
            rows = (info.shape[0] // 2,) * 2
        else:
            continue
        fused, parts = QKV if QKV[0] in name else GATE_UP
        prefix = name[: -len(fused + ".weight")]
        views.update(row_views(info, [prefix + p + ".weight" for p in parts], rows))
    return views


def spec(config) -> DecoderSpec:
    from xcompile.quiet import quiet_imports

    with quiet_imports():
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    if rope_type(config) != "longrope":
        return llama_like(config, "phi3", Phi3RotaryEmbedding, _window(config), PHI3_NAMES)
    params = config.rope_parameters
    switch = int(
        params.get("original_max_position_embeddings")
        or getattr(config, "original_max_position_embeddings", 0)
    )
    if switch <= 0:
        raise UserError(
            "longrope needs original_max_position_embeddings; add it to config.json's rope settings"
        )
    # the two sets as transformers computes them: short (its rotary module's own), and long
    # (what longrope_frequency_update takes for a sequence past the switch); one cos/sin scale
    rotary = Phi3RotaryEmbedding(config=config)
    long_inv, _ = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=switch + 1)
    return llama_like(
        config,
        "phi3",
        Phi3RotaryEmbedding,
        _window(config),
        PHI3_NAMES,
        rope_tables=(tuple(float(f) for f in rotary.inv_freq), float(rotary.attention_scaling)),
        long_inv_freq=tuple(float(f) for f in long_inv),
        rope_switch=switch,
    )


def _window(config) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    return (window,) * config.num_hidden_layers if window else ()
