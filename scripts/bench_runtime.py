"""Runtime speed: faq-runtime vs onnxruntime-genai (same model folder, same graph, same threads) vs
llama.cpp (llama-cpp-python, when installed, on the default model's original Q4_1 GGUF).

Per engine, in its own process (so peak RSS is its own): prefill tokens/s for 128- and 1024-token
prompts, decode tokens/s for 128 greedy tokens after a 128-token prompt (end tokens ignored, so every
engine decodes exactly 128), a warm-up first, then the median of --runs. The prompts are the same
token ids for all three (the evaluation speeches). The decode ceiling is the host's measured read
bandwidth divided by the bytes each token reads (every weight but the embedding table).

    python scripts/bench_runtime.py MODEL_OR_BUNDLE [--threads 2] [--runs 3] [--out docs/results/runtime]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPTS = (128, 1024)
DECODE = 128
ENGINES = ("faq-runtime", "onnxruntime-genai", "llama.cpp")


def prompt_ids(folder: Path, n: int) -> list[int]:
    from tokenizers import Tokenizer

    from faq_deploy.data import load_corpus, token_stream

    return token_stream(Tokenizer.from_file(str(folder / "tokenizer.json")), load_corpus("speeches-eval"), n)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Ours:
    def __init__(self, folder: Path, threads: int) -> None:
        from faq_runtime.load import LoadOptions, load

        self.decoder = load(folder, LoadOptions(threads=threads, check_device=False)).decoder

    def prefill(self, ids: list[int]) -> float:
        return timed(lambda: self.decoder.step(ids, self.decoder.new_cache(len(ids))))

    def decode(self, ids: list[int], n: int) -> float:
        cache = self.decoder.new_cache(len(ids) + n)
        token = int(self.decoder.step(ids, cache).argmax())

        def steps() -> None:
            nonlocal token
            for _ in range(n):
                token = int(self.decoder.step([token], cache).argmax())
        return timed(steps)


class Genai:
    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime_genai as og

        # Its thread count lives in genai_config.json: a copy of the folder (weights linked) carries it
        self.tmp = Path(tempfile.mkdtemp())
        for path in folder.iterdir():
            (self.tmp / path.name).symlink_to(path.resolve())
        config = json.loads((folder / "genai_config.json").read_text())
        config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
        (self.tmp / "genai_config.json").unlink()
        (self.tmp / "genai_config.json").write_text(json.dumps(config))
        self.og, self.model = og, og.Model(str(self.tmp))

    def _generator(self, length: int, min_length: int = 0):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, min_length=min_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def prefill(self, ids: list[int]) -> float:
        generator = self._generator(len(ids) + 1)
        return timed(lambda: generator.append_tokens(ids))

    def decode(self, ids: list[int], n: int) -> float:
        generator = self._generator(len(ids) + n + 1, len(ids) + n + 1)  # min_length: no early end token
        generator.append_tokens(ids)
        generator.generate_next_token()

        def steps() -> None:
            for _ in range(n):
                generator.generate_next_token()
        return timed(steps)


class LlamaCpp:
    def __init__(self, gguf: Path, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=2048, n_batch=1024, n_ubatch=1024, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        return timed(lambda: self.llm.eval(ids))

    def decode(self, ids: list[int], n: int) -> float:
        self.llm.reset()
        self.llm.eval(ids)

        def steps() -> None:
            for _ in range(n):
                self.llm.eval([int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))])
        return timed(steps)


def measure(engine: str, folder: Path, gguf: Path, threads: int, runs: int) -> dict[str, object]:
    """One engine's figures (run in a child process: its peak RSS is this process's)."""
    runner = {"faq-runtime": lambda: Ours(folder, threads), "onnxruntime-genai": lambda: Genai(folder, threads),
              "llama.cpp": lambda: LlamaCpp(gguf, threads)}[engine]()
    ids = prompt_ids(folder, max(PROMPTS))
    result: dict[str, object] = {"engine": engine}
    for n in PROMPTS:
        runner.prefill(ids[:n])  # warm-up: first-run allocations and kernel selection
        seconds = statistics.median(runner.prefill(ids[:n]) for _ in range(runs))
        result[f"prefill_{n}_tokens_s"] = round(n / seconds, 1)
    runner.decode(ids[:PROMPTS[0]], 8)
    seconds = statistics.median(runner.decode(ids[:PROMPTS[0]], DECODE) for _ in range(runs))
    result["decode_tokens_s"] = round(DECODE / seconds, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def read_bandwidth_gbs(threads: int, megabytes: int = 512) -> float:
    """Best of 5 parallel sums over a buffer far larger than the caches (numpy releases the GIL)."""
    parts = [np.ones(megabytes * 2**20 // 8 // threads) for _ in range(threads)]

    def once() -> float:
        workers = [threading.Thread(target=part.sum) for part in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - start
    return round(megabytes * 2**20 / min(once() for _ in range(5)) / 1e9, 2)


def bytes_per_token(folder: Path) -> int:
    """Weights a decode step reads: every initializer except the embedding table (one row is read)."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    total = 0
    for tensor in model.graph.initializer:
        if tensor.name in gathered:
            continue
        length = next((int(e.value) for e in tensor.external_data if e.key == "length"), None)
        total += length if length is not None else len(tensor.raw_data)
    return total


def model_dir(path: Path) -> Path:
    return path / "model" if (path / "manifest.json").exists() else path


def table(results: list[dict], ceiling: float) -> str:
    lines = ["| engine | prefill 128 (tok/s) | prefill 1024 (tok/s) | decode (tok/s) | decode / ceiling | "
             "peak RSS (MB) |", "|---|---|---|---|---|---|"]
    for r in results:
        # llama.cpp reads another file (the Q4_1 GGUF): our graph's ceiling is not its own
        share = "n/a" if r["engine"] == "llama.cpp" else f"{r['decode_tokens_s'] / ceiling:.0%}"
        lines.append(f"| {r['engine']} | {r['prefill_128_tokens_s']} | {r['prefill_1024_tokens_s']} | "
                     f"{r['decode_tokens_s']} | {share} | {r['peak_rss_mb']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a bundle or an exported model folder")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF for llama.cpp (default: the embedded model's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "runtime")
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    folder = model_dir(args.model)
    if args.gguf is None:
        from faq_deploy.models import fetch_embedded

        args.gguf = fetch_embedded()
    if args.engine:
        print(json.dumps(measure(args.engine, folder, args.gguf, args.threads, args.runs)))
        return 0
    results = []
    for engine in ENGINES:
        if engine == "llama.cpp" and not _importable("llama_cpp"):
            print("llama.cpp: llama-cpp-python is not installed, skipped", file=sys.stderr)
            continue
        done = subprocess.run([sys.executable, __file__, str(args.model), "--gguf", str(args.gguf), "--threads",
                               str(args.threads), "--runs", str(args.runs), "--engine", engine],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{engine} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{engine}: {results[-1]}", file=sys.stderr)
    per_token = bytes_per_token(folder)
    bandwidth = read_bandwidth_gbs(args.threads)
    ceiling = bandwidth * 1e9 / per_token
    report = {"host": {"machine": platform.machine(), "processor": _cpu_name(), "threads": args.threads,
                       "read_bandwidth_gbs": bandwidth},
              "model": str(folder), "gguf": args.gguf.name, "bytes_per_token": per_token,
              "decode_ceiling_tokens_s": round(ceiling, 1), "runs": args.runs, "results": results}
    text = (f"# Runtime speed\n\n`python scripts/bench_runtime.py {args.model} --threads {args.threads} --runs "
            f"{args.runs}` on {report['host']['processor']} ({args.threads} threads); median of {args.runs} after a "
            f"warm-up.\n\n{table(results, ceiling)}\n\nDecode ceiling: {bandwidth} GB/s read bandwidth (measured) / "
            f"{per_token / 1e6:.1f} MB read per token = {ceiling:.0f} tokens/s for the ONNX graph.\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
