"""The real model (SmolLM2-135M-Instruct, xcompile/real_model.py): what random weights cannot
show. FP32 and BF16 artifacts answer a chat question with transformers' own greedy tokens; the
quantized formats keep its perplexity on held-out text close to FP32's."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_xrun

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TOKENS = 12


@pytest.fixture(scope="module")
def hf_answer(real_model):
    """transformers' greedy tokens for QUESTION through the tokenizer's chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_model)
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=TOKENS, do_sample=False)
    return out[0, ids.shape[1] :].tolist(), tok.decode(out[0, ids.shape[1] :])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_chat_answer_is_transformers_greedy(dtype, real_compiled, hf_answer, tmp_path):
    tokens, text = hf_answer
    assert "Paris" in text  # the model itself knows; a broken checkpoint would not
    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps(QUESTION))
    ours = run_xrun(
        [str(real_compiled(dtype)), "--messages", str(messages), "--max-new-tokens", str(TOKENS)]
    )
    # EOS may end ours first: compare what both produced
    assert ours["tokens"] == tokens[: len(ours["tokens"])] and len(ours["tokens"]) >= 6, (
        ours,
        text,
    )
    assert "Paris" in ours["text"]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    from xcompile.real_model import held_out_text

    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text(held_out_text(), encoding="utf-8")
    return path


def ppl(artifacts, text) -> float:
    return run_xrun([str(artifacts), "--perplexity", str(text), "--chunks", "8"])["ppl"]


@pytest.mark.parametrize(
    "dtype,bound",
    [
        # measured on 16 chunks beside llama.cpp (benchmarks/quality.py): int8 +0.47 %, Q8_0
        # +0.63 %; the int4 recipe +0.8 %, Q4_K_M +8.1 %. Random or broken weights land far
        # outside (the old g128 RTN default lost +83 % on 4 chunks). int8 activations make the
        # figure jitter with the summation order: on these 8 chunks +0.69 % (VNNI) and +0.82 %
        # (AMX tiles), where 4 chunks gave +0.64 % and +1.11 %; 16 give +0.47 % and +0.52 %
        ("int8", 0.015),
        ("int4", 0.03),
    ],
)
def test_quantized_perplexity_stays_near_fp32(dtype, bound, real_compiled, held_out):
    fp32, quantized = ppl(real_compiled("fp32"), held_out), ppl(real_compiled(dtype), held_out)
    assert quantized / fp32 - 1 < bound, (dtype, quantized, fp32)


def test_int4_recipe_stores_less_than_q4_k_m_allows(real_compiled):
    """The weights file of the int4 recipe within 1.15 x llama.cpp's Q4_K_M of the same model
    (105,453,984 bytes, llama-quantize of this checkpoint's F32 GGUF): the tied embedding table
    is read from the lm_head's 8-bit blocks, not stored again in BF16."""
    size = (real_compiled("int4") / "rank0.safetensors").stat().st_size
    assert size <= 1.15 * 105_453_984, size
