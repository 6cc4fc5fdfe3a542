"""The OpenAI request and response forms the server speaks, apart from HTTP: a JSON body checked
into a `Request` (every field's type, range and text judged before anything is queued), and the
logprobs objects clients parse, built from a generation's `TokenLogprob`s."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from http import HTTPStatus
from itertools import accumulate
from typing import Any

from tokenizers import Tokenizer, decoders

from faq_runtime.generate import Generator, TokenLogprob
from faq_runtime.sampling import Sampling, SamplingError

# message roles the template sees; OpenAI's newer "developer" role is its system role
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_TOP_LOGPROBS = {False: 5, True: 20}  # OpenAI's bounds: completions' `logprobs`, chat's `top_logprobs`
MAX_STOPS = 4
# Fields this server accepts only at their no-op values: any other value asks for behaviour it lacks,
# and silently ignoring it would hand back an answer the client did not ask for.
NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "echo": (False,), "suffix": ("",), "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,),
    "logit_bias": ({},), "tools": ([],), "tool_choice": ("none", "auto"), "response_format": ({"type": "text"},),
}


class ApiError(Exception):
    """An answer other than 200, OpenAI-shaped: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: HTTPStatus, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _invalid(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, message, code, param)


@dataclass(frozen=True)
class Request:
    """One completion request, validated: what to generate after and how."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    stream: bool
    top_logprobs: int | None  # None: no logprobs asked for
    include_usage: bool       # stream_options.include_usage: a last chunk with the usage


def _typed(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    """body[name] (absent or null: `default`) when it is a `kind`; JSON's true/false are not numbers."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _invalid(f"'{name}' must be {'an object' if kind is dict else 'a ' + kind.__name__}", name,
                       "invalid_type")
    return value


def _number(body: dict[str, Any], name: str, default: float) -> float:
    """A JSON number as a float; one too large for a float becomes infinity, which Sampling refuses."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(f"'{name}' must be a number", name, "invalid_type")
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _unencodable(body: Any) -> str | None:
    """Where the first string (keys too) that UTF-8 cannot encode is: a JSON escape like \\ud800 decodes
    to a lone surrogate, which the tokenizer cannot take. Iterative: the body may nest deeply."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and not _encodes(value):
            return path
        if isinstance(value, dict):
            for key, item in value.items():
                if not _encodes(key):
                    return path or "body"
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def _content(content: Any, where: str) -> str:
    """A message's content: text, or OpenAI's list of content parts, of which only text parts can be run."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(f"'{where}.content' must be text or a list of content parts", f"{where}.content",
                       "invalid_type")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            described = f"type {kind!r}" if isinstance(kind, str) else "no type"
            raise _invalid(f"'{where}.content[{j}]' has {described}; this model reads only "
                           "{'type': 'text', 'text': ...} parts", f"{where}.content[{j}]", "unsupported_content")
        texts.append(part["text"])
    return "\n".join(texts)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty list", "messages", "invalid_type")
    rendered = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            raise _invalid(f"'{where}' must be an object with a 'role' ({', '.join(ROLES)}) and a 'content'",
                           where)
        rendered.append({"role": ROLES[role], "content": _content(message.get("content"), where)})
    return rendered


def _prompt_ids(body: dict[str, Any], generator: Generator) -> list[int]:
    """The completions prompt: text or token ids, alone or as a batch of one (the only batch we run)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        if ids := generator.encode(prompt):
            return ids
        # text made only of what the tokenizer drops (control characters such as U+0016)
        raise _invalid("'prompt' encodes to no tokens: give it some text", "prompt")
    vocabulary = generator.decoder.spec.vocab_size
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocabulary for t in prompt):
        return prompt
    raise _invalid(f"'prompt' must be non-empty text or a list of token ids below {vocabulary} "
                   "(or a list holding one of these)", "prompt")


def _top_logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """How many alternatives to report per token; None when logprobs are not asked for."""
    if chat:
        top = _typed(body, "top_logprobs", int, None)
        if not _typed(body, "logprobs", bool, False):
            if top is not None:
                raise _invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return None
        name, top = "top_logprobs", top or 0
    else:
        name, top = "logprobs", _typed(body, "logprobs", int, None)
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS[chat]:
        raise _invalid(f"'{name}' must be between 0 and {MAX_TOP_LOGPROBS[chat]}", name)
    return top


def _sampling(body: dict[str, Any]) -> Sampling:
    try:
        return Sampling(temperature=_number(body, "temperature", 1.0), top_k=_typed(body, "top_k", int, 0),
                        top_p=_number(body, "top_p", 1.0),
                        repetition_penalty=_number(body, "repetition_penalty", 1.0),
                        seed=_typed(body, "seed", int, None))
    except SamplingError as exc:
        raise _invalid(str(exc), exc.field) from None


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
        raise _invalid(f"'stop' must be text or a list of up to {MAX_STOPS} texts", "stop")
    return stops


def parse(body: dict[str, Any], chat: bool, served: str, generator: Generator) -> Request:
    """Check a request body against this server's model and context. Cheap checks come before the
    prompt is tokenized; the token budget is judged against the tokenized prompt last."""
    if (where := _unencodable(body)) is not None:
        raise _invalid(f"'{where}' holds text that is not valid Unicode (a lone surrogate escape?)", where)
    model = _typed(body, "model", str, served)  # no model: the one this server runs, as llama.cpp's does
    if model != served:
        raise ApiError(HTTPStatus.NOT_FOUND, f"model {model!r} does not exist; this server runs {served!r}",
                       "model_not_found", "model")
    if _typed(body, "n", int, 1) != 1:
        raise _invalid("only n=1 is supported", "n", "unsupported_value")
    for name, allowed in NO_OP_VALUES.items():
        if body.get(name) is not None and body[name] not in allowed:
            raise _invalid(f"'{name}' is not supported by this server (accepted only as {allowed[0]!r})", name,
                           "unsupported_value")
    stream = _typed(body, "stream", bool, False)
    include_usage = _typed(_typed(body, "stream_options", dict, {}), "include_usage", bool, False)
    sampling, stop, top_logprobs = _sampling(body), _stops(body), _top_logprobs(body, chat)
    limit_field = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    limit = _typed(body, limit_field, int, None if chat else 16)  # 16: OpenAI's completions default
    if limit is not None and limit < 1:
        raise _invalid(f"'{limit_field}' must be at least 1", limit_field)
    if chat:
        if generator.template is None:
            raise _invalid("this model has no chat template; use /v1/completions", None, "unsupported_endpoint")
        try:
            ids = generator.encode(generator.template.render(_messages(body)))
        except ValueError as exc:
            raise _invalid(str(exc), "messages") from None
    else:
        ids = _prompt_ids(body, generator)
    room = generator.context - len(ids)
    if room <= 0 or (limit is not None and limit > room):
        asked = "" if limit is None else f" and {limit_field}={limit}"
        raise _invalid(f"the prompt's {len(ids)} tokens{asked} exceed this model's context of {generator.context} "
                       f"tokens{f'; ask for at most {room}' if room > 0 else ''}",
                       limit_field if room > 0 else "messages" if chat else "prompt", "context_length_exceeded")
    return Request(ids, limit or room, sampling, stop, stream, top_logprobs, include_usage and stream)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as one printable character; this is the way back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's token for one raw byte


class TokenText:
    """Each token's own bytes and text for logprobs: a token can hold part of a UTF-8 character,
    so its bytes are exact and its text shows the undecodable part as U+FFFD."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.alphabet = _byte_level_alphabet() if isinstance(tokenizer.decoder, decoders.ByteLevel) else None
        self.known: dict[int, bytes] = {}

    def bytes(self, token: int) -> bytes:
        if token not in self.known:
            piece = self.tokenizer.id_to_token(token) or ""
            if self.alphabet is not None and all(c in self.alphabet for c in piece):
                self.known[token] = bytes(self.alphabet[c] for c in piece)
            elif match := _BYTE_FALLBACK.fullmatch(piece):
                self.known[token] = bytes([int(match.group(1), 16)])
            else:
                self.known[token] = self.tokenizer.decode([token]).encode()
        return self.known[token]

    def text(self, token: int) -> str:
        return self.bytes(token).decode(errors="replace")

    def chat(self, items: list[TokenLogprob]) -> dict[str, Any]:
        """Chat's form: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
        def entry(token: int, logprob: float) -> dict[str, Any]:
            return {"token": self.text(token), "logprob": logprob, "bytes": list(self.bytes(token))}

        return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                            for t in items], "refusal": None}

    def completion(self, items: list[TokenLogprob], offset: int) -> dict[str, Any]:
        """Completions' form: parallel lists; `text_offset` counts characters from `offset` on."""
        tokens = [self.text(t.token) for t in items]
        offsets = list(accumulate((len(t) for t in tokens), initial=offset))[:len(tokens)]
        return {"tokens": tokens, "token_logprobs": [t.logprob for t in items],
                "top_logprobs": [{self.text(i): lp for i, lp in t.top} for t in items], "text_offset": offsets}
