"""GPT-J: parallel residual (attention and MLP read the same LayerNorm output), partial
interleaved rotary (rotate_every_two on the first rotary_dim of each head), biased MLP and
lm_head, plain GELU MLP."""

from __future__ import annotations

from xcompile.errors import UserError
from xcompile.frontend.decoder import ACTIVATIONS, DecoderSpec, TensorParallel, WeightNames

ARCHITECTURES = ("GPTJForCausalLM",)

NAMES = WeightNames(
    embed="transformer.wte.weight",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    layer="transformer.h.{i}.",
    attn_norm="ln_1",
    mlp_norm=None,  # parallel residual
    q="attn.q_proj",
    k="attn.k_proj",
    v="attn.v_proj",
    o="attn.out_proj",
    up="mlp.fc_in",
    down="mlp.fc_out",
)

TENSOR_PARALLEL = TensorParallel(
    column=("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in"),
    row=("attn.out_proj", "mlp.fc_out"),
    vocab=("transformer.wte", "lm_head"),
)


def spec(config) -> DecoderSpec:
    import torch

    head_dim = config.n_embd // config.n_head
    rotary_dim = config.rotary_dim or head_dim
    if config.activation_function not in ACTIVATIONS:
        raise UserError(
            f"activation {config.activation_function!r} is not supported "
            f"(supported: {', '.join(sorted(ACTIVATIONS))})"
        )
    # as transformers' create_sinusoidal_positions computes it
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
    return DecoderSpec(
        family="gptj",
        layers=config.n_layer,
        hidden=config.n_embd,
        heads=config.n_head,
        kv_heads=config.n_head,
        head_dim=head_dim,
        vocab=config.vocab_size,
        max_positions=config.n_positions,
        norm="layer",
        norm_eps=config.layer_norm_epsilon,
        rotary="interleaved",
        rotary_dim=rotary_dim,
        inv_freq=tuple(float(f) for f in inv_freq),
        rotary_scale=1.0,
        activation=ACTIVATIONS[config.activation_function],
        names=NAMES,
    )
