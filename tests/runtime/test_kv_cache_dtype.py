"""The KV cache's dtype (runtime/kv_cache.py, `xrun --kv-cache`): FP32 artifacts keep an FP32
cache, BF16/INT8/INT4 ones get a BF16 cache by default. The BF16 cache follows the FP32 one within
a stated bound, everywhere a cache is used: one sequence, batched slots, beams (indirect rows),
the reference path, tensor-parallel ranks and --perplexity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import bf16_matmul_atol, run_xrun
from tests.test_cli_errors import run, user_error
from xcompile.errors import UserError
from xcompile.runtime import cli
from xcompile.runtime.arrays import BF16, F32
from xcompile.runtime.kv_cache import KV_CACHE_CHOICES, Segment, cache_dtype
from xcompile.runtime.model import Model

PROMPT = [5, 9, 13, 2, 7, 11, 4, 3]
STEPS = 12
# K/V rounded to bf16 (relative error <= 2^-9) move the logits by at most this much relative to
# their largest magnitude, on the peaked tiny model. Measured: 1.9e-3 (bf16 weights), 1.6e-3 (int8
# weights, fp32 activations); 1.1e-2 where the INT8 GEMVs quantize activations to int8 as well
# (accuracy_level 4), whose rounding steps the small K/V differences push across.
LOGITS_BOUND = {"bf16": 5e-3, "int8-exact": 5e-3, "int8": 3e-2}


def test_auto_picks_float32_for_fp32_artifacts_and_bfloat16_for_the_rest():
    assert cache_dtype("auto", "fp32") == F32
    for dtype in ("bf16", "int8", "int4"):
        assert cache_dtype("auto", dtype) == BF16
        assert cache_dtype("float32", dtype) == F32
    assert cache_dtype("bfloat16", "fp32") == BF16
    with pytest.raises(UserError, match="--kv-cache 'fp16': choose auto, float32, bfloat16"):
        cache_dtype("fp16", "bf16")
    assert cli.KV_CACHE_CHOICES == KV_CACHE_CHOICES  # the CLI's copy, checked before torch loads


def greedy_logits(model: Model, forced: list[int] | None = None):
    """Prefill PROMPT, then STEPS decode steps: greedy, or feeding `forced` tokens ->
    (tokens, logits (STEPS + 1, vocab) as a torch tensor)."""
    cache = model.new_cache(len(PROMPT) + STEPS + 1)
    logits = [model.forward(PROMPT, 0, cache, last_only=True)[-1]]
    tokens = []
    for i in range(STEPS):
        tokens.append(int(logits[-1].argmax()) if forced is None else forced[i])
        logits.append(model.forward([tokens[-1]], len(PROMPT) + i, cache)[-1])
    return tokens, torch.from_numpy(np.stack(logits))


@pytest.mark.parametrize("dtype", list(LOGITS_BOUND))
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
def test_bf16_cache_gives_the_fp32_cache_tokens_and_logits_within_bound(peaked, dtype, kernels):
    _, art = peaked("llama", dtype)
    wide = Model.load(art, use_kernels=kernels, kv_cache="float32")
    narrow = Model.load(art, use_kernels=kernels)  # auto: bfloat16 for these artifacts
    assert narrow.kv_dtype == BF16 and wide.kv_dtype == F32
    assert all(b.dtype == BF16 for b in narrow.new_cache(4).buffers.values())
    tokens, want = greedy_logits(wide)
    _, got = greedy_logits(narrow, forced=tokens)  # the same inputs at every step
    error = (got - want).abs().max(dim=-1).values  # (STEPS + 1,)
    scale = want.abs().max().item()
    assert error.max().item() <= LOGITS_BOUND[dtype] * scale, error / scale
    assert error.max().item() > 0  # the caches do differ: bf16 rounding reached the logits
    # greedy agrees wherever the fp32 cache's top-two margin exceeds twice the difference
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * error
    assert clear.sum() >= len(clear) - 2
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    assert greedy_logits(narrow)[0] == tokens  # so free-running greedy gives the same tokens


def test_bf16_cache_kernels_equal_reference_in_batched_slots_and_beams(peaked):
    """The direct path (kv_write_bf16, attention_bf16, replayed from tapes) against torch ops on
    the same bf16 cache: several sequences in slots, then beams forked and reordered."""
    _, art = peaked("llama", "bf16")
    prompts = [PROMPT, [11, 4], [3, 3, 8, 1, 6]]
    results = []
    for kernels in (True, False):
        model = Model.load(art, use_kernels=kernels)
        cache = model.new_cache(32, slots=4)
        segs = [Segment(2, 0, len(prompts[0])), Segment(0, 0, len(prompts[1]))]
        out = [model.forward_batch(segs, prompts[0] + prompts[1], cache)]
        segs = [Segment(2, len(prompts[0]), 1), Segment(3, 0, len(prompts[2]))]
        out.append(model.forward_batch(segs, [17] + prompts[2], cache))
        model.fork(cache, 3, [1], len(prompts[2]))  # slot 1 continues slot 3's prompt
        for step in range(3):  # decode 3 steps, the two beams swapping parents each time
            at = len(prompts[2]) + step
            segs = [Segment(1, at, 1), Segment(3, at, 1)]
            out.append(model.forward_batch(segs, [6 + step, 9 + step], cache))
            model.reorder(cache, [0, 3, 2, 1], at + 1)
        results.append(torch.from_numpy(np.concatenate(out)))
    atol = bf16_matmul_atol()  # the kernels' BF16 matmuls against torch's, besides the cache
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=atol)


def test_beam_search_on_the_bf16_cache_matches_the_reference_path(peaked):
    from xcompile.runtime.beam import beam_search

    _, art = peaked("llama", "int8-exact")
    fast = beam_search(Model.load(art), PROMPT, 3, 10, set())
    plain = beam_search(Model.load(art, use_kernels=False), PROMPT, 3, 10, set())
    wide = beam_search(Model.load(art, kv_cache="float32"), PROMPT, 3, 10, set())
    assert fast.tokens == plain.tokens == wide.tokens
    assert abs(fast.score - plain.score) <= 1e-4 and abs(fast.score - wide.score) <= 1e-2


def xrun_greedy(art, *extra: str) -> dict:
    args = [str(art), "--prompt", "the quick brown fox", "--max-new-tokens", "12"]
    return run_xrun([*args, "--temperature", "0", *extra])


@pytest.mark.slow  # two ranks start and load: ~20 s on two busy cores
def test_xrun_kv_cache_flag_on_one_rank_and_two(compiled, sharded):
    one = xrun_greedy(compiled("llama", "bf16"))
    assert one["kv_cache"] == "bfloat16"
    assert xrun_greedy(compiled("llama", "bf16"), "--kv-cache", "float32")["kv_cache"] == "float32"
    assert xrun_greedy(compiled("llama"))["kv_cache"] == "float32"  # FP32 artifacts: auto
    two = xrun_greedy(sharded("llama", 2, "bf16"), "--kv-cache", "bfloat16")
    assert two["ranks"] == 2 and two["kv_cache"] == "bfloat16"
    assert two["tokens"] == one["tokens"]  # rank 1 was started with the flag too


def xrun_ppl(art, path, choice: str, ctx: int, *extra: str) -> dict:
    args = [str(art), "--perplexity", str(path), "--ctx", str(ctx), "--kv-cache", choice, *extra]
    return run_xrun(args, timeout=900)


def test_perplexity_with_either_cache(compiled, tmp_path):
    """The tiny random model (perplexity ~6000, near-uniform logits): mean log-likelihoods within
    0.01 nats (measured 0.005)."""
    from tests.runtime.test_perplexity import word_text

    text = tmp_path / "text.txt"
    text.write_text(word_text(96), encoding="utf-8")
    art = compiled("llama", "bf16")
    ppl = {choice: xrun_ppl(art, text, choice, 64) for choice in ("float32", "bfloat16")}
    assert ppl["bfloat16"]["kv_cache"] == "bfloat16" and ppl["float32"]["kv_cache"] == "float32"
    assert abs(math.log(ppl["bfloat16"]["ppl"] / ppl["float32"]["ppl"])) <= 1e-2, ppl


@pytest.mark.slow  # the real model: compiled to BF16 (a minute), then 2 x 4 chunks of 512
def test_real_model_bf16_cache_perplexity_within_a_thousandth(real_compiled, tmp_path):
    """SmolLM2-135M, BF16 weights, held-out text: the BF16 cache's perplexity within 0.1 % of
    the FP32 cache's."""
    from xcompile.real_model import held_out_text

    path = tmp_path / "heldout.txt"
    path.write_text(held_out_text(), encoding="utf-8")
    art = real_compiled("bf16")
    ppl = {c: xrun_ppl(art, path, c, 512, "--chunks", "4") for c in ("float32", "bfloat16")}
    print(f"\nSmolLM2-135M BF16, 4 x 512: {json.dumps(ppl)}")
    assert abs(ppl["bfloat16"]["ppl"] / ppl["float32"]["ppl"] - 1) <= 1e-3, ppl


@pytest.mark.parametrize("value", ["fp16", "BF16", ""])
def test_bad_kv_cache_value_is_one_line(compiled, tmp_path, value):
    res = run(tmp_path, "xrun", compiled("llama"), "--prompt", "hi", "--kv-cache", value)
    user_error(res, "--kv-cache", "auto", "float32", "bfloat16")


def test_primitive_graph_reads_the_bf16_cache_widened(compiled):
    """--no-fuse artifacts: the graph's own Concat/MatMul read the cache, widened to fp32 (a copy
    per step); the same logits as the fused graph with the same cache, each within the BF16
    matmuls' tolerance of the exact products (1e-4; hi + lo's 4e-4 from avx512_bf16 on)."""
    fused = Model.load(compiled("llama", "bf16"))
    primitive = Model.load(compiled("llama", "bf16", passes=[]))
    assert primitive.kv_dtype == BF16
    tokens, want = greedy_logits(fused)
    _, got = greedy_logits(primitive, forced=tokens)
    bound = 2 * bf16_matmul_atol() * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
