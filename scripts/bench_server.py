"""Server under load: `faq-run serve` on a bundle beside llama-cpp-python's OpenAI server (llama.cpp)
on a GGUF of the same model, each in turn under N concurrent clients.

For each engine and each N, a fresh server (2 threads, context 512) answers a fixed number of
/v1/completions requests sent by N threads, each with its own real `openai` client; even requests
stream, odd ones do not; prompts are the openings of different evaluation speeches; greedy, at most
--max-tokens new tokens. A client that gets 429 waits 0.2 s and moves on (the request counts, as
a 429). Reported per engine and N: requests/s (answered requests over the wall time), p50/p99 time
to first token (streamed requests: the first chunk with text), p50/p99 total latency, the 429
share, and the server's RSS before and after (and its peak).

    python scripts/bench_server.py BUNDLE [--gguf Q4_K_M.gguf] [--clients 1 4 16] [--requests 48]
        [--max-tokens 32] [--out docs/results/server]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai

from faq_deploy.cli.options import table
from faq_deploy.data import load_corpus

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 512
THREADS = 2


@dataclass
class Outcome:
    status: str                # "ok", "429" or the error's class name
    stream: bool
    seconds: float             # request sent -> answer complete
    first_token: float | None  # request sent -> first text (streamed requests)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss(pid: int) -> dict[str, int]:
    """The process's resident and peak resident bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[name].split()[0]) * 1024 for key, name in (("rss", "VmRSS"), ("peak", "VmHWM"))}


def start(engine: str, model: Path, port: int) -> subprocess.Popen[bytes]:
    if engine == "faq-runtime":
        cmd = [sys.executable, "-m", "faq_runtime.cli", "serve", str(model), "--port", str(port), "--context",
               str(CONTEXT), "--threads", str(THREADS), "--model-name", "bench", "--quiet"]
        env = None
    else:
        sys.path.insert(0, str(REPO / "scripts"))
        from setup_llama_cpp import ensure  # built once into the user cache

        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port", str(port), "--n_ctx",
               str(CONTEXT), "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS), "--model_alias",
               "bench"]
        env = ensure().environ()
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read()
            return process
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"{engine} server exited ({process.returncode}) before it answered") from None
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{engine} server did not answer within 120 s")


def request(client: openai.OpenAI, prompt: str, stream: bool, max_tokens: int) -> Outcome:
    sent = time.perf_counter()
    first = None
    try:
        if stream:
            for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens,
                                                   temperature=0, stream=True):
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - sent
        else:
            client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0)
    except openai.RateLimitError:
        return Outcome("429", stream, time.perf_counter() - sent, None)
    except openai.OpenAIError as exc:
        return Outcome(type(exc).__name__, stream, time.perf_counter() - sent, None)
    return Outcome("ok", stream, time.perf_counter() - sent, first)


def load(port: int, clients: int, prompts: list[str], max_tokens: int) -> tuple[list[Outcome], float]:
    """`len(prompts)` requests from `clients` threads; the outcomes and the wall time."""
    outcomes: list[Outcome] = []
    taken = iter(range(len(prompts)))
    lock = threading.Lock()

    def worker() -> None:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        while True:
            with lock:
                index = next(taken, None)
            if index is None:
                return
            outcome = request(client, prompts[index], index % 2 == 0, max_tokens)
            with lock:
                outcomes.append(outcome)
            if outcome.status == "429":
                time.sleep(0.2)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start_time = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, time.perf_counter() - start_time


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1000)


def summarize(engine: str, clients: int, outcomes: list[Outcome], wall: float, before: dict, after: dict) -> dict:
    ok = [o for o in outcomes if o.status == "ok"]
    firsts = [o.first_token for o in ok if o.first_token is not None]
    return {"engine": engine, "clients": clients, "requests": len(outcomes), "answered": len(ok),
            "requests_per_s": round(len(ok) / wall, 2), "ttft_p50_ms": ms(percentile(firsts, 0.5)),
            "ttft_p99_ms": ms(percentile(firsts, 0.99)),
            "latency_p50_ms": ms(percentile([o.seconds for o in ok], 0.5)),
            "latency_p99_ms": ms(percentile([o.seconds for o in ok], 0.99)),
            "share_429": round(sum(o.status == "429" for o in outcomes) / len(outcomes), 3),
            "errors": sorted({o.status for o in outcomes} - {"ok", "429"}),
            "rss_before_mb": round(before["rss"] / 2**20), "rss_after_mb": round(after["rss"] / 2**20),
            "rss_peak_mb": round(after["peak"] / 2**20), "wall_s": round(wall, 1)}


def prompts(count: int) -> list[str]:
    speeches = load_corpus("speeches-eval")
    return [" ".join(speeches[i % len(speeches)].text.split()[:24 + i % 17]) for i in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--gguf", type=Path, help="the same model as a GGUF for llama-cpp-python's server")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "server")
    args = parser.parse_args()
    engines = [("faq-runtime", args.bundle)] + ([("llama-cpp-python", args.gguf)] if args.gguf else [])
    texts = prompts(args.requests)
    rows = []
    for clients in args.clients:
        for engine, model in engines:
            port = free_port()
            process = start(engine, model, port)
            try:
                request(openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0),
                        texts[0], False, 4)  # warm-up: first-run allocations
                before = rss(process.pid)
                outcomes, wall = load(port, clients, texts, args.max_tokens)
                rows.append(summarize(engine, clients, outcomes, wall, before, rss(process.pid)))
            finally:
                process.terminate()
                process.wait(timeout=60)
            print(table(rows[-1:], list(rows[-1])), file=sys.stderr, flush=True)
    columns = ["engine", "clients", "requests", "answered", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms",
               "latency_p50_ms", "latency_p99_ms", "share_429", "rss_before_mb", "rss_after_mb", "rss_peak_mb"]
    command = "python scripts/bench_server.py " + shlex.join(sys.argv[1:])
    host = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "host": host, "rows": rows,
                                                         "settings": {"context": CONTEXT, "threads": THREADS,
                                                                      "max_tokens": args.max_tokens}},
                                                        indent=2) + "\n")
    args.out.with_suffix(".md").write_text(
        f"# Server under load\n\n`{command}` on {host['cpus']} {host['machine']} cores (Python {host['python']}); "
        f"context {CONTEXT}, {THREADS} threads, greedy, at most {args.max_tokens} new tokens, half the requests "
        f"streamed.\n\n```\n{table(rows, columns)}\n```\n")
    print(table(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
