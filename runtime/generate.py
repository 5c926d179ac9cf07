"""The generation loop: prefill the prompt, then one token per decode step until a stop.

result = generate(model, prompt_ids, max_new_tokens=16, sampler=Sampler(...), eos_ids={2},
                  on_token=print_id)
result = generate(model, prompt_ids, 16, sampler, eos_ids={2},
                  stop=StopChecker(tokenizer, ["\\n\\n"], {2}), on_text=print_piece)

finish_reason: "stop" (an EOS id or a stop string) or "length" (max_new_tokens or the context).
With a StopChecker the result's `text` is the text up to the stop string, streamed to on_text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from xcompile.errors import UserError
from xcompile.runtime.model import Model
from xcompile.runtime.sampling import Sampler
from xcompile.runtime.stopping import StopChecker


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    text: str | None = None  # with a StopChecker: the text before any stop string
    stop_reason: str | None = None  # the stop string that stopped it (None for EOS, as vLLM)
    prefill_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)

    @property
    def per_token_ms(self) -> float:
        return sum(self.decode_ms) / len(self.decode_ms) if self.decode_ms else 0.0


def check_prompt(model: Model, prompt_ids: list[int]) -> None:
    if not prompt_ids:
        raise UserError("the prompt is empty after tokenization; give some text")
    if len(prompt_ids) >= model.context:
        raise UserError(
            f"the prompt is {len(prompt_ids)} tokens, the model's context is "
            f"{model.context}; shorten the prompt"
        )


def generate(
    model: Model,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampler: Sampler,
    eos_ids: set[int],
    on_token: Callable[[int], None] | None = None,
    *,
    stop: StopChecker | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """on_token sees every id as it is sampled; with `stop`, on_text gets the text that is safe
    to show (never part of a stop string) and a stop string ends generation."""
    check_prompt(model, prompt_ids)
    budget = min(max_new_tokens, model.context - len(prompt_ids))
    cache = model.new_cache(len(prompt_ids) + budget)
    out = Generation(prompt_tokens=len(prompt_ids), text="" if stop is not None else None)

    def show(text: str) -> None:
        if text:
            out.text += text
            if on_text:
                on_text(text)

    if budget <= 0:
        return out

    switch = model.config.get("rope_switch")  # longrope: where the long factors begin
    t0 = time.perf_counter()
    logits = model.forward(prompt_ids, 0, cache, last_only=True)[-1]
    out.prefill_ms = (time.perf_counter() - t0) * 1e3
    position = len(prompt_ids)
    while True:
        token = sampler(logits)
        out.tokens.append(token)
        if on_token:
            on_token(token)
        if stop is not None:
            text, reason = stop.push(token)
            show(text)
            if reason is not None:
                out.finish_reason, out.stop_reason = reason, stop.stop_reason
                return out
        if token in eos_ids:
            out.finish_reason = "stop"
            break
        if len(out.tokens) >= budget:
            break
        t0 = time.perf_counter()
        if position == switch:  # longrope: transformers re-runs the whole sequence once with
            # the long factors when it first grows past the switch (Phi3's generation inputs)
            logits = model.forward(prompt_ids + out.tokens, 0, cache, last_only=True)[-1]
        else:
            logits = model.forward([token], position, cache)[-1]
        out.decode_ms.append((time.perf_counter() - t0) * 1e3)
        position += 1
    if stop is not None:
        show(stop.flush())
        if stop.finish_reason is not None:  # the last piece completed a stop string
            out.finish_reason, out.stop_reason = stop.finish_reason, stop.stop_reason
    return out
