"""Prompt-lookup drafting: guessing the next tokens from the sequence itself, with no draft model.

Grounded work (summaries, extraction, rewrites, code edits, answers from a given passage) often
repeats spans of its own context. When the last few tokens occurred earlier, the tokens that
followed them then are a cheap guess at what follows now; the decoder checks the guess in one
forward (generate.py), which on a memory-bound device costs about what one token does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptLookup:
    """How drafts are made. The longest n-gram (max_ngram down to min_ngram tokens) that ends the
    sequence and occurred before proposes what followed its latest earlier occurrence. The draft
    length adapts per generation: it grows by two while whole drafts are accepted and shrinks by one
    after a rejection, between 1 and max_draft."""

    max_ngram: int = 4
    min_ngram: int = 2
    max_draft: int = 8
    first_draft: int = 4

    def start(self, tokens: Sequence[int]) -> Drafter:
        return Drafter(self, tokens)


class Drafter:
    """The drafting state of one generation: its tokens so far, indexed by n-gram."""

    def __init__(self, lookup: PromptLookup, tokens: Sequence[int]) -> None:
        self.lookup = lookup
        self.length = lookup.first_draft
        self.tokens: list[int] = []
        # n -> n-gram -> index of the token that followed its latest occurrence
        self.follows: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(lookup.min_ngram, lookup.max_ngram + 1)}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the n-grams that end just before this token are now followed by it
            self.tokens.append(token)
            for n, follows in self.follows.items():
                if end >= n:
                    follows[tuple(self.tokens[end - n:end])] = end

    def propose(self, limit: int) -> list[int]:
        """At most min(limit, the current draft length) tokens; empty when nothing matches."""
        limit = min(limit, self.length)
        if limit <= 0:
            return []
        for n in sorted(self.follows, reverse=True):
            start = self.follows[n].get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start:start + limit]
        return []

    def feedback(self, drafted: int, accepted: int) -> None:
        if accepted == drafted:
            self.length = min(self.length + 2, self.lookup.max_draft)
        else:
            self.length = max(self.length - 1, 1)
