"""`faq-run serve`: an OpenAI-compatible HTTP server on the standard library's http.server.

Endpoints: GET /healthz, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`"stream": true` as server-sent events). One model, one generation at a time (a board's cores are
all busy with one); up to `max_waiting` more requests queue, the rest get 429 at once. Errors are
OpenAI-shaped JSON: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from faq_runtime.generate import Completion, Generator
from faq_runtime.sampling import Sampling

MAX_BODY_BYTES = 1 << 20
DRAIN_LIMIT = 16 << 20


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """One completion request, validated: what to generate after and how."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    stream: bool


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ApiError(HTTPStatus.BAD_REQUEST, f"'{name}' must be {names}", "invalid_type", name)
    return value


class Api:
    """The endpoints over one Generator, independent of the HTTP plumbing."""

    def __init__(self, generator: Generator, model: str, max_waiting: int = 4, log: bool = True) -> None:
        self.generator, self.model, self.log = generator, model, log
        self.running = threading.Lock()
        self.admitted = threading.BoundedSemaphore(max_waiting + 1)

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                            "owned_by": "faq-deploy"}]}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model, "context": self.generator.context,
                "providers": self.generator.decoder.session.get_providers()}

    def parse(self, body: dict[str, Any], chat: bool) -> Request:
        if (model := body.get("model")) != self.model:
            raise ApiError(HTTPStatus.NOT_FOUND, f"model {model!r} does not exist; this server runs {self.model!r}",
                           "model_not_found", "model")
        if _field(body, "n", int, 1) != 1:
            raise ApiError(HTTPStatus.BAD_REQUEST, "only n=1 is supported", "unsupported_value", "n")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(HTTPStatus.BAD_REQUEST, "'messages' must be a non-empty list", "invalid_type",
                               "messages")
            if self.generator.template is None:
                raise ApiError(HTTPStatus.BAD_REQUEST, "this model has no chat template; use /v1/completions",
                               "unsupported_endpoint")
            try:
                prompt = self.generator.template.render(messages)
            except ValueError as exc:
                raise ApiError(HTTPStatus.BAD_REQUEST, str(exc), "invalid_value", "messages") from None
            limit = _field(body, "max_completion_tokens", int, None) or _field(body, "max_tokens", int, None)
        else:
            prompt = _field(body, "prompt", (str, list), None)
            if isinstance(prompt, list):  # the API allows a list of prompts: a batch of one is all we run
                if len(prompt) != 1 or not isinstance(prompt[0], str):
                    raise ApiError(HTTPStatus.BAD_REQUEST, "'prompt' must be a string or a list of one string",
                                   "invalid_value", "prompt")
                prompt = prompt[0]
            if not prompt:
                raise ApiError(HTTPStatus.BAD_REQUEST, "'prompt' must be a non-empty string", "invalid_value",
                               "prompt")
            limit = _field(body, "max_tokens", int, 16)  # the OpenAI default for completions
        ids = self.generator.encode(prompt)
        room = self.generator.context - len(ids)
        if room <= 0:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the prompt has {len(ids)} tokens; this model's context holds "
                           f"{self.generator.context}", "context_length_exceeded", "messages" if chat else "prompt")
        if limit is not None and limit < 1:
            raise ApiError(HTTPStatus.BAD_REQUEST, "max_tokens must be at least 1", "invalid_value", "max_tokens")
        stop = _field(body, "stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        if len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise ApiError(HTTPStatus.BAD_REQUEST, "'stop' must be a string or up to 4 strings", "invalid_value",
                           "stop")
        try:
            sampling = Sampling(temperature=float(_field(body, "temperature", (int, float), 1.0)),
                                top_k=_field(body, "top_k", int, 0),
                                top_p=float(_field(body, "top_p", (int, float), 1.0)),
                                repetition_penalty=float(_field(body, "repetition_penalty", (int, float), 1.0)),
                                seed=_field(body, "seed", int, None))
        except ValueError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc), "invalid_value") from None
        return Request(ids, min(limit or room, room), sampling, stop, bool(_field(body, "stream", bool, False)))

    def run(self, request: Request, on_text: Callable[[str], None] | None = None) -> Completion:
        with self.running:  # `parse` bounded the prompt and max_tokens by the context
            try:
                return self.generator.complete(request.prompt_ids, request.max_tokens, request.sampling,
                                               request.stop, on_text)
            except (BrokenPipeError, ConnectionResetError):
                raise
            except Exception as exc:  # onnxruntime's (out of memory, a failed kernel): the server lives on
                traceback.print_exc()
                raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {exc}",
                               "generation_failed") from exc


def _usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(done.tokens),
            "total_tokens": done.prompt_tokens + len(done.tokens)}


class Handler(BaseHTTPRequestHandler):
    api: Api  # set on the subclass `serve` makes
    server_version = "faq-runtime"

    def log_message(self, format: str, *args: Any) -> None:  # one line per request, as http.server does
        if self.api.log:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        routes = {"/healthz": self.api.health, "/v1/models": self.api.models}
        if self.path in routes:
            self._json(HTTPStatus.OK, routes[self.path]())
        else:
            self._error(ApiError(HTTPStatus.NOT_FOUND, f"no route GET {self.path}", "not_found"))

    def do_POST(self) -> None:
        chat = {"/v1/chat/completions": True, "/v1/completions": False}.get(self.path)
        try:
            if chat is None:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no route POST {self.path}", "not_found")
            request = self.api.parse(self._body(), chat)
            if not self.api.admitted.acquire(blocking=False):
                raise ApiError(HTTPStatus.TOO_MANY_REQUESTS, "the server is busy; retry later", "busy")
            try:
                self._stream(request, chat) if request.stream else self._answer(request, chat)
            finally:
                self.api.admitted.release()
        except ApiError as exc:
            self._error(exc)
        except (BrokenPipeError, ConnectionResetError):  # the client left mid-stream: nothing to tell it
            pass

    def _body(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required", "length_required")
        if int(length) > MAX_BODY_BYTES:
            self._drain(int(length))
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"the request has {int(length)} bytes; the limit is {MAX_BODY_BYTES}", "request_too_large")
        try:
            body = json.loads(self.rfile.read(int(length)))
        except ValueError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON ({exc})", "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object", "invalid_json")
        return body

    def _drain(self, length: int) -> None:
        """Read and drop an oversized body (up to a bound), so the client, still sending, gets our
        413 instead of a broken pipe; past the bound the connection just closes after the answer."""
        left = min(length, DRAIN_LIMIT)
        while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
            left -= len(chunk)
        self.close_connection = True

    def _envelope(self, chat: bool) -> dict[str, Any]:
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": self.api.model}

    def _answer(self, request: Request, chat: bool) -> None:
        done = self.api.run(request)
        choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": done.text}
        else:
            choice.update(text=done.text, logprobs=None)
        self._json(HTTPStatus.OK, {**self._envelope(chat), "object": "chat.completion" if chat else "text_completion",
                                   "choices": [choice], "usage": _usage(done)})

    def _stream(self, request: Request, chat: bool) -> None:
        envelope = {**self._envelope(chat), "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(text: str | None, finish: str | None = None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = {} if text is None else {"content": text}
            else:
                choice.update(text=text or "", logprobs=None)
            return {**envelope, "choices": [choice]}

        def send(event: dict[str, Any] | str) -> None:
            data = event if isinstance(event, str) else json.dumps(event)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if chat:
            first = chunk(None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            send(first)
        try:
            done = self.api.run(request, lambda piece: send(chunk(piece)))
        except ApiError as exc:  # the 200 is sent: the error comes as an event, as OpenAI's do
            send(exc.body())
            self.close_connection = True
            return
        send(chunk(None, done.finish_reason))
        send("[DONE]")

    def _json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, error: ApiError) -> None:
        self._json(error.status, error.body())


def make_server(api: Api, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"api": api})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
