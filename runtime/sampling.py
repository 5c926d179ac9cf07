"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a
seeded generator (the same seed gives the same text)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = np.random.default_rng(params.seed)  # None: fresh entropy

    def __call__(self, logits: np.ndarray) -> int:
        """logits (vocab,) fp32 -> token id"""
        p = self.params
        logits = np.asarray(logits)
        if p.temperature <= 0:
            return int(np.argmax(logits))
        logits = logits.astype(np.float64) / p.temperature
        if 0 < p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        if p.top_p < 1.0:
            order = np.argsort(-logits, kind="stable")
            probs = _softmax(logits[order])
            # drop a token when the tokens before it already cover top_p (the first always stays)
            drop = (np.cumsum(probs) - probs) >= p.top_p
            logits = logits.copy()
            logits[order[drop]] = -np.inf
        probs = _softmax(logits)
        return int(self.generator.choice(probs.size, p=probs))


def _softmax(x: np.ndarray) -> np.ndarray:
    """float64 probabilities summing to 1 (what Generator.choice checks)."""
    e = np.exp(x - x.max())
    return e / e.sum()
