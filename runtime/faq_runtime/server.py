"""`faq-run serve`: an OpenAI-compatible HTTP server on the standard library's http.server.

Endpoints: GET /healthz, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`"stream": true` as server-sent events). One model, one generation at a time (a board's cores are
all busy with one); up to `max_waiting` more requests queue, the rest get 429 at once.

The device is never held for a client that is not there: a request must arrive whole within
`timeout` seconds (a plain socket timeout restarts at every byte a slow client trickles), every
write may block at most as long, and a client that closes its connection stops its generation
between two tokens, or leaves the queue, within a tenth of a second. Every answer, http.server's
own errors included, is JSON; errors are OpenAI-shaped (openai_forms.ApiError).
"""

from __future__ import annotations

import io
import json
import select
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NoReturn

from faq_runtime.generate import Completion, Generator, OnText, TokenLogprob
from faq_runtime.openai_forms import ApiError, Request, TokenText, parse

MAX_BODY_BYTES = 1 << 20
TIMEOUT_S = 10.0
QUEUE_POLL_S = 0.1      # how often a queued request looks whether its client is still there
DISCARD_S = 1.0         # after a 413, how long an honest client's body is read and dropped
DISCARD_BYTES = 16 << 20
ROUTES = {"/v1/chat/completions": True, "/v1/completions": False}  # path -> chat?


class ClientGone(Exception):
    """The client closed its connection or stopped reading: nobody is left to answer."""


class Queue:
    """The requests admitted to the device, served in arrival order: the first runs, up to
    `max_waiting` more wait. (A plain lock would let a late request overtake ones that waited longer.)"""

    def __init__(self, max_waiting: int) -> None:
        self.capacity = max_waiting + 1
        self.tickets: deque[object] = deque()
        self.changed = threading.Condition()

    def admit(self) -> object | None:
        """A ticket, or None when the queue is full."""
        with self.changed:
            if len(self.tickets) >= self.capacity:
                return None
            self.tickets.append(ticket := object())
            return ticket

    def wait_turn(self, ticket: object, gone: Callable[[], bool]) -> bool:
        """Block until `ticket` is first; False as soon as `gone` says its client left."""
        with self.changed:
            while self.tickets[0] is not ticket:
                if gone():
                    return False
                self.changed.wait(QUEUE_POLL_S)
        return True

    def leave(self, ticket: object) -> None:
        with self.changed:
            if ticket in self.tickets:
                self.tickets.remove(ticket)
                self.changed.notify_all()

    @property
    def busy(self) -> bool:
        return bool(self.tickets)


class Api:
    """The endpoints over one Generator, independent of the HTTP plumbing."""

    def __init__(self, generator: Generator, model: str, max_waiting: int = 4, log: bool = True,
                 timeout: float = TIMEOUT_S) -> None:
        self.generator, self.model, self.log, self.timeout = generator, model, log, timeout
        self.queue = Queue(max_waiting)
        self.token_text = TokenText(generator.tokenizer)
        self.abandoned = 0  # requests whose client left while they waited or ran
        self._counting = threading.Lock()

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                            "owned_by": "faq-deploy"}]}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model, "context": self.generator.context,
                "providers": self.generator.decoder.session.get_providers(), "busy": self.queue.busy,
                "abandoned": self.abandoned}

    def parse(self, body: dict[str, Any], chat: bool) -> Request:
        return parse(body, chat, self.model, self.generator)

    def run(self, request: Request, ticket: object, on_text: OnText | None, gone: Callable[[], bool]) -> Completion:
        """Wait for the device (`ticket`'s turn), giving up as soon as the client leaves, then generate
        until done or until the client leaves (ClientGone either way)."""
        if not self.queue.wait_turn(ticket, gone):
            self._client_left()
        try:
            done = self.generator.complete(request.prompt_ids, request.max_tokens, request.sampling, request.stop,
                                           on_text, request.top_logprobs, gone)
        except OSError:  # a write to the client failed (reset, closed, or blocked past the timeout)
            done = Completion(len(request.prompt_ids), finish_reason="cancelled")
        except Exception as exc:  # onnxruntime's (out of memory, a failed kernel): the server lives on
            traceback.print_exc()
            raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {exc}",
                           "generation_failed") from exc
        finally:
            self.queue.leave(ticket)  # the next request may start while this answer is written
        if done.finish_reason == "cancelled":
            self._client_left()
        return done

    def _client_left(self) -> NoReturn:
        with self._counting:
            self.abandoned += 1
        raise ClientGone


def _usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(done.tokens),
            "total_tokens": done.prompt_tokens + len(done.tokens)}


class _DeadlineReader(io.RawIOBase):
    """The connection's reads, each bounded by what is left until `deadline` (None: no bound)."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request took too long to arrive")
            self.connection.settimeout(left)
        return self.connection.recv_into(buffer)


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.0 (http.server's default): one request per connection, so a connection with nothing
    left to read after its request is one the client has closed."""

    api: Api  # set on the subclass `make_server` makes
    server_version = "faq-runtime"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced by a reader that keeps the request's deadline
        self.reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        self.reader.deadline = time.monotonic() + self.api.timeout
        super().handle_one_request()

    def parse_request(self) -> bool:
        try:
            return super().parse_request()
        except TimeoutError:  # the headers did not arrive in time
            self.send_error(HTTPStatus.REQUEST_TIMEOUT, f"the request did not arrive within {self.api.timeout:g} s")
            self._discard_rest()
            return False

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, headers too long, unknown method) as JSON too."""
        status = HTTPStatus(code)
        self.close_connection = True
        self._error(ApiError(status, message or status.phrase, status.phrase.lower().replace(" ", "_")))

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
        try:
            if (chat := ROUTES.get(self.path)) is None:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no route POST {self.path}", "not_found")
            request = self.api.parse(self._body(), chat)
            if (ticket := self.api.queue.admit()) is None:
                raise ApiError(HTTPStatus.TOO_MANY_REQUESTS, "the server is busy; retry later", "busy")
            try:
                self._stream(request, chat, ticket) if request.stream else self._answer(request, chat, ticket)
            finally:
                self.api.queue.leave(ticket)
        except ApiError as exc:
            self._error(exc)
            if exc.status in (HTTPStatus.REQUEST_ENTITY_TOO_LARGE, HTTPStatus.REQUEST_TIMEOUT):
                self._discard_rest()
        except (ClientGone, OSError):  # nobody left to tell
            self.close_connection = True
        except Exception as exc:  # a bug of ours: the client still gets an answer, the server lives on
            traceback.print_exc()
            self._error(ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}",
                                 "internal_error"))

    def _body(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required", "length_required")
        if not length.strip().isdigit():
            raise ApiError(HTTPStatus.BAD_REQUEST, "Content-Length must be a byte count", "invalid_length")
        if (size := int(length)) > MAX_BODY_BYTES:  # refused before a byte of the body is read
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"the request has {size} bytes; the limit is {MAX_BODY_BYTES}", "request_too_large")
        try:
            data = self.rfile.read(size)
        except TimeoutError:
            raise ApiError(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within {self.api.timeout:g} s",
                           "request_timeout") from None
        if len(data) < size:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(data)} of {size} bytes",
                           "incomplete_body")
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON ({type(exc).__name__}: "
                           f"{str(exc)[:200]})", "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object", "invalid_json")
        return body

    def _discard_rest(self) -> None:
        """After a 413 or 408, read and drop what the client is still sending, briefly: closing on unread
        bytes resets the connection, and a reset can destroy the answer before the client reads it."""
        self.close_connection = True
        self.reader.deadline = time.monotonic() + DISCARD_S
        left = DISCARD_BYTES
        try:
            while left > 0 and (chunk := self.rfile.read1(min(left, 1 << 16))):
                left -= len(chunk)
        except OSError:
            pass

    def _client_gone(self) -> bool:
        """Whether the client has closed its end: readable with nothing to read, or hung up."""
        poller = select.poll()
        poller.register(self.connection, select.POLLIN)
        try:
            events = poller.poll(0)
            if not events:
                return False
            if events[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                return True
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _begin(self, status: HTTPStatus, content_type: str, length: int | None = None) -> None:
        """Start the answer; from here every write may block at most `timeout` seconds."""
        self.reader.deadline = None
        self.connection.settimeout(self.api.timeout)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is None:
            self.send_header("Cache-Control", "no-cache")
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _envelope(self, chat: bool, stream: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": kind,
                "created": int(time.time()), "model": self.api.model}

    def _logprobs(self, request: Request, chat: bool, items: list[TokenLogprob], offset: int) -> Any:
        if request.top_logprobs is None:
            return None
        text = self.api.token_text
        return text.chat(items) if chat else text.completion(items, offset)

    def _answer(self, request: Request, chat: bool, ticket: object) -> None:
        done = self.api.run(request, ticket, None, self._client_gone)
        choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason,
                                  "logprobs": self._logprobs(request, chat, done.logprobs, 0)}
        if chat:
            choice["message"] = {"role": "assistant", "content": done.text}
        else:
            choice["text"] = done.text
        self._json(HTTPStatus.OK, {**self._envelope(chat, stream=False), "choices": [choice], "usage": _usage(done)})

    def _stream(self, request: Request, chat: bool, ticket: object) -> None:
        envelope = self._envelope(chat, stream=True)
        sent = 0  # characters of text sent: completions' logprobs count their text_offset from it

        def send(event: dict[str, Any] | str) -> None:
            data = event if isinstance(event, str) else json.dumps(event)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        def piece(text: str | None, items: list[TokenLogprob], finish: str | None = None) -> None:
            nonlocal sent
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish,
                                      "logprobs": self._logprobs(request, chat, items, sent) if items else None}
            if chat:
                choice["delta"] = {} if text is None else {"content": text}
            else:
                choice["text"] = text or ""
            sent += len(text or "")
            send({**envelope, "choices": [choice]})

        self._begin(HTTPStatus.OK, "text/event-stream")
        if chat:
            send({**envelope, "choices": [{"index": 0, "finish_reason": None, "logprobs": None,
                                           "delta": {"role": "assistant", "content": ""}}]})
        try:
            done = self.api.run(request, ticket, piece, self._client_gone)
        except ApiError as exc:  # the 200 is sent: the error comes as an event, as OpenAI's do
            send(exc.body())
            self.close_connection = True
            return
        piece(None, [], done.finish_reason)
        if request.include_usage:
            send({**envelope, "choices": [], "usage": _usage(done)})
        send("[DONE]")

    def _json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self._begin(status, "application/json", len(data))
        self.wfile.write(data)

    def _error(self, error: ApiError) -> None:
        self._json(error.status, error.body())


def make_server(api: Api, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"api": api})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
