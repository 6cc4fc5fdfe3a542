"""Prompt-lookup speculative decoding: faq-runtime plain vs drafted, beside llama.cpp plain vs its own
prompt-lookup decoding (llama-cpp-python's LlamaPromptLookupDecoding), on the same prompt tokens.

Three chat workloads, greedy, up to --tokens new tokens each:
  story     open-ended writing: little of the answer is in the prompt (the case drafts must not slow)
  passage   an answer built from a given speech passage (summarise, quote)
  code      repeat a code block with one edit
`--prompts report` (the default) takes the passage from speeches-eval; `--prompts tune` takes another
one from speeches-calib, with other story and code prompts: defaults are chosen on those.

Each engine runs in its own child process, paused while another one runs; repetitions interleave
engines and modes so a drifting load falls on all alike. Decode tokens/s excludes the prompt:
(tokens - 1) / (end - first token), median over --runs after a warm-up. faq-runtime runs a bundle
(or model folder), llama.cpp a GGUF (default: the embedded model's own file). Greedy output is
compared with the same engine's plain decoding: at accuracy level 4 onnxruntime's int8 kernels round
a one-row product differently from a many-row one, so a checked draft can tip a near tie
(llama.cpp's batched kernels do the same).

    python scripts/bench_speculative.py build/jetson [--runs 5] [--out docs/results/speculative]
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"faq-runtime": ("plain", "lookup"), "llama.cpp": ("plain", "lookup")}
CODE = '''def load_orders(path):
    orders = []
    with open(path) as f:
        for line in f:
            customer, item, qty, price = line.strip().split(",")
            orders.append({"customer": customer, "item": item, "qty": int(qty), "price": float(price)})
    return orders


def total(orders):
    result = 0.0
    for order in orders:
        result += order["qty"] * order["price"]
    return result


def by_customer(orders):
    grouped = {}
    for order in orders:
        grouped.setdefault(order["customer"], []).append(order)
    return {name: total(items) for name, items in grouped.items()}
'''
TUNE_CODE = '''class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack")
        return self.items.pop()

    def peek(self):
        if not self.items:
            raise IndexError("peek at an empty stack")
        return self.items[-1]

    def size(self):
        return len(self.items)
'''


def passage(corpus: str, words: int = 160) -> str:
    from faq_deploy.data import load_corpus

    document = max(load_corpus(corpus), key=lambda d: len(d.text))  # a long speech, cut to a passage
    return " ".join(document.text.split()[:words])


def workloads(kind: str) -> dict[str, str]:
    if kind == "report":
        return {
            "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
            "passage": f"{passage('speeches-eval')}\n\nSummarise the passage above in a few sentences, keeping "
                       "its own words where you can.",
            "code": f"```python\n{CODE}```\n\nRename the function `total` to `order_total` everywhere in this "
                    "code and show the whole code.",
        }
    return {
        "story": "Tell a story about two friends who build a boat together.",
        "passage": f"{passage('speeches-calib')}\n\nWhat does the speaker promise in this passage? Answer with "
                   "quotes from it.",
        "code": f"```python\n{TUNE_CODE}```\n\nAdd a docstring to every method of this class and show the whole "
                "class.",
    }


class Ours:
    def __init__(self, bundle: Path, threads: int) -> None:
        from faq_runtime.load import LoadOptions, load

        self.modes = {mode: load(bundle, LoadOptions(threads=threads, check_device=False, speculate=mode == "lookup"))
                      for mode in MODES["faq-runtime"]}

    def run(self, mode: str, ids: list[int], n: int) -> dict:
        from faq_runtime.generate import DraftStats

        generator, drafts, tokens = self.modes[mode], DraftStats(), []
        start = time.perf_counter()
        for token, _ in generator.steps(ids, n, drafts=drafts):
            tokens.append(token)
            if len(tokens) == 1:
                first = time.perf_counter()
        return {"tokens": tokens, "first": first - start, "seconds": time.perf_counter() - start, **drafts.as_dict()}


class LlamaCpp:
    def __init__(self, gguf: Path, threads: int) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        def make(draft: object) -> Llama:
            return Llama(model_path=str(gguf), n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         draft_model=draft, verbose=False)
        self.modes = {"plain": make(None), "lookup": make(LlamaPromptLookupDecoding())}

    def run(self, mode: str, ids: list[int], n: int) -> dict:
        llm = self.modes[mode]
        llm.reset()
        tokens, start = [], time.perf_counter()
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if llm.token_eos() == token or len(tokens) == n:
                break
            tokens.append(token)
            if len(tokens) == 1:
                first = time.perf_counter()
        return {"tokens": tokens, "first": first - start, "seconds": time.perf_counter() - start}


def serve(engine: str, bundle: Path, gguf: Path, threads: int) -> None:
    """Child mode: answer `[mode, prompt ids, tokens]` lines with one run's figures."""
    runner = Ours(bundle, threads) if engine == "faq-runtime" else LlamaCpp(gguf, threads)
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        mode, ids, n = json.loads(line)
        print(json.dumps(runner.run(mode, ids, n)), flush=True)


class Child:
    def __init__(self, engine: str, bundle: Path, gguf: Path, threads: int, env: dict | None) -> None:
        self.engine = engine
        self.process = subprocess.Popen([sys.executable, __file__, str(bundle), "--gguf", str(gguf), "--threads",
                                         str(threads), "--engine", engine], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self._read()
        self.process.send_signal(signal.SIGSTOP)

    def run(self, mode: str, ids: list[int], n: int) -> dict:
        """One run, with the process paused again after it: an idle engine's threads can keep polling
        for work (measured: faq-runtime's Qwen decode 29.5 tokens/s alone, 20.4 beside a resting
        llama.cpp), and each engine is timed alone."""
        assert self.process.stdin is not None
        self.process.send_signal(signal.SIGCONT)
        self.process.stdin.write(json.dumps([mode, ids, n]) + "\n")
        self.process.stdin.flush()
        done = self._read()
        self.process.send_signal(signal.SIGSTOP)
        return done

    def _read(self):
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.engine} worker exited with {self.process.wait()}")
        return json.loads(line)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.send_signal(signal.SIGCONT)
        self.process.stdin.close()
        self.process.wait()


def decode_rate(run: dict) -> float:
    return (len(run["tokens"]) - 1) / (run["seconds"] - run["first"])


def measure(children: list[Child], prompts: dict[str, list[int]], n: int, runs: int) -> list[dict]:
    pairs = [(child, mode) for child in children for mode in MODES[child.engine]]
    for child, mode in pairs:  # warm-up
        child.run(mode, prompts["story"], 8)
    rows = []
    for name, ids in prompts.items():
        results: dict[tuple[str, str], list[dict]] = {(c.engine, m): [] for c, m in pairs}
        for rep in range(runs):
            for child, mode in pairs[rep % len(pairs):] + pairs[:rep % len(pairs)]:
                results[child.engine, mode].append(child.run(mode, ids, n))
        for (engine, mode), done in results.items():
            plain, tokens = results[engine, "plain"][0]["tokens"], done[0]["tokens"]
            row = {"workload": name, "engine": engine, "mode": mode, "prompt_tokens": len(ids), "tokens": len(tokens),
                   "decode_tokens_s": round(statistics.median(map(decode_rate, done)), 1),
                   # where greedy output first differs from the engine's plain decoding (None: nowhere)
                   "first_difference": next((i for i, (a, b) in enumerate(zip(tokens, plain, strict=False)) if a != b),
                                            None if len(tokens) == len(plain) else min(len(tokens), len(plain)))}
            if "acceptance" in done[0]:
                row.update(drafted=done[0]["drafted"], accepted=done[0]["accepted"], acceptance=done[0]["acceptance"])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| workload | engine | plain tok/s | lookup tok/s | speed-up | ours: drafted / accepted | "
             "first token unlike plain |", "|---|---|---|---|---|---|---|"]
    for row in (r for r in rows if r["mode"] == "lookup"):
        plain = next(r for r in rows if r["mode"] == "plain" and r["engine"] == row["engine"]
                     and r["workload"] == row["workload"])
        drafts = f"{row['drafted']} / {row['accepted']} ({row['acceptance']:.0%})" if "drafted" in row else "-"
        lines.append(f"| {row['workload']} | {row['engine']} | {plain['decode_tokens_s']} | {row['decode_tokens_s']} | "
                     f"{row['decode_tokens_s'] / plain['decode_tokens_s']:.2f}× | {drafts} | "
                     f"{'none' if row['first_difference'] is None else row['first_difference'] + 1} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a bundle or exported model folder (faq-runtime)")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF for llama.cpp (default: the embedded model's)")
    parser.add_argument("--model", default=None, help="embedded model whose GGUF llama.cpp runs (default SmolLM2)")
    parser.add_argument("--prompts", choices=("report", "tune"), default="report")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-llama", action="store_true", help="faq-runtime only")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    parser.add_argument("--engine", choices=list(MODES), help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.engine:
        serve(args.engine, args.bundle, args.gguf, args.threads)
        return 0

    from faq_deploy import models
    from faq_runtime.load import LoadOptions, load

    generator = load(args.bundle, LoadOptions(check_device=False))
    prompts = {name: generator.encode(generator.template.render([{"role": "user", "content": text}]))
               for name, text in workloads(args.prompts).items()}
    gguf = args.gguf or models.fetch_embedded(models.embedded(args.model))
    children = [Child("faq-runtime", args.bundle, gguf, args.threads, None)]
    if not args.no_llama:
        sys.path.insert(0, str(REPO / "scripts"))
        from setup_llama_cpp import ensure

        children.append(Child("llama.cpp", args.bundle, gguf, args.threads, ensure().environ()))
    rows = measure(children, prompts, args.tokens, args.runs)
    for child in children:
        child.close()
    command = "python scripts/bench_speculative.py " + shlex.join(sys.argv[1:])
    text = (f"Made by `{command}` on this {args.threads}-thread host: greedy, up to {args.tokens} new tokens, "
            f"median of {args.runs} interleaved runs; llama.cpp runs {gguf.name}.\n\n{table(rows)}\n")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
