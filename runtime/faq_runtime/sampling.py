"""Choosing the next token from logits: greedy, or sampled with the usual knobs, reproducible by seed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SEED_RANGE = (-(1 << 63), 1 << 64)  # a signed or unsigned 64-bit seed, as clients send them


class SamplingError(ValueError):
    """An option out of its range; `field` names the first one, for the server's error `param`."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(message for _, message in problems))
        self.field = problems[0][0]


@dataclass(frozen=True)
class Sampling:
    """`temperature` 0 is greedy (the other knobs then only apply the repetition penalty).

    Both the CLI and the server build their options through this class, so its checks are the one
    place a value is judged: finite numbers only (Python's json and float() both accept NaN and
    infinity), each in its range."""

    temperature: float = 0.0
    top_k: int = 0          # 0: no top-k cut
    top_p: float = 1.0      # nucleus: the smallest set of tokens whose probability reaches top_p
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = [(name, f"{name} must be a finite number, got {value}")
                    for name, value in (("temperature", self.temperature), ("top_p", self.top_p),
                                        ("repetition_penalty", self.repetition_penalty)) if not math.isfinite(value)]
        if self.temperature < 0:
            problems.append(("temperature", f"temperature must be >= 0, got {self.temperature}"))
        if self.top_k < 0:
            problems.append(("top_k", f"top_k must be >= 0, got {self.top_k}"))
        if not 0 < self.top_p <= 1:
            problems.append(("top_p", f"top_p must be in (0, 1], got {self.top_p}"))
        if self.repetition_penalty <= 0:
            problems.append(("repetition_penalty", f"repetition_penalty must be > 0, got {self.repetition_penalty}"))
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            problems.append(("seed", f"seed must be a 64-bit integer, got {self.seed}"))
        if problems:
            raise SamplingError(problems)


class Sampler:
    """One generation's token picker; its random stream starts from the seed, so a seeded run repeats."""

    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling
        seed = None if sampling.seed is None else sampling.seed % SEED_RANGE[1]  # numpy takes no negative seed
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray, seen: Sequence[int]) -> int:
        if self.sampling.temperature == 0:
            return self._greedy(logits, seen)
        probs = self._probabilities(logits, seen)
        return int(self.rng.choice(probs.size, p=probs))

    def verify(self, logits: np.ndarray, seen: Sequence[int], drafted: int) -> tuple[int, bool]:
        """The token to emit where a drafter proposed `drafted`, and whether that was it.

        Speculative sampling's rule for a drafter that proposes one token with certainty (prompt
        lookup): keep `drafted` with its probability p(drafted), else draw from p without it. The
        token is then distributed exactly as `self(logits, seen)` would draw it: p(d) for d, and
        (1 - p(d)) * p(x) / (1 - p(d)) = p(x) for every other x. Greedy keeps it when it is the argmax."""
        if self.sampling.temperature == 0:
            token = self._greedy(logits, seen)
            return token, token == drafted
        probs = self._probabilities(logits, seen)
        if self.rng.random() < probs[drafted]:
            return drafted, True
        probs[drafted] = 0.0
        return int(self.rng.choice(probs.size, p=probs / probs.sum())), False

    def _greedy(self, logits: np.ndarray, seen: Sequence[int]) -> int:
        if self.sampling.repetition_penalty == 1.0:
            return int(logits.argmax())  # plain greedy: no copy of the vocabulary-sized row per token
        return int(self._penalized(logits, seen).argmax())

    def _penalized(self, logits: np.ndarray, seen: Sequence[int]) -> np.ndarray:
        logits = logits.astype(np.float64)
        penalty = self.sampling.repetition_penalty
        if penalty != 1.0 and seen:
            # CTRL's penalty, as transformers applies it: shrink positive logits, grow negative ones
            ids = np.unique(np.asarray(seen))
            logits[ids] = np.where(logits[ids] > 0, logits[ids] / penalty, logits[ids] * penalty)
        return logits

    def _probabilities(self, logits: np.ndarray, seen: Sequence[int]) -> np.ndarray:
        """The distribution a sampled token is drawn from (float64, sums to 1)."""
        s = self.sampling
        logits = self._penalized(logits, seen)
        # shift before scaling: a tiny temperature then sends the others to -inf, never the best to inf
        logits = (logits - logits.max()) / s.temperature
        if 0 < s.top_k < logits.size:
            kth = np.partition(logits, -s.top_k)[-s.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits)
        probs /= probs.sum()
        if s.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # keep every token up to and including the one that brings the mass to top_p
            cut = order[int(np.searchsorted(cumulative, s.top_p)) + 1:]
            probs[cut] = 0.0
            probs /= probs.sum()
        return probs
