"""Generation over a Decoder and its KV cache: prefill the prompt once, then a token a step (or a
token and a checked draft, with prompt lookup), with stop tokens, stop strings and text streamed as
it becomes final."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from faq_runtime.lookup import PromptLookup
from faq_runtime.model import ContextFull, Decoder
from faq_runtime.sampling import Sampler, Sampling
from faq_runtime.template import ChatTemplate


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of its raw logits, before any
    sampling option reshapes them) and the `top` likeliest alternatives at that step, best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]

    @classmethod
    def of(cls, logits: np.ndarray, token: int, top: int) -> TokenLogprob:
        logits = logits.astype(np.float64)
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        best = np.argpartition(-logprobs, top)[:top] if top < logprobs.size else np.arange(logprobs.size)
        best = best[np.argsort(-logprobs[best], kind="stable")]
        return cls(token, float(logprobs[token]), [(int(i), float(logprobs[i])) for i in best])


# receives each piece of text as it becomes final, with the log-probabilities of the tokens that
# were generated since the last piece (an empty list when none were asked for)
OnText = Callable[[str, list[TokenLogprob]], None]


@dataclass
class DraftStats:
    """Tokens proposed by prompt lookup, and how many of them the model kept."""

    drafted: int = 0
    accepted: int = 0

    def add(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted

    def as_dict(self) -> dict[str, float | int]:
        rate = self.accepted / self.drafted if self.drafted else 0.0
        return {"drafted": self.drafted, "accepted": self.accepted, "acceptance": round(rate, 4)}


@dataclass
class Completion:
    """What one generation produced; `finish_reason` is "stop" (end token or stop string), "length",
    or "cancelled" (the caller's `cancelled` said so between two tokens)."""

    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    drafts: DraftStats = field(default_factory=DraftStats)


class TextStream:
    """Turns tokens into text that is safe to show: a piece is released only once no stop string can
    still begin in it, and never in the middle of a UTF-8 character split across tokens.

    Each token decodes only a short window of recent tokens, not the whole sequence again: the text
    grows by what the window decodes to beyond its first tokens' own text. Decoding the window from
    its first token keeps decoders that treat a sequence's first token specially (a leading space)
    consistent with one decode of everything."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.window = 0      # tokens[window:] are decoded at each step
        self.decoded = 0     # tokens[:decoded] are in self.text
        self.text = ""       # everything decoded so far
        self.released = 0    # how much of it has been handed out
        self.stopped = False

    def push(self, token: int) -> str:
        self.tokens.append(token)
        searched = max(0, len(self.text) - max(map(len, self.stop), default=0))  # earlier text held no stop
        if not self._catch_up(final=False):
            return ""
        hits = [i for i in (self.text.find(s, searched) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[:min(hits)]
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        self._catch_up(final=True)
        return self._release(len(self.text))

    def _catch_up(self, final: bool) -> bool:
        """Decode the tokens not yet in the text; False while they end inside a UTF-8 character."""
        if self.stopped or self.decoded == len(self.tokens):
            return True
        before = self.tokenizer.decode(self.tokens[self.window:self.decoded])
        after = self.tokenizer.decode(self.tokens[self.window:])
        if after.endswith("\ufffd") and not final:  # wait for the character's next bytes
            return False
        self.text += after[len(before):]
        self.window, self.decoded = self.decoded, len(self.tokens)
        return True

    def _held_back(self) -> int:
        """The longest end of the text that is the start of a stop string."""
        return max((n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)

    def _release(self, end: int) -> str:
        piece = self.text[self.released:max(end, self.released)]
        self.released += len(piece)
        return piece


class Generator:
    """A loaded model: decoder, tokenizer, end tokens and chat template, at a fixed context; with a
    `lookup`, generation drafts tokens by prompt lookup and checks each draft in one forward."""

    def __init__(self, decoder: Decoder, tokenizer: Tokenizer, stop_ids: set[int], template: ChatTemplate | None,
                 context: int, lookup: PromptLookup | None = None) -> None:
        self.decoder, self.tokenizer, self.stop_ids = decoder, tokenizer, stop_ids
        self.template, self.context, self.lookup = template, context, lookup

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def tokens(self, prompt_ids: Sequence[int], max_tokens: int, sampling: Sampling = Sampling()) -> Iterator[int]:
        """Next tokens until an end token, `max_tokens` or the context is full."""
        return (token for token, _ in self.steps(prompt_ids, max_tokens, sampling))

    def steps(self, prompt_ids: Sequence[int], max_tokens: int, sampling: Sampling = Sampling(),
              drafts: DraftStats | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """`tokens`, each with the logits it was picked from; `drafts` counts the drafted and
        accepted tokens. The next forward runs only when the consumer asks for the next token, so a
        consumer that stops early stops the work.

        With a drafter, each forward takes the last token and a draft after it; the logits of
        every position say how much of the draft the sampler keeps (`Sampler.verify`, which keeps
        greedy output exactly greedy and a sampled one distributed as without drafts), and one more
        token comes free from the last kept position. The cache then forgets the rejected part."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.context:
            raise ContextFull(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.context}, "
                              "the prompt included")
        max_tokens = min(max_tokens, self.context - len(prompt_ids))
        cache = self.decoder.new_cache(len(prompt_ids) + max_tokens - 1)
        pick = Sampler(sampling)
        seen = list(prompt_ids)
        drafter = self.lookup.start(prompt_ids) if self.lookup else None
        token = pick(logits := self.decoder.step(prompt_ids, cache), seen)
        produced = 0
        while token not in self.stop_ids:
            yield token, logits
            produced += 1
            if produced == max_tokens:
                return
            seen.append(token)
            if drafter is None:
                token = pick(logits := self.decoder.step([token], cache), seen)
                continue
            drafter.extend([token])
            # room for the draft and the token after it, within max_tokens (and so within the cache)
            draft = drafter.propose(max_tokens - produced - 1)
            kept_length = cache.length + 1  # the token is kept whatever becomes of the draft
            rows = self.decoder.rows([token, *draft], cache)
            for position, logits in enumerate(rows):
                if position == len(draft):  # past the draft: the free token
                    token = pick(logits, seen)
                    break
                token, kept = pick.verify(logits, seen, draft[position])
                if not kept or token in self.stop_ids:
                    break
                yield token, logits
                produced += 1
                seen.append(token)
                drafter.extend([token])
            kept_drafts = position
            if draft:
                drafter.feedback(len(draft), kept_drafts)
                if drafts is not None:
                    drafts.add(len(draft), kept_drafts)
            cache.rewind(kept_length + kept_drafts)

    def complete(self, prompt_ids: Sequence[int], max_tokens: int, sampling: Sampling = Sampling(),
                 stop: Sequence[str] = (), on_text: OnText | None = None, top_logprobs: int | None = None,
                 cancelled: Callable[[], bool] | None = None) -> Completion:
        """Generate after `prompt_ids`. `top_logprobs` (None: off) records each token's log-probability
        with that many alternatives; `cancelled` is asked before every step."""
        done = Completion(len(prompt_ids))
        if cancelled and cancelled():
            done.finish_reason = "cancelled"
            return done
        stream = TextStream(self.tokenizer, stop)
        unsent: list[TokenLogprob] = []  # logprobs of tokens whose text is still held back
        for token, logits in self.steps(prompt_ids, max_tokens, sampling, done.drafts):
            done.tokens.append(token)
            if top_logprobs is not None:
                done.logprobs.append(TokenLogprob.of(logits, token, top_logprobs))
                unsent.append(done.logprobs[-1])
            piece = stream.push(token)
            if piece and on_text:
                on_text(piece, unsent)
                unsent = []
            if stream.stopped:
                break
            if cancelled and cancelled():
                done.finish_reason = "cancelled"
                return done
        budget = min(max_tokens, self.context - len(prompt_ids))
        done.finish_reason = "stop" if stream.stopped or len(done.tokens) < budget else "length"
        if ((rest := stream.flush()) or unsent) and on_text:
            on_text(rest, unsent)
        done.text = stream.text
        return done
