"""xrun --perplexity (runtime/perplexity.py) against transformers' own model, chunked and scored as
llama.cpp's llama-perplexity scores: chunks of ctx tokens from an empty cache (the first token BOS
where the tokenizer adds one), the second half of each scored, exp(mean nll), and llama.cpp's
"+/-"."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from tests.conftest import run_xrun
from tests.test_cli_errors import run, user_error
from xcompile.runtime.perplexity import Score, evaluate, tokenize
from xcompile.runtime.tokenizer import TextTokenizer

PROSE = (
    "the quick brown fox jumps over a lazy dog and then runs far away into the forest where "
    "it sleeps under tall trees until morning comes with rain over quiet hills"
)
CTX = 32  # the tiny models' context is 256


def word_text(n_words: int, seed: int = 0) -> str:
    rng, words = random.Random(seed), PROSE.split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(n_words // 12)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A word text of ~6 chunks of CTX tokens for the tiny models' tokenizer, ending in a newline
    (which llama-perplexity -f drops)."""
    path = tmp_path_factory.mktemp("ppl") / "text.txt"
    path.write_text(word_text(96), encoding="utf-8")
    return path


def reference(model, tokenizer, text: str, ctx: int, chunks: int | None = None) -> dict:
    """transformers' perplexity with llama.cpp's chunking and scoring. model: an HF causal LM;
    tokenizer: transformers' tokenizer of the same checkpoint."""
    ids = tokenizer(text.removesuffix("\n"))["input_ids"]  # -f drops one trailing newline
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    n_chunk = len(ids) // ctx if chunks is None else min(chunks, len(ids) // ctx)
    first = ctx // 2
    nll = []
    with torch.no_grad():
        for i in range(n_chunk):
            chunk = ids[i * ctx : (i + 1) * ctx]
            if adds_bos:
                chunk = [bos, *chunk[1:]]
            logits = model(torch.tensor([chunk])).logits[0].double()  # (ctx, vocab)
            logp = torch.log_softmax(logits[first : ctx - 1], dim=-1)  # (ctx - 1 - first, vocab)
            targets = torch.tensor(ids[i * ctx + first + 1 : (i + 1) * ctx])
            nll += (-logp[torch.arange(len(targets)), targets]).tolist()
    nll = np.array(nll)
    ppl = math.exp(nll.mean())
    return {
        "ppl": ppl,
        "ppl_stderr": math.sqrt(nll.var() / (len(nll) - 1)) * ppl,
        "tokens": len(nll),
        "chunks": n_chunk,
        "adds_bos": adds_bos,
    }


def xrun_ppl(art, path, *extra: str) -> dict:
    return run_xrun([str(art), "--perplexity", str(path), *extra])


def close(a: float, b: float, rel: float = 1e-4) -> bool:
    return abs(a - b) <= rel * abs(b)


# ---------------------------------------------------------------------------------------------
# the scoring itself, on made-up logits


def test_evaluate_chunks_and_statistics_match_llama_cpp():
    """Chunks of ctx with BOS first, positions ctx//2 .. ctx-2 scored against the next token; the
    sums give exp(mean) and llama.cpp's ppl * sqrt(var / (count - 1))."""
    rng = np.random.default_rng(0)
    vocab, ctx, bos = 50, 10, 7
    tokens = rng.integers(0, vocab, size=47).tolist()  # 4 chunks and 7 tokens left over
    table = (rng.normal(size=(4, ctx, vocab)) * 3).astype(np.float32)  # chunk's logits
    seen = []

    def logits_of(ids, first):
        seen.append((list(ids), first))
        return table[len(seen) - 1, first : ctx - 1]

    score = evaluate(tokens, ctx, 3, bos, logits_of)
    assert [first for _, first in seen] == [5, 5, 5]
    for i, (ids, _) in enumerate(seen):
        assert ids == [bos, *tokens[i * ctx + 1 : (i + 1) * ctx]]
    nll = []
    for i in range(3):
        for j in range(5, ctx - 1):
            row = table[i, j].astype(np.float64)
            logsumexp = row.max() + math.log(np.exp(row - row.max()).sum())
            nll.append(logsumexp - row[tokens[i * ctx + j + 1]])
    nll = np.array(nll)
    assert score.count == 3 * (ctx - 1 - ctx // 2) == len(nll)
    assert math.isclose(score.ppl, math.exp(nll.mean()), rel_tol=1e-12)
    expected = math.sqrt((np.mean(nll**2) - nll.mean() ** 2) / (len(nll) - 1)) * score.ppl
    assert math.isclose(score.ppl_stderr, expected, rel_tol=1e-9)


def test_uniform_logits_give_the_vocabulary_size():
    score = Score()
    score.add(np.zeros((6, 321), np.float32), [0, 5, 9, 320, 1, 2])
    assert math.isclose(score.ppl, 321.0, rel_tol=1e-12) and score.ppl_stderr == 0.0


def test_tokenize_finds_bos_and_keeps_special_text_as_text(compiled):
    tokenizer = TextTokenizer(compiled("llama"))
    ids, bos = tokenize(tokenizer, "hello </s> there")
    assert bos == tokenizer.tok.token_to_id("<s>") and ids[0] == bos
    eos = tokenizer.tok.token_to_id("</s>")
    assert eos not in ids  # llama.cpp tokenizes the text with parse_special off
    assert tokenizer.tok.encode_special_tokens is False  # left as it was


# ---------------------------------------------------------------------------------------------
# xrun against transformers


@pytest.mark.parametrize("graph", ["fused", "primitive"])
def test_fp32_ppl_equals_transformers(graph, compiled, checkpoint, hf_model, text_file):
    from transformers import AutoTokenizer

    art = compiled("llama", "fp32", None if graph == "fused" else [])
    ours = xrun_ppl(art, text_file, "--ctx", str(CTX), "--chunks", "5")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint("llama"))
    theirs = reference(hf_model("llama"), tokenizer, text_file.read_text(), CTX, 5)
    assert theirs["adds_bos"]  # the toy tokenizer adds <s>: chunks start with BOS
    assert ours["chunks"] == theirs["chunks"] == 5 and ours["tokens"] == theirs["tokens"]
    assert close(ours["ppl"], theirs["ppl"]), (ours, theirs)
    assert close(ours["ppl_stderr"], theirs["ppl_stderr"], 1e-3), (ours, theirs)


def test_tp2_equals_tp1(compiled, sharded, text_file):
    one = xrun_ppl(compiled("llama"), text_file, "--ctx", str(CTX), "--chunks", "4")
    two = xrun_ppl(sharded("llama"), text_file, "--ctx", str(CTX), "--chunks", "4")
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert close(two["ppl"], one["ppl"]), (one, two)
    assert one["tokens"] == two["tokens"] == 4 * (CTX - 1 - CTX // 2)


def runtime_reference(art, text: str, ctx: int, chunks: int) -> float:
    """The artifacts' own perplexity the plain way: a new cache for every chunk, logits for
    every row (Model.forward), scored here."""
    from xcompile.runtime.model import Model

    ids, bos = tokenize(TextTokenizer(art), text.removesuffix("\n"))
    model, first, nll = Model.load(art), ctx // 2, []
    for i in range(chunks):
        chunk = ids[i * ctx : (i + 1) * ctx]
        chunk = [bos, *chunk[1:]] if bos is not None else chunk
        logits = model.forward(chunk, 0, model.new_cache(ctx))  # (ctx, vocab)
        logits = torch.from_numpy(logits).double()
        logp = torch.log_softmax(logits[first : ctx - 1], dim=-1)
        targets = torch.tensor(ids[i * ctx + first + 1 : (i + 1) * ctx])
        nll += (-logp[torch.arange(len(targets)), targets]).tolist()
    return math.exp(float(np.mean(nll)))


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
def test_every_dtype_scores_its_own_logits(dtype, compiled, text_file):
    """Quantized artifacts: xrun's figure (one cache overwritten chunk after chunk, only the
    scored rows projected) is the one their full logits give from a fresh cache per chunk."""
    art = compiled("llama", dtype)
    ours = xrun_ppl(art, text_file, "--ctx", str(CTX), "--chunks", "5")
    assert ours["tokens"] == 5 * (CTX - 1 - CTX // 2)
    assert close(ours["ppl"], runtime_reference(art, text_file.read_text(), CTX, 5)), ours


def test_json_fields_and_plain_output(compiled, text_file):
    art = compiled("llama")
    n_tokens = len(TextTokenizer(art).encode(text_file.read_text().removesuffix("\n")))
    report = xrun_ppl(art, text_file, "--ctx", str(CTX))  # no --chunks: every full chunk
    fields = {"ppl", "ppl_stderr", "tokens", "chunks", "ctx", "seconds", "ranks", "isa"}
    fields.add("kv_cache")
    assert set(report) == fields
    assert report["chunks"] == n_tokens // CTX >= 3 and report["ctx"] == CTX
    assert report["tokens"] == report["chunks"] * (CTX - 1 - CTX // 2)
    assert report["ppl"] > 1 and 0 < report["ppl_stderr"] < report["ppl"]
    assert report["seconds"] > 0 and report["ranks"] == 1
    assert report["isa"] in ("amx", "avx512_bf16", "avx512_vnni", "avx512", "avx2", "scalar")

    res = run(art.parent, "xrun", art, "--perplexity", text_file, "--ctx", str(CTX))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1] == (
        f"Final estimate: PPL = {report['ppl']:.4f} +/- {report['ppl_stderr']:.5f}"
    )
    running = lines[-2].rstrip(",").split(",")  # llama.cpp's [1]x,[2]y,... after each chunk
    assert len(running) == report["chunks"] and running[-1] == f"[{report['chunks']}]" + (
        f"{report['ppl']:.4f}"
    )


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 2, before any model loads


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_bytes(b"")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    (d / "short.txt").write_text("the quick brown fox\n")
    (d / "folder").mkdir()
    return d


BAD = {
    "missing": (["--perplexity", "{d}/nope.txt"], ["nope.txt", "no such file"]),
    "empty": (["--perplexity", "{d}/empty.txt"], ["empty.txt", "empty"]),
    "folder": (["--perplexity", "{d}/folder"], ["folder", "give a text file"]),
    "not-utf8": (["--perplexity", "{d}/latin1.txt"], ["latin1.txt", "UTF-8"]),
    "short": (
        ["--perplexity", "{d}/short.txt", "--ctx", "32"],
        ["short.txt", "only", "tokens", "at least 64", "smaller --ctx"],
    ),
    "ctx-default-over-context": (["--perplexity", "{d}/short.txt"], ["--ctx 512", "256"]),
    "ctx-over-context": (["--perplexity", "{d}/short.txt", "--ctx", "300"], ["context of 256"]),
    "ctx-tiny": (["--perplexity", "{d}/short.txt", "--ctx", "4"], ["--ctx 4", "at least 8"]),
    "ctx-negative": (["--perplexity", "{d}/short.txt", "--ctx", "-5"], ["--ctx -5"]),
    "chunks-zero": (["--perplexity", "{d}/short.txt", "--chunks", "0"], ["--chunks"]),
    "with-prompt": (["--perplexity", "{d}/short.txt", "--prompt", "hi"], ["drop --prompt"]),
    "with-messages": (
        ["--perplexity", "{d}/short.txt", "--messages", "m.json"],
        ["drop --messages"],
    ),
    "with-chat": (["--perplexity", "{d}/short.txt", "--chat"], ["drop --chat"]),
    "with-serve": (["--perplexity", "{d}/short.txt", "--serve"], ["drop --serve"]),
    "with-beams": (["--perplexity", "{d}/short.txt", "--beams", "2"], ["drop --beams"]),
    "ctx-alone": (["--prompt", "hi", "--ctx", "64"], ["--ctx", "--perplexity FILE"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(case, compiled, files):
    args, words = BAD[case]
    art = compiled("llama")
    res = run(files, "xrun", art, *[a.format(d=files) for a in args])
    user_error(res, *words)


def test_bad_input_on_sharded_artifacts_stops_before_the_ranks(sharded, files):
    """The launcher checks the text: one line, not one per rank."""
    res = run(files, "xrun", sharded("llama"), "--perplexity", files / "short.txt", "--ctx", "16")
    user_error(res, "short.txt", "at least 32")


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root reads any file")
def test_unreadable_file(compiled, tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text(word_text(96))
    path.chmod(0)
    res = run(tmp_path, "xrun", compiled("llama"), "--perplexity", path, "--ctx", str(CTX))
    user_error(res, "secret.txt", "cannot read", "permissions")


# ---------------------------------------------------------------------------------------------
# the real model


def test_real_model_fp32_ppl_equals_transformers(real_model, real_compiled, tmp_path):
    """SmolLM2-135M (FP32) on held-out text, 4 chunks of 512: xrun's figure is transformers'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xcompile.real_model import held_out_text

    path = tmp_path / "heldout.txt"
    path.write_text(held_out_text(), encoding="utf-8")
    ours = xrun_ppl(real_compiled("fp32"), path, "--ctx", "512", "--chunks", "4")
    hf = AutoModelForCausalLM.from_pretrained(
        real_model, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    theirs = reference(hf, AutoTokenizer.from_pretrained(real_model), held_out_text(), 512, 4)
    assert not theirs["adds_bos"]  # SmolLM2's tokenizer adds no BOS: chunks stay as they are
    assert ours["chunks"] == 4 and ours["tokens"] == theirs["tokens"] == 4 * 255
    assert close(ours["ppl"], theirs["ppl"]), (ours, theirs)
    assert 5 < ours["ppl"] < 40, ours  # a trained model on English prose, not random weights
    print(f"\nSmolLM2-135M FP32, 4 x 512: xrun {json.dumps(ours)} transformers {theirs['ppl']:.6f}")
