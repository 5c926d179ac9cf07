"""Beam search over the KV cache's slots, as transformers' `generate(num_beams=B,
do_sample=False)` defines it (scores, length penalty, early stopping, the finish at max length).

    result = beam_search(model, prompt_ids, beams=4, max_new_tokens=16, eos_ids={2})
    result.tokens, result.finish_reason, result.score

The prompt is prefilled once into slot 0 and the other slots fork it (they share its K/V). Each
step runs one forward over the B running beams' last tokens (slot s holds beam s), then the
2B best continuations over (beam, vocab) by summed log-probability decide the next B beams. A
beam that continues another one's sequence gets it by `model.reorder` (the cache's index rows
change, never K or V), so a step costs one batched forward whatever the beams do.

A sequence that ends (an EOS id, or the last allowed token) becomes a finished hypothesis with
score sum(log p) / generated_len ** length_penalty; the best B are kept. early_stopping:
    True     stop as soon as B hypotheses are finished
    False    stop once the best running beam, scored at its current length, cannot beat the worst
             kept hypothesis (transformers' default heuristic)
    "never"  as False, but with length_penalty > 0 the running beam is scored at the longest
             length it could reach (the canonical, exhaustive stopping rule)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from xcompile.runtime.generate import check_prompt
from xcompile.runtime.kv_cache import Segment

EarlyStopping = bool | str  # True, False or "never"
NEG = -1.0e9  # transformers' score for "not a candidate" (kept so that ties fall alike)


@dataclass
class Hypothesis:
    score: float  # sum of log-probs / len(tokens) ** length_penalty
    tokens: list[int]


@dataclass
class BeamResult:
    prompt_tokens: int
    beams: int
    tokens: list[int] = field(default_factory=list)  # the best sequence's generated ids
    finish_reason: str = "length"  # "stop": it ends with an EOS id
    text: str | None = None  # set by the caller that decodes it (xrun: cut at a stop string)
    score: float = 0.0
    hypotheses: list[Hypothesis] = field(default_factory=list)  # finished, best first
    prefill_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)  # each decode step: forward + selection

    @property
    def per_token_ms(self) -> float:
        """Mean time of a decode step (one new token for every beam)."""
        return sum(self.step_ms) / len(self.step_ms) if self.step_ms else 0.0


def forward(
    model, cache, segments: list[Segment], ids: list[int], rows: list[int] | None = None
) -> np.ndarray:
    """-> logits (len(ids), vocab), or those of `rows`. One beam goes through model.forward,
    which also runs the primitive graph (no slots); several through one forward_batch."""
    if len(segments) == 1 and segments[0].slot == 0:
        logits = model.forward(ids, segments[0].start, cache)
        return logits if rows is None else logits[rows]
    return model.forward_batch(segments, ids, cache, rows)


def log_softmax(logits) -> np.ndarray:
    """logits (rows, V) -> log-probabilities (rows, V) fp32."""
    x = np.asarray(logits, np.float32)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of x's k largest values (n,) -> (k,), largest first; equal values by index."""
    index = np.argpartition(-x, k - 1)[:k] if k < x.size else np.arange(x.size)
    return index[np.lexsort((index, -x[index]))]


def beam_search(
    model,
    prompt_ids: list[int],
    beams: int,
    max_new_tokens: int,
    eos_ids: Iterable[int],
    length_penalty: float = 1.0,
    early_stopping: EarlyStopping = False,
    on_step: Callable[[int, list[list[int]]], None] | None = None,
) -> BeamResult:
    """model: a Model or a tensor-parallel Leader (only new_cache / forward_batch / fork /
    reorder are called, so every rank keeps the same cache indices).
    on_step(step, running) sees the running beams' generated ids after each step, best first."""
    if beams < 1:
        raise ValueError(f"beams must be at least 1, got {beams}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    check_prompt(model, prompt_ids)
    if beams == 1:  # greedy, as transformers runs num_beams=1 ("never" would search on past EOS)
        early_stopping = True
    eos = set(eos_ids)
    n = len(prompt_ids)
    budget = min(max_new_tokens, model.context - n)
    out = BeamResult(prompt_tokens=n, beams=beams)
    if budget <= 0:
        return out
    # enough candidates that B of them are still running even if each beam's EOS ids are all
    # among them (each beam can contribute at most len(eos) of them)
    keep = max(2, 1 + len(eos)) * beams
    cache = model.new_cache(n + budget, slots=beams)
    switch = model.config.get("rope_switch") or 0  # longrope: where the long factors begin

    t0 = time.perf_counter()
    logits = forward(model, cache, [Segment(0, 0, n)], prompt_ids)[-1:]  # (1, V)
    if beams > 1:
        model.fork(cache, 0, list(range(1, beams)), n)
    out.prefill_ms = (time.perf_counter() - t0) * 1e3

    # running beams: their generated ids and summed log-probs (B,), best first. At the start all
    # beams are the prompt; only beam 0 may be continued, or the B beams would all be equal.
    running: list[list[int]] = [[] for _ in range(beams)]
    scores = np.full((beams,), NEG, np.float32)
    scores[0] = 0.0
    finished: list[Hypothesis] = []
    improvable = True  # the early-stopping heuristic has not ruled out a better hypothesis

    for step in range(budget):
        t0 = time.perf_counter()
        if step > 0 and switch and n + step - 1 == switch:
            # longrope: as transformers (and generate) do when the sequences first grow past
            # the switch, every beam re-runs its whole sequence with the long factors (into its
            # own slot: the shared prefix rows are claimed back)
            length = n + step
            segments = [Segment(s, 0, length) for s in range(beams)]
            ids = [t for seq in running for t in prompt_ids + seq]
            rows = [(s + 1) * length - 1 for s in range(beams)]
            logits = forward(model, cache, segments, ids, rows)
        elif step > 0:
            segments = [Segment(s, n + step - 1, 1) for s in range(beams)]
            logits = forward(model, cache, segments, [seq[-1] for seq in running])
        logprobs = np.broadcast_to(log_softmax(logits), (beams, logits.shape[-1]))  # (B, V)
        vocab = logprobs.shape[-1]
        total = (logprobs + scores[:, None]).reshape(-1)  # (B * V,)
        top_index = top_k(total, min(keep, total.size))
        top_scores = total[top_index]
        parents = (top_index // vocab).tolist()
        tokens = (top_index % vocab).tolist()
        last = step + 1 == budget
        ends = [last or t in eos for t in tokens]  # (keep,) this candidate's sequence ends

        # finished hypotheses: only among the B best candidates (the rest only back up the
        # running beams), and only while one could still improve on the kept ones
        full = len(finished) == beams
        if improvable and not (full and early_stopping is True):
            length_scores = top_scores / float((step + 1) ** length_penalty)
            for i in range(min(beams, len(tokens))):
                if ends[i]:
                    finished.append(
                        Hypothesis(float(length_scores[i]), running[parents[i]] + [tokens[i]])
                    )
            finished.sort(key=lambda h: -h.score)  # stable: earlier hypotheses win ties
            del finished[beams:]

        if last:
            if step > 0:
                out.step_ms.append((time.perf_counter() - t0) * 1e3)
            break
        # the next running beams: the B best candidates that did not end
        chosen = [i for i in range(len(tokens)) if not ends[i]][:beams]
        beam_parents = [parents[i] for i in chosen]
        running = [running[parents[i]] + [tokens[i]] for i in chosen]
        scores = top_scores[chosen]
        if beam_parents != list(range(beams)):
            model.reorder(cache, beam_parents, n + step)  # indices only; K/V stay in place
        if step > 0:
            out.step_ms.append((time.perf_counter() - t0) * 1e3)
        if on_step:
            on_step(step, running)

        # stop when no running beam can beat the worst kept hypothesis (scored as transformers'
        # heuristic scores it), or when early_stopping is True and B hypotheses are done
        if len(finished) == beams:
            if early_stopping is True:
                break
            reach = budget if early_stopping == "never" and length_penalty > 0 else step + 1
            best_possible = scores[0] / float(reach**length_penalty)
            improvable = improvable and bool(best_possible > finished[-1].score)
            if not improvable:
                break

    best = finished[0]
    out.tokens, out.score, out.hypotheses = best.tokens, best.score, finished
    out.finish_reason = "stop" if best.tokens and best.tokens[-1] in eos else "length"
    return out
