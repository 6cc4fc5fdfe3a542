"""Runtime speed: faq-runtime vs onnxruntime-genai (same model folder, same graph, same threads) vs
llama.cpp (llama-cpp-python, when installed, on the default model's original Q4_1 GGUF).

Each engine lives in its own worker process (so peak RSS is its own) and the measurements interleave:
every repetition asks each engine in turn (the order rotates) for prefill tokens/s at 128- and
1024-token prompts and decode tokens/s for 128 greedy tokens after a 128-token prompt (end tokens
ignored, so every engine decodes exactly 128). A shared host's drifting load then falls on all
engines alike, and each repetition gives a paired decode ratio ours / genai. Figures are medians over
--runs after a warm-up. The prompts are the same token ids for all (the evaluation speeches). The
decode ceiling is the host's measured read bandwidth divided by the bytes each token reads (every
weight but the embedding table).

    python scripts/bench_runtime.py MODEL_OR_BUNDLE [--threads 2] [--runs 10] [--out docs/results/runtime]
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


# (figure, operation, tokens): what every repetition measures, in this order
MEASURES = (("prefill_128_tokens_s", "prefill", 128), ("prefill_1024_tokens_s", "prefill", 1024),
            ("decode_tokens_s", "decode", DECODE))


def serve(engine: str, folder: Path, gguf: Path, threads: int) -> None:
    """Child mode: load one engine, then answer `[operation, tokens]` lines on stdin with seconds (or,
    for "rss", this process's peak RSS in MB) on stdout."""
    runner = {"faq-runtime": lambda: Ours(folder, threads), "onnxruntime-genai": lambda: Genai(folder, threads),
              "llama.cpp": lambda: LlamaCpp(gguf, threads)}[engine]()
    ids = prompt_ids(folder, max(PROMPTS))
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        operation, n = json.loads(line)
        if operation == "prefill":
            answer: float = runner.prefill(ids[:n])
        elif operation == "decode":
            answer = runner.decode(ids[:PROMPTS[0]], n)
        else:
            answer = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(answer), flush=True)


class Worker:
    """The parent's handle on one engine's child process."""

    def __init__(self, engine: str, model: Path, gguf: Path, threads: int, env: dict[str, str] | None = None) -> None:
        """`model`: the ONNX folder ours and genai run (and whose tokenizer makes the prompts); `gguf`: the file
        llama.cpp runs; `env`: the child's environment (where llama_cpp finds its libraries)."""
        self.engine = engine
        self.process = subprocess.Popen(
            [sys.executable, __file__, str(model), "--gguf", str(gguf), "--threads", str(threads), "--engine", engine],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._read()  # "ready": the engine has loaded

    def ask(self, operation: str, n: int = 0) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps([operation, n]) + "\n")
        self.process.stdin.flush()
        return float(self._read())

    def _read(self) -> object:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.engine} worker exited with {self.process.wait()} (its stderr is above)")
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait()


def measure(workers: list[Worker], runs: int) -> tuple[list[dict[str, object]], list[float]]:
    """Interleaved medians per engine, and the per-repetition decode ratio ours / genai."""
    for worker in workers:  # warm-up: first-run allocations and kernel selection
        for _, operation, n in MEASURES:
            worker.ask(operation, 8 if operation == "decode" else n)
    seconds: dict[str, dict[str, list[float]]] = {w.engine: {key: [] for key, _, _ in MEASURES} for w in workers}
    for rep in range(runs):
        turn = workers[rep % len(workers):] + workers[:rep % len(workers)]
        for key, operation, n in MEASURES:
            for worker in turn:
                seconds[worker.engine][key].append(worker.ask(operation, n))
        print(f"repetition {rep + 1}/{runs}: " + ", ".join(
            f"{w.engine} {DECODE / seconds[w.engine]['decode_tokens_s'][-1]:.1f}" for w in workers) + " decode tok/s",
            file=sys.stderr)
    results = []
    for worker in workers:
        figures: dict[str, object] = {"engine": worker.engine}
        for key, _, n in MEASURES:
            figures[key] = round(n / statistics.median(seconds[worker.engine][key]), 1)
        figures["peak_rss_mb"] = round(worker.ask("rss"))
        results.append(figures)
    ours, genai = seconds["faq-runtime"]["decode_tokens_s"], seconds["onnxruntime-genai"]["decode_tokens_s"]
    return results, [g / o for o, g in zip(ours, genai, strict=True)]


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
    """Weights a decode step reads: every initializer except the embedding table's (one row is read)."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    gathered = {name for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized") for name in n.input}
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
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "runtime")
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    folder = model_dir(args.model)
    if args.gguf is None:
        from faq_deploy.models import fetch_embedded

        args.gguf = fetch_embedded()
    if args.engine:
        serve(args.engine, folder, args.gguf, args.threads)
        return 0
    engines = [e for e in ENGINES if e != "llama.cpp" or importable("llama_cpp")]
    if "llama.cpp" not in engines:
        print("llama.cpp: llama-cpp-python is not installed, skipped", file=sys.stderr)
    workers = [Worker(engine, args.model, args.gguf, args.threads) for engine in engines]
    try:
        results, ratios = measure(workers, args.runs)
    finally:
        for worker in workers:
            worker.close()
    per_token = bytes_per_token(folder)
    bandwidth = read_bandwidth_gbs(args.threads)
    ceiling = bandwidth * 1e9 / per_token
    paired = {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
              "max": round(max(ratios), 3), "per_repetition": [round(r, 3) for r in ratios]}
    report = {"host": {"machine": platform.machine(), "processor": cpu_name(), "threads": args.threads,
                       "read_bandwidth_gbs": bandwidth},
              "model": str(folder), "gguf": args.gguf.name, "bytes_per_token": per_token,
              "decode_ceiling_tokens_s": round(ceiling, 1), "runs": args.runs, "results": results,
              "decode_ratio_ours_over_genai": paired}
    out = f" --out {args.out}" if args.out != REPO / "docs" / "results" / "runtime" else ""
    text = (f"# Runtime speed\n\n`python scripts/bench_runtime.py {args.model} --threads {args.threads} --runs "
            f"{args.runs}{out}` on {report['host']['processor']} ({args.threads} threads); median of {args.runs} "
            f"interleaved repetitions after a warm-up.\n\n{table(results, ceiling)}\n\n"
            f"Decode ours / onnxruntime-genai, paired per repetition: median {paired['median']:.2f}x "
            f"(range {paired['min']:.2f}-{paired['max']:.2f}x over {len(ratios)}).\n\n"
            f"Decode ceiling: {bandwidth} GB/s read bandwidth (measured) / {per_token / 1e6:.1f} MB read per token "
            f"= {ceiling:.0f} tokens/s for the ONNX graph.\n")
    write_results(args.out, report, text)
    return 0


def write_results(out: Path, report: dict, text: str) -> None:
    """`out`.json and `out`.md, and the page on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


def importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
