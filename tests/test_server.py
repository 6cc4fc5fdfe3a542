"""`faq-run serve` on a real bundle of the default model: the real `openai` client, hostile and broken
clients on raw sockets, and a property-based fuzz of both endpoints."""

from __future__ import annotations

import http.client
import json
import select
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import openai
import pytest
from commands import FAQ_RUN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from faq_runtime.generate import Generator
from faq_runtime.load import LoadOptions, load
from faq_runtime.server import Api, make_server

PROMPT = "The Congress shall have power to"
QUESTION = "What is the capital of France?"
TIMEOUT_S = 2  # the test servers' --timeout: how long a request may take to arrive
DOCUMENTED = {200, 400, 404, 408, 411, 413, 429, 500}  # docs/server.md lists each


@dataclass
class Served:
    url: str  # ends in /v1
    process: subprocess.Popen[str]

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").removesuffix("/v1").split(":")
        return host, int(port)

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url.removesuffix("/v1") + "/healthz", timeout=10) as answer:
            return json.loads(answer.read())


@contextmanager
def serving(bundle: Path, context: int) -> Iterator[Served]:
    process = subprocess.Popen([*FAQ_RUN, "serve", str(bundle), "--port", "0", "--context", str(context),
                                "--model-name", "smol", "--timeout", str(TIMEOUT_S), "--threads", "2", "--quiet"],
                               stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    line = process.stderr.readline()
    assert "serving smol on http://" in line, line + process.stderr.read()
    threading.Thread(target=process.stderr.read, daemon=True).start()  # tracebacks must not fill the pipe
    try:
        yield Served(line.split(" on ")[1].split()[0], process)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def served(x86_bundle: Path) -> Iterator[Served]:
    with serving(x86_bundle, 128) as server:
        yield server


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url, api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def generator(x86_bundle: Path) -> Generator:
    return load(x86_bundle, LoadOptions(threads=2))


def post(served: Served, path: str, body: bytes | dict[str, Any], timeout: float = 60) -> tuple[int, str, bytes]:
    """One POST on its own connection: status, content type and body as the server sent them."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection = http.client.HTTPConnection(*served.address, timeout=timeout)
    try:
        connection.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, answer.getheader("Content-Type", ""), answer.read()
    finally:
        connection.close()


def error_of(served: Served, body: bytes | dict[str, Any], path: str = "/v1/completions") -> tuple[int, dict]:
    status, _, raw = post(served, path, body)
    return status, json.loads(raw)["error"]


def raw_request(served: Served, body: dict[str, Any], path: str = "/v1/completions") -> socket.socket:
    """A request sent on a bare socket, whose client can then vanish without reading a byte."""
    data = json.dumps(body).encode()
    connection = socket.create_connection(served.address)
    connection.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return connection


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def test_the_server_answers_the_openai_client(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["smol"]
    messages = [{"role": "user", "content": QUESTION}]
    answer = client.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=0)
    text = answer.choices[0].message.content
    assert "Paris" in text and answer.usage.completion_tokens <= 12
    chunks = client.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens and not chunks[-1].choices
    completion = client.completions.create(model="smol", prompt=PROMPT, max_tokens=8, temperature=0, stop=["\n"])
    assert completion.choices[0].text and "\n" not in completion.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smol", prompt=PROMPT, max_tokens=8, temperature=0, stop=["\n"], stream=True))
    assert streamed == completion.choices[0].text
    seeded = [client.completions.create(model="smol", prompt=PROMPT, max_tokens=8, seed=3).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_content_parts_are_read_as_their_text_and_other_parts_refused(client: openai.OpenAI) -> None:
    def ask(content: Any) -> str:
        answer = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": content}],
                                                max_tokens=12, temperature=0)
        return answer.choices[0].message.content

    assert ask([{"type": "text", "text": QUESTION}]) == ask(QUESTION)
    with pytest.raises(openai.BadRequestError) as refused:
        ask([{"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": {"url": "data:,"}}])
    assert refused.value.code == "unsupported_content" and "'image_url'" in refused.value.message
    assert refused.value.param == "messages[0].content[1]"


def test_a_request_without_a_model_gets_the_served_one(served: Served, client: openai.OpenAI) -> None:
    status, _, raw = post(served, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert status == 200
    answer = json.loads(raw)
    assert answer["model"] == "smol"
    expected = client.completions.create(model="smol", prompt=PROMPT, max_tokens=4, temperature=0)
    assert answer["choices"][0]["text"] == expected.choices[0].text
    with pytest.raises(openai.NotFoundError) as other:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert other.value.code == "model_not_found" and "this server runs 'smol'" in other.value.message


def test_logprobs_are_the_log_softmax_of_the_logits(client: openai.OpenAI, generator: Generator) -> None:
    ids = generator.encode(PROMPT)
    expected = [(token, log_softmax(logits)) for token, logits in generator.steps(ids, 6)]
    completion = client.completions.create(model="smol", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=5)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 6
    for (token, reference), value, top in zip(expected, logprobs.token_logprobs, logprobs.top_logprobs,
                                              strict=True):
        assert value == pytest.approx(reference[token], abs=1e-4)
        best = np.argsort(-reference)[:5]
        assert list(top.values()) == pytest.approx(list(reference[best]), abs=1e-4)
        assert list(top) == [generator.tokenizer.decode([int(i)]) for i in best]
    assert "".join(logprobs.tokens) == completion.choices[0].text

    messages = [{"role": "user", "content": QUESTION}]
    chat_ids = generator.encode(generator.template.render(messages))
    expected = [(token, log_softmax(logits)) for token, logits in generator.steps(chat_ids, 8)]
    answer = client.chat.completions.create(model="smol", messages=messages, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    for (token, reference), entry in zip(expected, content, strict=True):
        assert entry.logprob == pytest.approx(reference[token], abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(list(np.sort(reference)[::-1][:3]), abs=1e-4)
        assert bytes(entry.bytes).decode() == generator.tokenizer.decode([token])
    assert b"".join(bytes(e.bytes) for e in content).decode() == answer.choices[0].message.content

    streamed = [c for c in client.chat.completions.create(model="smol", messages=messages, max_tokens=8,
                                                          temperature=0, logprobs=True, top_logprobs=3, stream=True)]
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in content]
    chunks = client.completions.create(model="smol", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                       stream=True)
    streamed_values = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed_values == pytest.approx(logprobs.token_logprobs, abs=1e-9)


def test_values_that_are_not_numbers_or_text_are_refused_before_queueing(served: Served,
                                                                         generator: Generator) -> None:
    for body, field in [(b'{"prompt": "Hi", "temperature": NaN}', "temperature"),
                        (b'{"prompt": "Hi", "temperature": 1e999}', "temperature"),
                        (b'{"prompt": "Hi", "top_p": -Infinity}', "top_p"),
                        (b'{"prompt": "Hi", "repetition_penalty": ' + b"9" * 400 + b"}", "repetition_penalty"),
                        (b'{"prompt": "\\ud800"}', "prompt"),
                        (b'{"prompt": "\\u0016"}', "prompt"),  # text the tokenizer drops whole: no tokens
                        (b'{"prompt": "Hi", "stop": ["\\udfff"]}', "stop[0]"),
                        (b'{"prompt": "Hi", "seed": ' + str(1 << 64).encode() + b"}", "seed"),
                        (b'{"prompt": "Hi", "logprobs": 6}', "logprobs"),
                        (b'{"prompt": "Hi", "presence_penalty": 0.5}', "presence_penalty")]:
        status, error = error_of(served, body)
        assert (status, error["param"]) == (400, field), (body, error)
    status, error = error_of(served, b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]}',
                             "/v1/chat/completions")
    assert (status, error["param"]) == (400, "messages[0].content")
    status, error = error_of(served, {"prompt": PROMPT, "max_tokens": 100_000_000})
    assert (status, error["code"], error["param"]) == (400, "context_length_exceeded", "max_tokens")
    assert f"ask for at most {128 - len(generator.encode(PROMPT))}" in error["message"]
    status, error = error_of(served, b"[" * 100_000 + b"]" * 100_000)
    assert (status, error["code"]) == (400, "invalid_json")
    assert served.health()["busy"] is False


def test_the_cli_checks_sampling_options_before_loading_anything(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-bundle"  # a bundle error would mean the options were judged after loading
    for option, value, message in [("--temperature", "nan", "temperature must be a finite number"),
                                   ("--top-p", "inf", "top_p must be a finite number"),
                                   ("--max-tokens", "0", "--max-tokens: must be at least 1")]:
        done = subprocess.run([*FAQ_RUN, "generate", str(missing), "--prompt", "Hi", option, value],
                              capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_a_client_that_leaves_frees_the_device_at_once(x86_bundle: Path) -> None:
    with serving(x86_bundle, 1024) as served:
        running = raw_request(served, {"prompt": PROMPT, "max_tokens": 1000, "temperature": 0})
        time.sleep(0.5)
        assert served.health()["busy"]
        queued = raw_request(served, {"prompt": PROMPT, "max_tokens": 1000, "stream": True})
        time.sleep(0.5)
        running.close()
        queued.close()
        left = time.monotonic()
        client = openai.OpenAI(base_url=served.url, api_key="none", max_retries=0)
        stream = client.completions.create(model="smol", prompt=PROMPT, max_tokens=4, stream=True)
        next(iter(stream))
        started = time.monotonic() - left
        list(stream)
        assert started < 1.0, f"the next request started {started:.2f} s after the clients left"
        while served.health()["abandoned"] < 2 and time.monotonic() - left < 2:
            time.sleep(0.05)  # the queued one may still be between two looks at its connection
        assert served.health()["abandoned"] == 2

        streaming = raw_request(served, {"prompt": PROMPT, "max_tokens": 1000, "stream": True})
        assert streaming.recv(1 << 12).startswith(b"HTTP/1.0 200")  # it runs and writes
        streaming.close()
        deadline = time.monotonic() + 1.0
        while served.health()["busy"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not served.health()["busy"] and served.health()["abandoned"] == 3


def test_a_slow_client_is_cut_off_at_the_deadline_and_others_are_served(served: Served,
                                                                        client: openai.OpenAI) -> None:
    def trickle(head: bytes, drip: bytes) -> tuple[bytes, float]:
        """Send `head`, then one byte of `drip` every 0.2 s until the server answers."""
        connection = socket.create_connection(served.address, timeout=30)
        start = time.monotonic()
        connection.sendall(head)
        for byte in drip:
            if select.select([connection], [], [], 0.2)[0]:
                break
            connection.send(bytes([byte]))
        answer = connection.recv(1 << 12)
        seconds = time.monotonic() - start
        # the server closes after its 408: read to the end, the body can come in a later segment
        answer += b"".join(iter(lambda: connection.recv(1 << 12), b""))
        connection.close()
        return answer, seconds

    results: list[tuple[bytes, float]] = []
    slow = [threading.Thread(target=lambda: results.append(trickle(b"POST /v1/completions HTTP/1.1\r\n",
                                                                   b"X-Padding: " + b"x" * 100))),
            threading.Thread(target=lambda: results.append(trickle(
                b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n", b" " * 100)))]
    for thread in slow:
        thread.start()
    time.sleep(0.5)
    assert client.completions.create(model="smol", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    for thread in slow:
        thread.join(timeout=30)
    assert len(results) == 2
    for answer, seconds in results:
        assert answer.startswith(b"HTTP/1.0 408") and b'"request_timeout"' in answer, answer
        assert TIMEOUT_S <= seconds < TIMEOUT_S + 1.5


def test_a_body_over_the_limit_is_refused_before_it_is_read(served: Served) -> None:
    connection = socket.create_connection(served.address, timeout=30)
    start = time.monotonic()
    connection.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n{}")
    answer = connection.recv(1 << 12)
    assert answer.startswith(b"HTTP/1.0 413") and time.monotonic() - start < 1.0
    connection.close()
    status, error = error_of(served, b"x" * (2 << 20), "/v1/chat/completions")  # an honest one reads it too
    assert (status, error["code"]) == (413, "request_too_large")


def test_a_generation_that_fails_is_a_json_error_and_the_server_lives_on(x86_bundle: Path, tmp_path: Path) -> None:
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "another_model",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, [1, None])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              tmp_path / "other.onnx")
    broken = load(x86_bundle, LoadOptions(threads=1, check_device=False))
    # A real session of a graph without the decoder's inputs: onnxruntime itself fails mid-request
    broken.decoder.session = ort.InferenceSession(str(tmp_path / "other.onnx"))
    server = make_server(Api(broken, "smol", log=False), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="none", max_retries=0)
    try:
        with pytest.raises(openai.InternalServerError) as failed:
            client.completions.create(model="smol", prompt=PROMPT, max_tokens=4)
        assert failed.value.code == "generation_failed" and "past_key_values.0.key" in failed.value.message
        with pytest.raises(openai.APIError, match="generation failed"):  # after the 200: an error event
            list(client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, stream=True))
        assert [m.id for m in client.models.list()] == ["smol"]
    finally:
        server.shutdown()


# --- the fuzz: random JSON where the server expects a request -------------------------------------

FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "repetition_penalty", "seed", "stop", "stream", "stream_options", "logprobs", "top_logprobs", "n",
          "echo", "presence_penalty", "logit_bias", "tools", "response_format", "user"]
# every code point, lone surrogates and control characters included (json.dumps escapes them)
texts = st.text(st.characters(exclude_categories=()), max_size=12)
numbers = st.one_of(st.integers(-5, 40), st.integers(), st.integers(-(1 << 80), 1 << 80),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, -1, 0.5, 1e308]))
leaves = st.one_of(st.none(), st.booleans(), numbers, texts, st.just("smol"))
values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(texts, inner, max_size=4)), max_leaves=12)
parts = st.lists(st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
                           st.fixed_dictionaries({"type": st.one_of(texts, st.just("image_url"))}), values),
                 max_size=3)
messages = st.lists(st.one_of(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(
    ["user", "system", "assistant", "developer", "tool"]), texts, values),
    "content": st.one_of(texts, parts, values)}), values), max_size=3)
# well-formed requests (fields of both endpoints: each ignores the other's), alone or with random fields
# laid over them, so the fuzz reaches generation as well as every check on the way there
clean_text = st.text(min_size=1, max_size=24)
well_formed = st.fixed_dictionaries(
    {"model": st.just("smol"), "prompt": clean_text,
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer"]),
                                                 "content": st.one_of(clean_text, st.lists(st.fixed_dictionaries(
                                                     {"type": st.just("text"), "text": clean_text}), max_size=2))}),
                          min_size=1, max_size=2)},
    optional={"max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1),
              "top_k": st.integers(0, 50), "seed": st.integers(0, 1 << 63), "stream": st.booleans(),
              "stop": st.lists(st.text(max_size=3), max_size=4), "logprobs": st.integers(0, 5)})
requests = st.one_of(
    well_formed,
    st.tuples(well_formed, st.dictionaries(st.sampled_from(FIELDS), values, max_size=2)).map(
        lambda pair: {**pair[0], **pair[1]}),
    st.dictionaries(st.one_of(st.sampled_from(FIELDS), texts), values, max_size=8),
    st.fixed_dictionaries({"model": st.one_of(st.just("smol"), values)},
                          optional={"prompt": st.one_of(texts, st.lists(st.integers(-2, 60_000), max_size=4),
                                                        values),
                                    "messages": st.one_of(messages, values),
                                    **{name: st.one_of(numbers, values) for name in FIELDS[3:11]},
                                    "stream": st.booleans(), "logprobs": st.one_of(st.integers(-1, 6),
                                                                                   st.booleans(), values),
                                    "top_logprobs": st.integers(-1, 21)}),
    values)
nesting = st.integers(1, 200_000).map(lambda depth: b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}")
bodies = st.one_of(requests.map(lambda body: json.dumps(body).encode()), nesting, st.binary(max_size=64))


def events(raw: bytes) -> list[Any]:
    """A server-sent event stream's data lines, each JSON but the final [DONE]."""
    lines = [line.removeprefix(b"data: ") for line in raw.split(b"\n\n") if line]
    assert lines and all(line.strip() for line in lines)
    return [line if line == b"[DONE]" else json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def fuzzed(x86_bundle: Path) -> Iterator[Served]:
    with serving(x86_bundle, 48) as server:  # a short context bounds every generation the fuzz asks for
        yield server


def test_random_json_always_gets_a_documented_json_answer(fuzzed: Served) -> None:
    post(fuzzed, "/v1/completions", {"prompt": "warm up", "max_tokens": 40})
    before = fuzzed.rss_bytes()
    seen: dict[int, int] = {}

    @settings(max_examples=300, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=bodies)
    def check(path: str, body: bytes) -> None:
        start = time.monotonic()
        status, kind, raw = post(fuzzed, path, body, timeout=30)  # a dropped connection raises here
        assert time.monotonic() - start < 15 and status in DOCUMENTED and status != 500, (status, raw[:300])
        seen[status] = seen.get(status, 0) + 1
        if kind == "text/event-stream":
            stream = events(raw)
            assert stream[-1] == b"[DONE]" and all(isinstance(e, dict) for e in stream[:-1])
        else:
            answer = json.loads(raw)
            if status == 200:
                assert answer["choices"][0]["finish_reason"] in ("stop", "length")
            else:
                assert isinstance(answer["error"]["message"], str) and isinstance(answer["error"]["code"], str)

    check()
    assert seen.get(200, 0) >= 10 and seen.get(400, 0) >= 100, seen  # the fuzz reached past validation
    assert fuzzed.health()["status"] == "ok" and fuzzed.process.poll() is None
    growth = fuzzed.rss_bytes() - before
    assert growth < 64 << 20, f"RSS grew by {growth / 2**20:.0f} MiB over the fuzz"
