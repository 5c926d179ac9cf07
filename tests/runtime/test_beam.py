"""Beam search against transformers' own `generate(num_beams=B, do_sample=False)` on the same
seeded FP32 weights: the same best sequence and score, with finished hypotheses (EOS ids the
search actually meets), length penalties and every early_stopping; reorders move cache indices,
never K/V; and `xrun --beams` end to end, TP=2 included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import run_xrun
from xcompile.runtime.arrays import ptr
from xcompile.runtime.beam import beam_search
from xcompile.runtime.generate import generate
from xcompile.runtime.model import Model
from xcompile.runtime.sampling import Sampler, SamplingParams
from xcompile.runtime.tokenizer import TextTokenizer

PROMPT = "The quick brown fox jumps over the lazy dog and then"
FAMILIES = ["llama", "gptj"]


def hf_beam(hf, ids, beams, eos, length_penalty=1.0, early_stopping=False, n=16):
    """transformers' best sequence (generated ids), its score, and how many forward passes
    it ran (when its search stopped)."""
    forwards = []
    hook = hf.register_forward_hook(lambda *_: forwards.append(1))
    try:
        return _hf_beam(hf, ids, beams, eos, length_penalty, early_stopping, n) + (len(forwards),)
    finally:
        hook.remove()


def _hf_beam(hf, ids, beams, eos, length_penalty, early_stopping, n):
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            num_beams=beams,
            do_sample=False,
            max_new_tokens=n,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            eos_token_id=sorted(eos),
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(ids) :].tolist(), float(out.sequences_scores[0])


@pytest.fixture(scope="module")
def setup(compiled, hf_model):
    """family -> (our model, transformers' model, prompt ids, our no-EOS best sequence)"""
    made = {}

    def get(family):
        if family not in made:
            art = compiled(family)
            model = Model.load(art)
            ids = TextTokenizer(art).encode(PROMPT)
            best = beam_search(model, ids, 4, 16, eos_ids=()).tokens
            made[family] = model, hf_model(family), ids, best
        return made[family]

    return get


def assert_same(ours, theirs):
    """The same best sequence and score, and the search stopped at the same step."""
    tokens, score, forwards = theirs
    assert ours.tokens == tokens
    assert abs(ours.score - score) <= 1e-4
    assert 1 + len(ours.step_ms) == forwards  # the prefill, then one forward per later step


@pytest.mark.parametrize("family", FAMILIES)
def test_best_sequence_equals_transformers(family, setup):
    model, hf, ids, _ = setup(family)
    eos = TextTokenizer(model.root).eos_ids
    ours = beam_search(model, ids, 4, 16, eos)
    assert_same(ours, hf_beam(hf, ids, 4, eos))
    assert ours.finish_reason == "length" and len(ours.tokens) == 16
    assert len(ours.step_ms) == 15  # one forward per step after the prefill's first token
    # the search found a sequence at least as likely as the greedy one (length penalty 1)
    greedy = generate(model, ids, 16, Sampler(SamplingParams()), eos_ids=set()).tokens
    assert ours.tokens != greedy
    assert ours.score >= sequence_logprob(model, ids, greedy) / 16 - 1e-5


def sequence_logprob(model, ids, tokens) -> float:
    cache = model.new_cache(len(ids) + len(tokens))
    logits = torch.from_numpy(model.forward(ids + tokens[:-1], 0, cache)[len(ids) - 1 :])
    return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None]).sum())


# EOS ids that the no-EOS best sequence contains at these positions: the search meets them, so
# hypotheses finish early (some win, some lose to longer ones), and two ids at once
EOS_AT = {"one-early": [9], "one-late": [12], "two": [9, 12]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("early_stopping", [False, True, "never"], ids=str)
def test_finished_hypotheses_equal_transformers(family, early_stopping, setup):
    model, hf, ids, best = setup(family)
    reasons = []
    for positions in EOS_AT.values():
        eos = {best[p] for p in positions}
        ours = beam_search(model, ids, 4, 16, eos, early_stopping=early_stopping)
        assert_same(ours, hf_beam(hf, ids, 4, eos, early_stopping=early_stopping))
        reasons.append(ours.finish_reason)
        if ours.finish_reason == "stop":
            assert ours.tokens[-1] in eos and not set(ours.tokens[:-1]) & eos
    assert "stop" in reasons  # an EOS hypothesis won at least once


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("length_penalty", [0.0, 2.0, -1.0])
def test_length_penalty_equals_transformers(family, length_penalty, setup):
    model, hf, ids, best = setup(family)
    eos = {best[10]}
    for early_stopping in (False, "never"):
        ours = beam_search(model, ids, 4, 16, eos, length_penalty, early_stopping)
        want = hf_beam(hf, ids, 4, eos, length_penalty, early_stopping)
        assert_same(ours, want)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("beams", [2, 4])
def test_many_eos_ids_leave_enough_running_beams(family, beams, setup):
    """EOS ids = the B + 1 likeliest first tokens: more than B of the 2B best candidates end at
    once, so the search must look at (1 + len(eos)) * B of them to keep B beams running."""
    model, hf, ids, _ = setup(family)
    first = torch.from_numpy(model.forward(ids, 0, model.new_cache(len(ids)))[-1])
    eos = set(torch.topk(first, beams + 1).indices.tolist())
    for early_stopping in (False, "never"):
        ours = beam_search(model, ids, beams, 16, eos, early_stopping=early_stopping)
        assert_same(ours, hf_beam(hf, ids, beams, eos, early_stopping=early_stopping))
    assert len(ours.step_ms) > 0  # "never" searched on past the first step's EOS hypotheses


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("beams", [2, 3])
def test_other_beam_counts_equal_transformers(family, beams, setup):
    model, hf, ids, best = setup(family)
    for position in (3, 9, 12, 15):
        for early_stopping in (False, True, "never"):
            eos = {best[position]}
            ours = beam_search(model, ids, beams, 16, eos, 1.0, early_stopping)
            assert_same(ours, hf_beam(hf, ids, beams, eos, 1.0, early_stopping))


@pytest.mark.parametrize("family", FAMILIES)
def test_one_beam_is_greedy(family, setup):
    model, _, ids, best = setup(family)
    greedy = generate(model, ids, 16, Sampler(SamplingParams()), eos_ids=set()).tokens
    for eos in (set(), {greedy[6]}):
        want = generate(model, ids, 16, Sampler(SamplingParams()), eos_ids=eos)
        for early_stopping in (False, True, "never"):
            ours = beam_search(model, ids, 1, 16, eos, early_stopping=early_stopping)
            assert ours.tokens == want.tokens
            assert ours.finish_reason == want.finish_reason
    assert len(want.tokens) == 7  # the EOS case did stop early


def test_one_beam_runs_on_the_primitive_graph(compiled, setup):
    _, _, ids, _ = setup("llama")
    model = Model.load(compiled("llama", passes=[]))
    want = generate(model, ids, 16, Sampler(SamplingParams()), eos_ids=set())
    assert beam_search(model, ids, 1, 16, eos_ids=()).tokens == want.tokens


def test_budget_is_what_the_context_leaves(setup):
    model, _, ids, _ = setup("llama")
    long = (ids * 40)[: model.context - 5]
    ours = beam_search(model, long, 4, 16, eos_ids=())
    assert len(ours.tokens) == 5 and ours.finish_reason == "length"
    assert model._cache.capacity == model.context


def test_bad_arguments(setup):
    model, _, ids, _ = setup("llama")
    with pytest.raises(ValueError, match="beams"):
        beam_search(model, ids, 0, 16, ())
    with pytest.raises(ValueError, match="early_stopping"):
        beam_search(model, ids, 2, 16, (), early_stopping="sometimes")


def test_reorder_copies_no_cache_data(setup):
    """Every reorder of a real search leaves K/V byte-identical and in the same storage; only
    the rows of the positions it covers change, to the parents' rows."""
    model, _, ids, best = setup("llama")
    want = beam_search(model, ids, 4, 16, {best[12]})
    original, seen = model.reorder, []

    def spy(cache, parents, length):
        before = {k: v.copy() for k, v in cache.buffers.items()}
        where = {k: ptr(v) for k, v in cache.buffers.items()}
        rows = cache.rows.copy()
        original(cache, parents, length)
        for name, buf in cache.buffers.items():
            assert ptr(buf) == where[name]
            assert np.array_equal(buf.view(np.uint8), before[name].view(np.uint8)), name
        assert np.array_equal(cache.rows[:, :length], rows[parents, :length])
        assert np.array_equal(cache.rows[:, length:], rows[:, length:])
        seen.append(not np.array_equal(cache.rows, rows))

    model.reorder = spy
    try:
        got = beam_search(model, ids, 4, 16, {best[12]})
    finally:
        del model.reorder
    assert got.tokens == want.tokens
    assert len(seen) >= 5 and sum(seen) >= 5  # beams did move between parents, many times
    # the prompt stays in slot 0 for every beam: it was prefilled once, never copied
    assert (model._cache.rows[:, : len(ids)] == 0).all()


# -- xrun --beams ----------------------------------------------------------------------------


def xrun_beams(art, *extra, launcher=None):
    return run_xrun([str(art), "--prompt", PROMPT, "-n", "16", "--beams", "4", *extra], launcher)


def test_xrun_beams_equal_beam_search(compiled, setup):
    model, _, ids, _ = setup("llama")
    tokenizer = TextTokenizer(model.root)
    want = beam_search(model, ids, 4, 16, tokenizer.eos_ids)
    out = xrun_beams(compiled("llama"))
    assert out["tokens"] == want.tokens and out["beams"] == 4
    assert out["text"] == tokenizer.decode(want.tokens)
    assert out["finish_reason"] == "length" and abs(out["score"] - want.score) <= 1e-5
    assert out["prompt_tokens"] == len(ids) and out["per_token_ms"] > 0

    # --stop cuts the best sequence's text before the first stop string
    text = out["text"]
    k = next(i for i in range(3, len(text) - 2) if text[i : i + 2].isalpha())
    stop = text[k : k + 2]
    cut = xrun_beams(compiled("llama"), "--stop", stop)
    assert cut["text"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"
    assert cut["tokens"] == want.tokens[: len(cut["tokens"])]
    assert len(cut["tokens"]) < 16


@pytest.mark.slow  # about 30 s on two busy cores: both ranks load and search
def test_xrun_beams_tp2_gives_tp1_tokens(compiled, sharded):
    one = xrun_beams(compiled("llama"))
    two = xrun_beams(sharded("llama"))  # xrun starts both ranks; rank 1 follows the reorders
    assert two["ranks"] == 2 and two["tokens"] == one["tokens"]
    assert len(one["tokens"]) == 16


def test_xrun_beams_bad_flags(compiled, tmp_path):
    from tests.test_cli_errors import run, user_error

    art = compiled("llama")
    res = run(tmp_path, "xrun", art, "--prompt", "hi", "--beams", "4", "--temperature", "0.7")
    user_error(res, "--beams", "sampling", "--temperature")
    user_error(run(tmp_path, "xrun", art, "--prompt", "hi", "--beams", "0"), "--beams")
    user_error(run(tmp_path, "xrun", art, "--chat", "--beams", "2"), "--beams", "--chat")


@pytest.mark.parametrize("prompt", ["Once upon a time", PROMPT], ids=["crosses", "past"])
def test_phi3_longrope_beams_equal_transformers(phi3_switch, prompt):
    """Phi-3 with longrope switching at 12 tokens: a short prompt whose beams cross the switch
    (each beam's whole sequence re-run with the long factors, as transformers re-runs its
    batch of beams), and a prompt past it: transformers' best sequence and score."""
    from transformers import AutoModelForCausalLM

    ckpt, art = phi3_switch
    ids = TextTokenizer(art).encode(prompt)
    assert (len(ids) <= 12) == (prompt != PROMPT)
    hf = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    eos = TextTokenizer(art).eos_ids
    ours = beam_search(Model.load(art), ids, 3, 16, eos_ids=eos)
    tokens, score = _hf_beam(hf, ids, 3, eos, 1.0, False, 16)
    assert ours.tokens == tokens
    assert abs(ours.score - score) <= 1e-4
