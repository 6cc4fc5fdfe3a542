"""The device runtime on a real bundle of the default model: generation, sampling, stop strings,
device checks, provider fallback and chat (the HTTP server has its own module, test_server.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from commands import FAQ_RUN
from genai import genai_greedy

from faq_runtime.generate import Generator, TextStream
from faq_runtime.load import LoadOptions, load
from faq_runtime.sampling import Sampling
from faq_runtime.template import ChatTemplate

BOARDS = Path(__file__).parent / "fixtures" / "boards"
PROMPT = "The Congress shall have power to"


@pytest.fixture(scope="module")
def generator(x86_bundle: Path) -> Generator:
    return load(x86_bundle, LoadOptions(threads=2))


def test_greedy_equals_onnxruntime_genai_for_64_tokens(x86_bundle: Path) -> None:
    # genai decodes one token a forward; drafts are checked several at a time, and at accuracy level 4
    # onnxruntime's int8 kernels round a one-row product differently from a many-row one
    generator = load(x86_bundle, LoadOptions(threads=2, speculate=False))
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
    cut = generator.complete(ids, 48, stop=[stop, "never appears"],
                             on_text=lambda piece, _: pieces.append(piece))
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
