"""Seeded random checkpoints made from config with transformers: for the demo, tests and
benchmarks (no weights come from a hub).

    python -m xcompile.toy llama /tmp/toy-llama            # tiny, 3 layers
    python -m xcompile.toy llama /tmp/llama-1b --size 1b   # 1.1B parameters, about 4.4 GB FP32
    python -m xcompile.toy llama /tmp/llama-1b --size 1b --context 4096   # room for long prompts
    python -m xcompile.toy llama /tmp/peaked --init-std 0.06 --peaked   # for quantized parity

Weights are drawn wider than a trained model's (init_std) so that greedy choices are decisive:
parity tests compare tokens, and a near-tie would make them flaky rather than wrong.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# what every tiny family shares unless it says otherwise: 3 layers, GQA 4/2
BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

TINY = {
    "llama": dict(
        BASE,
        tie_word_embeddings=False,
    ),
    "mistral": dict(
        BASE,
        num_key_value_heads=1,
        sliding_window=8,
        head_dim=16,
    ),
    "qwen2": dict(
        BASE,
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        BASE,  # q/k norms; a sliding window on the last two layers, shorter than the prompt
        head_dim=16,
        use_sliding_window=True,
        sliding_window=6,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        tie_word_embeddings=False,
    ),
    "granite": dict(
        BASE,  # every multiplier away from 1 (Granite 3's are 12, 0.22, 1/128, 8)
        embedding_multiplier=3.0,
        residual_multiplier=0.5,
        attention_multiplier=0.0625,
        logits_scaling=2.0,
        tie_word_embeddings=False,
    ),
    "phi3": dict(
        BASE,  # fused qkv / gate_up, partial rotary (12 of 16), longrope switching at 8 tokens
        original_max_position_embeddings=8,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
            "original_max_position_embeddings": 8,
        },
        pad_token_id=0,
        tie_word_embeddings=False,
    ),
    "gemma2": dict(
        BASE,  # soft-caps low enough to bite, windows shorter than the prompt every 2nd layer
        head_dim=16,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=0.5,
        final_logit_softcapping=2.0,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        pad_token_id=0,
    ),
    "gemma3": dict(
        BASE,  # 6 layers: transformers' default pattern, 5 sliding (window 6) then 1 full;
        # the full layers' rope scaled linearly x8 as the 4B..27B checkpoints' (local: base 10k)
        num_hidden_layers=6,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=6,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        pad_token_id=0,
    ),
    "gptj": dict(
        n_embd=64,
        n_inner=128,
        n_layer=3,
        n_head=4,
        rotary_dim=8,
        n_positions=256,
        activation_function="gelu_new",
        tie_word_embeddings=False,
    ),
}
ONE_B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    vocab_size=32000,
    tie_word_embeddings=False,
)
# Gemma 2's embedding times sqrt(hidden) and (1 + weight) norms saturate at 0.3 (one token
# repeated 16 times, which tests little); 0.05 gives varied greedy tokens
INIT_STD = {"gemma2": 0.05, "gemma3": 0.05}
CONFIGS = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "gptj": "GPTJConfig",
    "qwen3": "Qwen3Config",
    "granite": "GraniteConfig",
    "phi3": "Phi3Config",
    "gemma2": "Gemma2Config",
    "gemma3": "Gemma3TextConfig",
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained on the shipped corpus: '<s>' prepended, '</s>' is EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (Path(__file__).parent / "data" / "corpus.txt").read_text(encoding="utf-8")
    tok.train_from_iterator(corpus.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def make_checkpoint(
    family: str,
    out: str | Path,
    size: str = "tiny",
    seed: int = 0,
    init_std: float | None = None,
    peaked: bool = False,
    **overrides,
) -> Path:
    """peaked: lm_head (untied) is the embedding table scaled up, so the next token's logit
    stands far above the rest, as in a trained model (quantization tests need that: a random
    network's near-ties turn any rounding into other tokens; a trained model's margins do not)."""
    import torch
    import transformers

    out = Path(out)
    tokenizer = make_tokenizer()
    fields = dict(TINY[family]) if size == "tiny" else dict(ONE_B)
    if family == "gptj" and size != "tiny":
        raise ValueError("the 1b size is a Llama-shaped model")
    fields.setdefault("vocab_size", len(tokenizer))
    fields.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=init_std or (INIT_STD.get(family, 0.3) if size == "tiny" else 0.02),
        **overrides,
    )
    config = getattr(transformers, CONFIGS[family])(**fields)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if size == "tiny":  # norms and biases at random too, so a wrong one shows in the logits
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
    if peaked:
        if config.tie_word_embeddings:
            raise ValueError("peaked needs an untied lm_head (tie_word_embeddings=False)")
        with torch.no_grad():
            table = model.get_input_embeddings().weight
            model.get_output_embeddings().weight.copy_(table / table.std() * 2.0)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(TINY))
    parser.add_argument("out")
    parser.add_argument("--size", choices=["tiny", "1b"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--context", type=int, default=None, help="max_position_embeddings (room for long prompts)"
    )
    parser.add_argument("--init-std", type=float, default=None, help="the weights' spread")
    parser.add_argument(
        "--peaked",
        action="store_true",
        help="lm_head = the embedding table scaled: decisive next tokens, as a trained model's",
    )
    args = parser.parse_args()
    extra = {} if args.context is None else {"max_position_embeddings": args.context}
    print(
        make_checkpoint(
            args.family, args.out, args.size, args.seed, args.init_std, args.peaked, **extra
        )
    )


if __name__ == "__main__":
    main()
