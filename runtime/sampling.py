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
        self.rng = np.random.default_rng(params.seed)  # no seed: fresh entropy from the OS

    def __call__(self, logits: np.ndarray) -> int:
        """logits (vocab,) fp32 -> token id"""
        p = self.params
        logits = np.asarray(logits, np.float32)
        if p.temperature <= 0:
            return int(np.argmax(logits))  # the first of equal maxima
        logits = logits / np.float32(p.temperature)
        if 0 < p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
        if p.top_p < 1.0:
            order = np.argsort(-logits, kind="stable")  # descending
            probs = softmax(logits[order])
            # drop a token when the tokens before it already cover top_p (the first always stays)
            logits[order[(np.cumsum(probs) - probs) >= p.top_p]] = -np.inf
        return int(self.rng.choice(logits.size, p=softmax(logits)))


def softmax(x: np.ndarray) -> np.ndarray:
    """x (n,) -> probabilities (n,) fp64; -inf entries get 0."""
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()
