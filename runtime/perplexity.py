"""Perplexity of a text, scored exactly as llama.cpp's `llama-perplexity` scores it, so that the
figures compare directly with its own.

    text = read_text(path)                         # as `llama-perplexity -f path` reads it
    tokens, bos = tokenize(tokenizer, text)
    score = evaluate(tokens, ctx, chunk_count(len(tokens), ctx, chunks), bos, logits_of)
    score.ppl, score.ppl_stderr, score.count

The tokens are cut into chunks of ctx (the tail that does not fill one is dropped). Each chunk
runs from an empty KV cache at position 0, its first token replaced by BOS where the tokenizer
puts a BOS in front of an encoding (llama.cpp does so when the vocab adds one). Only the second
half is scored: logits at positions j = ctx // 2 .. ctx - 2 predict token j + 1, so each chunk
gives ctx - 1 - ctx // 2 scores (255 for ctx 512) and every scored token saw at least half a
context. PPL = exp(mean nll). Its uncertainty is llama.cpp's: with sums nll and nll2 over the
count scored tokens, ppl * sqrt((nll2 / count - (nll / count)^2) / (count - 1)).

No torch at import: the launcher checks the file before any rank (or torch) starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xcompile.errors import UserError

MIN_CTX = 8


def read_text(path: str | Path) -> str:
    """The file's text, as `llama-perplexity -f` reads it: the bytes as they are (no newline
    translation), one trailing newline dropped. UTF-8 (the tokenizers take str)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--perplexity {path}: no such file; give a text file to score")
    if path.is_dir():
        raise UserError(f"--perplexity {path}: is a folder; give a text file to score")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(
            f"--perplexity {path}: cannot read it ({e.strerror or e}); check its permissions"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"--perplexity {path}: not UTF-8 text (byte {e.start}); convert it to UTF-8"
        ) from None
    if not data:
        raise UserError(f"--perplexity {path}: the file is empty; give some text to score")
    return text.removesuffix("\n")


def tokenize(tokenizer, text: str) -> tuple[list[int], int | None]:
    """tokenizer: runtime.tokenizer.TextTokenizer -> (the text's ids with the tokenizer's own
    special tokens added, the BOS id its encodings start with or None).

    Text that spells a special token ("</s>") stays text, as llama.cpp tokenizes here
    (parse_special false)."""
    tok = tokenizer.tok
    before = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        ids = tok.encode(text).ids
        probe, plain = tok.encode("a").ids, tok.encode("a", add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = before
    # the post-processor puts one token in front of the text (Llama's <s>): a BOS
    adds_bos = len(probe) > len(plain) and probe[1 : 1 + len(plain)] == plain
    return ids, probe[0] if adds_bos else None


def check_ctx(ctx: int, context: int | None) -> None:
    """--ctx against the model's context (its max_positions), before anything loads."""
    if ctx < MIN_CTX:
        raise UserError(
            f"--ctx {ctx}: a chunk needs at least {MIN_CTX} tokens; use --ctx {MIN_CTX} or more "
            "(512 by default)"
        )
    if context is not None and ctx > context:
        raise UserError(
            f"--ctx {ctx} is longer than the model's context of {context} tokens; "
            f"use --ctx {context} or less"
        )


def chunk_count(n_tokens: int, ctx: int, chunks: int | None) -> int:
    """llama.cpp's n_chunk: min(--chunks, n_tokens // ctx); it refuses fewer than 2 * ctx."""
    if n_tokens < 2 * ctx:
        raise UserError(
            f"the text tokenizes to only {n_tokens} tokens; perplexity with --ctx {ctx} needs "
            f"at least {2 * ctx}; give a longer text or a smaller --ctx"
        )
    return n_tokens // ctx if chunks is None else min(chunks, n_tokens // ctx)


@dataclass
class Score:
    """Running sums over the scored tokens, kept in float64 as llama.cpp keeps them."""

    nll: float = 0.0  # sum of -log p(token)
    nll2: float = 0.0  # sum of (-log p(token))^2
    count: int = 0

    def add(self, logits, targets: list[int]) -> None:
        """logits (n, vocab) for n positions; targets (n,): the token that came next at each."""
        import numpy as np

        x = np.asarray(logits, np.float64)  # (n, vocab)
        x = x - x.max(axis=-1, keepdims=True)
        logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))  # log-softmax, stable
        nll = -logp[np.arange(len(targets)), targets]  # (n,)
        self.nll += float(nll.sum())
        self.nll2 += float((nll * nll).sum())
        self.count += len(targets)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count)

    @property
    def ppl_stderr(self) -> float:
        """llama.cpp's "+/-": ppl * sqrt(var / (count - 1)), var = E[nll^2] - E[nll]^2 (0 when
        that comes out <= 0, where llama.cpp prints no figure)."""
        mean = self.nll / self.count
        var = self.nll2 / self.count - mean * mean
        if var <= 0 or self.count < 2:
            return 0.0
        return math.sqrt(var / (self.count - 1)) * self.ppl


def evaluate(
    tokens: list[int],
    ctx: int,
    n_chunk: int,
    bos: int | None,
    logits_of: Callable[[list[int], int], object],
    on_chunk: Callable[[int, Score], None] | None = None,
) -> Score:
    """Score chunks 0 .. n_chunk - 1 of `tokens`.

    logits_of(ids, first): ids (ctx,) run from an empty cache at position 0 -> logits
    (ctx - 1 - first, vocab) at positions first .. ctx - 2.
    on_chunk(i, score) after chunk i, with the sums so far."""
    first = ctx // 2
    score = Score()
    for i in range(n_chunk):
        ids = tokens[i * ctx : (i + 1) * ctx]
        if bos is not None:
            ids = [bos, *ids[1:]]
        logits = logits_of(ids, first)  # (ctx - 1 - first, vocab)
        score.add(logits, tokens[i * ctx + first + 1 : (i + 1) * ctx])  # (ctx - 1 - first,)
        if on_chunk is not None:
            on_chunk(i, score)
    return score
