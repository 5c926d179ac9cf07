"""StopChecker and StreamDecoder on the toy byte-level BPE (runtime/stopping.py, tokenizer.py):
text emitted token by token against the decoded text, stop strings held back while they could
still match, multi-byte characters split across byte tokens; and generate() with a checker."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xcompile.runtime.stopping import StopChecker
from xcompile.runtime.tokenizer import StreamDecoder, TextTokenizer

EOS = 2  # the toy tokenizer's "</s>"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from xcompile.toy import make_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer().save_pretrained(folder)
    return TextTokenizer(folder)


def test_eos_ids_include_the_tokenizers_eos_token(tokenizer):
    """No generation_config.json in this folder: "</s>" comes from tokenizer_config.json."""
    assert tokenizer.eos_ids == {EOS} and tokenizer.special_tokens["eos_token"] == "</s>"


def feed(checker: StopChecker, ids: list[int]) -> tuple[list[str], str | None, int]:
    """Push ids until a stop -> (pieces emitted, finish_reason, ids consumed); flushes at the end
    when none stopped it (a stop string found then still counts)."""
    pieces = []
    for n, token in enumerate(ids, 1):
        piece, reason = checker.push(token)
        pieces.append(piece)
        if reason is not None:
            return pieces, reason, n
    pieces.append(checker.flush())
    return pieces, checker.finish_reason, len(ids)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_stop_string_spanning_tokens_is_cut_and_never_shown(tokenizer):
    ids = ids_of(tokenizer, "Hello world. The end")  # 'Hell' 'o' ' wor' 'ld' '.' ' ' 'The' ...
    checker = StopChecker(tokenizer, ["d. Th"])
    pieces, reason, used = feed(checker, ids)
    assert reason == "stop" and checker.stop_reason == "d. Th"
    assert "".join(pieces) == checker.text == "Hello worl"
    assert used == 7  # stopped on 'The', the token that completed the stop string
    shown = ""
    for piece in pieces:  # while streaming, nothing past the cut ever showed
        shown += piece
        assert "Hello worl".startswith(shown)
    assert pieces[3] == "l"  # 'ld' arrived: 'd' is held as the possible start of 'd. Th'


def test_partial_match_then_divergence_releases_the_held_text(tokenizer):
    ids = ids_of(tokenizer, "the cat sat on the mat")
    checker = StopChecker(tokenizer, ["the mat!", "sat in"])
    pieces = [checker.push(t)[0] for t in ids]
    # tokens: 't' 'he' ' c' 'at' ' s' 'at' ' o' 'n' ' the' ' m' 'at'; a tail that starts a stop
    # string waits ('t', 'the', 's', 'sat', 'the mat') until the next piece rules it out
    assert pieces == ["", "", "the c", "a", "t ", "", "sat o", "n", " ", "", ""]
    assert checker.flush() == "the mat"
    assert checker.finish_reason is None and checker.stop_reason is None


def test_earliest_of_several_stop_strings_wins(tokenizer):
    text = "one two three"
    # ["wo", "two"]: both complete on the same token ('o'); the one that starts first wins
    for stops in (
        ["three", "two"],
        ["two", "three"],
        ["e t", "two"],
        ["o th", "e tw"],
        ["wo", "two"],
    ):
        checker = StopChecker(tokenizer, stops)
        pieces, reason, _ = feed(checker, ids_of(tokenizer, text))
        first = min(stops, key=lambda s: text.find(s))
        assert reason == "stop" and checker.stop_reason == first, stops
        assert "".join(pieces) == text[: text.find(first)], stops


def test_stop_at_the_very_first_token(tokenizer):
    ids = ids_of(tokenizer, "Hello world")
    checker = StopChecker(tokenizer, ["Hell"])
    assert checker.push(ids[0]) == ("", "stop")
    assert checker.push(ids[1]) == ("", "stop")  # finished: further tokens change nothing
    assert checker.text == "" and checker.flush() == ""


def test_multibyte_characters_split_across_tokens(tokenizer):
    ids = ids_of(tokenizer, "日本語です")  # three byte tokens per character
    assert len(ids) == 15
    checker = StopChecker(tokenizer, ["語で"])
    pieces, reason, used = feed(checker, ids)
    assert reason == "stop" and "".join(pieces) == "日本" and used == 12
    assert all("\ufffd" not in p for p in pieces)
    assert [p for p in pieces if p] == ["日", "本"]  # each character once its 3rd byte is in
    assert pieces[:2] == ["", ""] and pieces[2] == "日"


def test_stop_string_that_starts_inside_a_split_character(tokenizer):
    e_bytes = [tokenizer.tok.token_to_id(c) for c in ("Ã", "©")]  # "é" as two byte tokens
    ids = ids_of(tokenizer, "caf") + e_bytes + ids_of(tokenizer, " au lait")
    assert tokenizer.decode(ids) == "café au lait"
    checker = StopChecker(tokenizer, ["é au"])
    pieces, reason, _ = feed(checker, ids)
    assert reason == "stop" and "".join(pieces) == "caf"
    assert all("\ufffd" not in p for p in pieces)


def test_eos_emits_the_held_text_and_not_its_own(tokenizer):
    ids = ids_of(tokenizer, "the cat sat") + [EOS] + ids_of(tokenizer, " on")
    checker = StopChecker(tokenizer, ["sat on"], eos_ids={EOS})
    pieces, reason, used = feed(checker, ids)
    assert reason == "stop" and used == ids.index(EOS) + 1
    assert "".join(pieces) == "the cat sat"  # 'sat' was held; EOS released it
    assert checker.stop_reason is None  # EOS, as vLLM reports it


def test_stop_string_that_is_a_special_token_stops_on_its_id(tokenizer):
    checker = StopChecker(tokenizer, ["</s>"])
    ids = ids_of(tokenizer, "the cat") + [EOS, 67]
    pieces, reason, used = feed(checker, ids)
    assert reason == "stop" and checker.stop_reason == "</s>" and used == ids.index(EOS) + 1
    assert "".join(pieces) == "the cat"


def test_empty_stop_string_is_refused(tokenizer):
    from xcompile.errors import UserError

    with pytest.raises(UserError, match="non-empty"):
        StopChecker(tokenizer, ["x", ""])


# tokens that spell 'a', 'b', ' ', ' a', 'é' whole and as its two bytes (byte-level names)
ALPHABET = ["a", "b", "Ġ", "Ġa", "Ã©", "Ã", "©"]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_matches_a_search_of_the_decoded_text(tokenizer, data):
    """Against the plain definition: stop after the first token whose decoded text (complete
    characters only) holds a stop string; the text is what comes before the earliest one."""
    vocab = [i for i in map(tokenizer.tok.token_to_id, ALPHABET) if i is not None]
    assert len(vocab) == len(ALPHABET)
    ids = data.draw(st.lists(st.sampled_from(vocab), max_size=24))
    stops = data.draw(st.lists(st.text("ab é", min_size=1, max_size=4), min_size=1, max_size=3))
    expected_text, expected_used = None, len(ids)
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        found = [text.find(s) for s in stops if s in text]
        if found and not text.endswith("\ufffd"):
            expected_text, expected_used = text[: min(found)], n
            break
    full = tokenizer.decode(ids)
    if expected_text is None:  # no stop while streaming: maybe in the final flush, else none
        found = [full.find(s) for s in stops if s in full]
        expected_text = full[: min(found)] if found else full
    checker = StopChecker(tokenizer, stops)
    pieces, reason, used = feed(checker, ids)
    assert "".join(pieces) == expected_text
    assert used == expected_used
    assert (reason == "stop") == (expected_text != full)
    shown = ""
    for piece in pieces:
        shown += piece
        assert expected_text.startswith(shown)  # never a character past the cut


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(3, 511), max_size=40))
def test_stream_decoder_pieces_join_to_the_decoded_text(tokenizer, ids):
    stream = StreamDecoder(tokenizer)
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) + stream.flush() == tokenizer.decode(ids)
    assert all(not p.endswith("\ufffd") for p in pieces)


def test_generate_with_a_checker_stops_on_a_stop_string_and_on_eos(compiled):
    from xcompile.runtime.generate import generate
    from xcompile.runtime.model import Model
    from xcompile.runtime.sampling import Sampler, SamplingParams

    art = compiled("llama")
    model, tokenizer = Model.load(art), TextTokenizer(art)
    ids = tokenizer.encode("The quick brown fox")
    greedy = generate(model, ids, 12, Sampler(SamplingParams()), eos_ids=set())
    full = tokenizer.decode(greedy.tokens)
    streamed: list[str] = []
    plain = generate(
        model,
        ids,
        12,
        Sampler(SamplingParams()),
        set(),
        stop=StopChecker(tokenizer),
        on_text=streamed.append,
    )
    assert plain.tokens == greedy.tokens and plain.finish_reason == "length"
    assert plain.text == "".join(streamed) == full

    stop = next(full[i : i + 2] for i in range(3, len(full)) if "\ufffd" not in full[i : i + 2])
    cut = generate(
        model, ids, 12, Sampler(SamplingParams()), set(), stop=StopChecker(tokenizer, [stop])
    )
    n = next(k for k in range(1, 13) if stop in tokenizer.decode(greedy.tokens[:k]))
    assert cut.tokens == greedy.tokens[:n]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full[: full.find(stop)]

    eos = greedy.tokens[3]
    ended = generate(
        model, ids, 12, Sampler(SamplingParams()), {eos}, stop=StopChecker(tokenizer, (), {eos})
    )
    assert ended.tokens == greedy.tokens[: greedy.tokens.index(eos) + 1]
    assert ended.finish_reason == "stop" and ended.stop_reason is None
    assert ended.text == tokenizer.decode(greedy.tokens[: greedy.tokens.index(eos)])


def test_xrun_stop_flag_cuts_the_text_and_reports_stop(compiled):
    import subprocess
    import sys

    from tests.conftest import run_xrun

    art = compiled("llama")
    args = [str(art), "--prompt", "The quick brown fox", "-n", "16"]
    base = run_xrun(args)
    full, tokenizer = base["text"], TextTokenizer(art)
    assert base["finish_reason"] == "length" and len(base["tokens"]) == 16
    assert full == tokenizer.decode(base["tokens"])
    stop = next(full[i : i + 3] for i in range(4, len(full)) if "\ufffd" not in full[i : i + 3])

    cut = run_xrun(args + ["--stop", "never seen", "--stop", stop])
    n = next(k for k in range(1, 17) if stop in tokenizer.decode(base["tokens"][:k]))
    assert cut["tokens"] == base["tokens"][:n] and n < 16
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full[: full.find(stop)]

    unmatched = run_xrun(args + ["--stop", "never seen"])
    assert unmatched["tokens"] == base["tokens"] and unmatched["text"] == full
    assert unmatched["finish_reason"] == "length"

    streamed = subprocess.run(
        [sys.executable, "-m", "xcompile.runtime.cli", *args, "--stop", stop],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    assert streamed.stdout == cut["text"] + "\n"
