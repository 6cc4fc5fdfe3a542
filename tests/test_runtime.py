"""The device runtime on a real bundle of the default model: generation, sampling, stop strings,
device checks, provider fallback, chat and the OpenAI-compatible server (real `openai` client)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnxruntime as ort
import openai
import pytest
from genai import genai_greedy
from onnx import TensorProto, helper

from faq_runtime.generate import Generator, TextStream
from faq_runtime.load import LoadOptions, load
from faq_runtime.sampling import Sampling
from faq_runtime.server import Api, make_server
from faq_runtime.template import ChatTemplate

pytestmark = pytest.mark.heavy
FAQ_RUN = [sys.executable, "-m", "faq_runtime.cli"]
BOARDS = Path(__file__).parent / "fixtures" / "boards"
PROMPT = "The Congress shall have power to"


@pytest.fixture(scope="module")
def generator(x86_bundle: Path) -> Generator:
    return load(x86_bundle, LoadOptions(threads=2))


def test_greedy_equals_onnxruntime_genai_for_64_tokens(generator: Generator, x86_bundle: Path) -> None:
    ids = generator.encode("My fellow citizens,")  # PROMPT's greedy text loops on a few tokens
    ours = list(generator.tokens(ids, 64))
    assert len(ours) == 64 and len(set(ours)) > 10  # a real continuation, not one token repeated
    assert ours == genai_greedy(x86_bundle / "model", ids, 64)


def test_sampling_repeats_with_its_seed(generator: Generator) -> None:
    ids = generator.encode(PROMPT)

    def sample(seed: int) -> list[int]:
        return list(generator.tokens(ids, 24, Sampling(temperature=1.0, top_p=0.95, top_k=40, seed=seed)))

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    greedy = list(generator.tokens(ids, 24))
    assert list(generator.tokens(ids, 24, Sampling(temperature=1.5, top_k=1, seed=1))) == greedy
    penalised = list(generator.tokens(ids, 24, Sampling(repetition_penalty=1.5)))
    assert penalised != greedy and len(set(penalised)) >= len(set(greedy))


def test_bad_sampling_values_are_refused_with_the_rule() -> None:
    with pytest.raises(ValueError, match="top_p must be in"):
        Sampling(top_p=1.5, temperature=-1)


def test_stop_strings_end_the_text_before_them_also_when_streamed(generator: Generator) -> None:
    ids = generator.encode(PROMPT)
    full = generator.complete(ids, 48)
    assert full.finish_reason == "length" and len(full.text) > 40
    stop = full.text[20:24]  # four characters that may straddle tokens
    pieces: list[str] = []
    cut = generator.complete(ids, 48, stop=[stop, "never appears"], on_text=pieces.append)
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    assert "".join(pieces) == cut.text


def test_a_stop_string_split_across_tokens_is_never_released(generator: Generator) -> None:
    tokenizer = generator.tokenizer
    text = "We the People of the United States, in Order to form"
    stream = TextStream(tokenizer, ["United St"])
    released = "".join(stream.push(t) for t in tokenizer.encode(text, add_special_tokens=False).ids)
    assert stream.stopped and released + stream.flush() == "We the People of the "
    assert "United" not in released


def test_streamed_text_equals_one_decode_and_never_splits_a_character(generator: Generator) -> None:
    tokenizer = generator.tokenizer
    text = "Café au lait, 東京の天気は晴れ 🌤️ — naïve façade. " * 3
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split())  # byte-level pieces: characters are split across tokens
    stream = TextStream(tokenizer, [])
    pieces = [stream.push(t) for t in ids]
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) + stream.flush() == tokenizer.decode(ids) == text
    inside = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    cut = TextStream(tokenizer, [])  # generation ended inside a character: the end is what one decode gives
    assert "".join(cut.push(t) for t in ids[:inside]) + cut.flush() == tokenizer.decode(ids[:inside])


def test_the_chat_template_renders_as_transformers_does(x86_bundle: Path, real_cache: Path) -> None:
    from faq_deploy import models

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]
    template = ChatTemplate.read(x86_bundle / "model")
    assert template is not None
    expected = models.load(None).tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert template.render(messages) == expected
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        template.render([messages[0], {"role": "robot", "content": "x"}])


def test_generate_cli_streams_samples_and_reports_json(x86_bundle: Path) -> None:
    base = [*FAQ_RUN, "generate", str(x86_bundle), "--prompt", PROMPT, "--max-tokens", "12"]
    streamed = subprocess.run(base, capture_output=True, text=True)
    as_json = subprocess.run([*base, "--json"], capture_output=True, text=True)
    assert streamed.returncode == 0 and as_json.returncode == 0, streamed.stderr + as_json.stderr
    result = json.loads(as_json.stdout)
    assert streamed.stdout.rstrip("\n") == result["text"] and len(result["tokens"]) == 12
    seeded = [*base, "--temperature", "0.9", "--seed", "5", "--no-stream"]
    assert subprocess.run(seeded, capture_output=True, text=True).stdout == \
        subprocess.run(seeded, capture_output=True, text=True).stdout
    bad = subprocess.run([*base, "--top-p", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "top_p must be in (0, 1]" in bad.stderr


def test_a_context_that_cannot_fit_is_refused_with_the_largest_that_does(x86_bundle: Path, tmp_path: Path) -> None:
    board = shutil.copytree(BOARDS / "x86-host", tmp_path / "board")
    meminfo = board / "proc" / "meminfo"
    meminfo.write_text("".join("MemAvailable:     500000 kB\n" if line.startswith("MemAvailable:") else line
                               for line in meminfo.read_text().splitlines(keepends=True)))
    env = {"FAQ_PROBE_ROOT": str(board), "PATH": "/usr/bin:/bin"}
    args = [*FAQ_RUN, "generate", str(x86_bundle), "--prompt", "Hi", "--max-tokens", "2", "--no-stream"]
    refused = subprocess.run(args, capture_output=True, text=True, env=env)
    assert refused.returncode == 13, refused.stderr
    assert "context 2048 does not fit" in refused.stderr and "488 MiB available" in refused.stderr
    largest = int(refused.stderr.split("pass --context ")[1].split()[0])
    assert 0 < largest < 2048
    fits = subprocess.run([*args, "--context", str(largest)], capture_output=True, text=True, env=env)
    assert fits.returncode == 0, fits.stderr
    too_big = subprocess.run([*args, "--context", str(largest + 1)], capture_output=True, text=True, env=env)
    assert too_big.returncode == 13


def test_a_bundle_for_another_board_is_refused(x86_bundle: Path) -> None:
    env = {"FAQ_PROBE_ROOT": str(BOARDS / "raspberry-pi-5"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([*FAQ_RUN, "generate", str(x86_bundle), "--prompt", "Hi", "--max-tokens", "2"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 13 and "architecture: needs x86_64, device has aarch64" in done.stderr


def test_a_tampered_bundle_is_refused(x86_bundle: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(x86_bundle, tmp_path / "b", ignore=shutil.ignore_patterns("wheels"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if not f["path"].startswith("wheels/")]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    data = copy / "model" / "model.onnx.data"
    with open(data, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    done = subprocess.run([*FAQ_RUN, "generate", str(copy), "--prompt", "Hi"], capture_output=True, text=True)
    assert done.returncode == 12 and "model/model.onnx.data: sha256" in done.stderr


def test_unavailable_providers_fall_back_to_cpu_with_the_reason(x86_bundle: Path) -> None:
    done = subprocess.run([*FAQ_RUN, "generate", str(x86_bundle), "--prompt", "Hi", "--max-tokens", "2",
                           "--providers", "tensorrt,cuda"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "TensorrtExecutionProvider is not in this onnxruntime build" in done.stderr
    assert "trying CPUExecutionProvider" in done.stderr
    health = subprocess.run([*FAQ_RUN, "selftest", str(x86_bundle), "--providers", "cuda,cpu", "--json"],
                            capture_output=True, text=True)  # the deployer's health check takes them too
    assert health.returncode == 0 and json.loads(health.stdout)["providers"] == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider is not in this onnxruntime build" in health.stderr


def test_selftest_fails_when_the_model_cannot_run(x86_bundle: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(x86_bundle / "model", tmp_path / "model")
    good = subprocess.run([*FAQ_RUN, "selftest", str(folder), "--json"], capture_output=True, text=True)
    assert good.returncode == 0 and json.loads(good.stdout)["ok"], good.stderr
    (folder / "model.onnx.data").write_bytes(b"\0" * 1024)  # weights gone
    bad = subprocess.run([*FAQ_RUN, "selftest", str(folder), "--json"], capture_output=True, text=True)
    assert bad.returncode == 1 and json.loads(bad.stdout)["ok"] is False
    assert "no execution provider could run" in json.loads(bad.stdout)["error"]


def test_chat_keeps_the_history(x86_bundle: Path) -> None:
    done = subprocess.run([*FAQ_RUN, "chat", str(x86_bundle), "--max-tokens", "16"],
                          input="What is the capital of France?\nAnd of Italy?\n/exit\n", capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    answers = [line for line in done.stdout.split("> ") if line.strip()]
    assert len(answers) == 2 and "Paris" in answers[0] and "Rome" in answers[1]


@pytest.fixture(scope="module")
def server(x86_bundle: Path) -> Iterator[str]:
    process = subprocess.Popen([*FAQ_RUN, "serve", str(x86_bundle), "--port", "0", "--context", "128",
                                "--model-name", "smol", "--quiet"], stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    line = process.stderr.readline()
    assert "serving smol on http://" in line, line + process.stderr.read()
    yield line.split(" on ")[1].split()[0]
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key="none", max_retries=0)


def test_the_server_answers_the_openai_client(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["smol"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=0)
    text = answer.choices[0].message.content
    assert "Paris" in text and answer.usage.completion_tokens <= 12
    chunks = client.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == text
    completion = client.completions.create(model="smol", prompt=PROMPT, max_tokens=8, temperature=0, stop=["\n"])
    assert completion.choices[0].text and "\n" not in completion.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smol", prompt=PROMPT, max_tokens=8, temperature=0, stop=["\n"], stream=True))
    assert streamed == completion.choices[0].text
    seeded = [client.completions.create(model="smol", prompt=PROMPT, max_tokens=8, seed=3).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_the_server_refuses_bad_requests_with_json_errors(client: openai.OpenAI, server: str) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found" and "this server runs 'smol'" in missing.value.message
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="smol", prompt="word " * 200)
    assert too_long.value.code == "context_length_exceeded" and "context holds 128" in too_long.value.message
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        client.completions.create(model="smol", prompt="x", temperature=-1)
    for body, status, code in [(b"{not json", 400, "invalid_json"),
                               (json.dumps({"model": "smol", "messages": "hi"}).encode(), 400, "invalid_type"),
                               (b"x" * (2 << 20), 413, "request_too_large")]:
        request = urllib.request.Request(f"{server}/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=60)
        assert error.value.code == status
        assert json.loads(error.value.read())["error"]["code"] == code
    with urllib.request.urlopen(server.removesuffix("/v1") + "/healthz", timeout=60) as health:
        assert json.loads(health.read())["providers"][0] == "CPUExecutionProvider"


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
