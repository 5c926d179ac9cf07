"""TP=2 against TP=1 on the same weights: the same greedy tokens, with both backends."""

from __future__ import annotations

import pytest

from tests.conftest import run_xrun, torchrun

PROMPT = "The quick brown fox jumps over the lazy dog and then"
TP_FAMILIES = ["llama", "qwen2", "gptj"]  # GQA; 2 KV heads and QKV biases; parallel residual


def greedy(art, launcher=None, extra=()):
    return run_xrun([str(art), "--prompt", PROMPT, "--max-new-tokens", "16",
                     "--temperature", "0", *extra], launcher)


@pytest.mark.parametrize("family", TP_FAMILIES)
def test_tp2_torch_backend_gives_tp1_tokens(family, compiled, sharded):
    one = greedy(compiled(family))
    two = greedy(sharded(family), torchrun(2), ["--backend", "torch"])
    assert two["ranks"] == 2 and one["ranks"] == 1
    assert two["tokens"] == one["tokens"]
    assert len(one["tokens"]) == 16 or one["finish_reason"] == "stop"


def test_rank_files_hold_only_their_slices(compiled, sharded):
    from xcompile.artifacts import read_safetensors_header

    single = read_safetensors_header(compiled("llama") / "rank0.safetensors")
    total = sum(t.nbytes for t in single.values())
    replicated = sum(t.nbytes for n, t in single.items() if n.endswith("norm.weight"))
    for r in range(2):
        shard = read_safetensors_header(sharded("llama") / f"rank{r}.safetensors")
        assert sum(t.nbytes for t in shard.values()) == (total - replicated) // 2 + replicated
        assert shard.keys() == single.keys()


@pytest.mark.parametrize("dtype,scheme", [("int8", None), ("int4", (4, 16, False))],
                         ids=["int8-per-channel", "int4-asym-g16"])
def test_tp2_quantized_gives_tp1_tokens(dtype, scheme, checkpoint, tmp_path):
    """Row-parallel MatMulNBits split by blocks (INT4 groups) or re-padded per channel (INT8)."""
    from xcompile.quantize import quantize
    from xcompile.shard import shard
    from xcompile.weight_only import WeightOnly

    single = tmp_path / "single"
    quantize(checkpoint("llama"), single, dtype, progress=False,
             scheme=WeightOnly(*scheme) if scheme else None)
    shard(single, 2, tmp_path / "tp2", progress=False)
    one = greedy(single)
    two = greedy(tmp_path / "tp2", torchrun(2), ["--backend", "torch"])
    assert two["tokens"] == one["tokens"]
