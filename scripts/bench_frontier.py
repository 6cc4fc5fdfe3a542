"""Quality per byte against the tools edge users already pick: faq-deploy's bundles, onnxruntime-genai's
int4 builder and llama.cpp's quantization types, all made from the same float model, scored on the same
tokens with the same windows, and timed on this CPU.

    .venv/bin/python scripts/bench_frontier.py                 # every point, then the speed runs
    .venv/bin/python scripts/bench_frontier.py --tools llama.cpp --no-speed

One point per deployable artefact, made in --work (default build/frontier/<model>):
  faq-deploy         `faq-deploy build --target x86` (MatMulNBits, int8 activations) per recipe
  onnxruntime-genai  its model builder, `-p int4 -e cpu`, per algorithm and block size
  llama.cpp          the float model converted to an F32 GGUF by llama.cpp's converter, then
                     llama-quantize per type, without and with an importance matrix computed on the
                     calibration text (scripts/setup_llama_cpp.py builds llama.cpp once into the user cache)
For each: the bytes a board must hold for the weights (model.onnx + model.onnx.data, or the .gguf),
the build seconds on this machine, and perplexity on speeches-eval (20,480 tokens) and on bible-kjv
(a domain no calibration sees), 1,024-token windows, each artefact through its own engine's logits
(onnxruntime via `faq-deploy eval --model`, onnxruntime-genai, llama-cpp-python) in a child process.
The F32 GGUF through llama.cpp is the control: it must equal the torch float model. Then prefill and
decode tokens/s per point, every engine in its own process, interleaved (bench_runtime's workers).

Every finished measurement is appended to frontier.jsonl and skipped when re-run; the tables, the
frontier per tool and the plot are made from it: frontier.{json,md,png} beside it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench_quality import ResultLog
from bench_runtime import DECODE, MEASURES, Worker

from faq_deploy.export.graph import weight_files_bytes

REPO = Path(__file__).resolve().parents[1]
FAQ_DEPLOY = [sys.executable, "-m", "faq_deploy"]
TEXTS = {"speeches-eval": 20480, "bible-kjv": 10240}
TOOLS = ("faq-deploy", "onnxruntime-genai", "llama.cpp")
CALIBRATION = "speeches-calib"


@dataclass(frozen=True)
class Point:
    tool: str
    name: str
    recipe: tuple[str, ...]  # the tool's own arguments

    @property
    def slug(self) -> str:
        return "-".join(self.name.replace("=", "").split())

    @property
    def engine(self) -> str:
        return {"faq-deploy": "faq-runtime", "onnxruntime-genai": "onnxruntime-genai"}.get(self.tool, self.tool)


def _ours(name: str, *flags: str) -> Point:
    return Point("faq-deploy", name, flags)


def _genai(name: str, *options: str) -> Point:
    return Point("onnxruntime-genai", name, options)


def _llama(kind: str, imatrix: bool) -> Point:
    return Point("llama.cpp", f"{kind}{' imatrix' if imatrix else ''}", (kind, "imatrix" if imatrix else ""))


def points(budgets: list[str]) -> tuple[Point, ...]:
    return (
        _ours("rtn w4 g32", "--method", "rtn"),
        _ours("rtn w8 g32", "--method", "rtn", "--bits", "8"),
        _ours("faq w4 g32", "--method", "faq"),
        *(_ours(f"faq budget {mb}", "--method", "faq", "--budget", mb) for mb in budgets),
        _ours("gguf", "--method", "gguf"),  # a GGUF model's own codes, carried over exactly
        _ours("gguf planes", "--method", "gguf", "--five-bit", "planes"),  # 5-bit blocks as 4 + 2 bits
        *OTHERS,
    )


OTHERS = (
    _genai("int4 rtn b32", "block_size=32"),
    _genai("int4 rtn b128", "block_size=128"),
    _genai("int4 k_quant b32", "block_size=32", "algo_config=k_quant"),
    _genai("int4 k_quant b128", "block_size=128", "algo_config=k_quant"),
    _genai("int4 k_quant_mixed b32", "block_size=32", "algo_config=k_quant_mixed"),
    # an untied model's embedding stays float unless Gather is named (a tied one's is shared and quantized)
    _genai("int4 rtn b32 gather", "block_size=32", "op_types_to_quantize=MatMul/Gather"),
    _genai("int4 k_quant_mixed b32 gather", "block_size=32", "algo_config=k_quant_mixed",
           "op_types_to_quantize=MatMul/Gather"),
    *(_llama(kind, imatrix) for kind in ("Q3_K_M", "Q4_0", "Q4_1", "Q4_K_M", "Q5_K_M", "Q8_0")
      for imatrix in (False, True)),
    # an embedded model's own GGUF, as it ships: the file our float model was dequantized from
    Point("llama.cpp", "source file", ("source", "")),
)
CONTROL = Point("llama.cpp", "F32", ("F32", ""))


class Workshop:
    """Makes the artefacts of one float model in `work` and says where each lies."""

    def __init__(self, model: str | None, work: Path, threads: int) -> None:
        from faq_deploy import models

        self.model, self.work, self.threads = model, work, threads
        self.float_folder = Path(models.resolve(model).path)
        work.mkdir(parents=True, exist_ok=True)
        self._llama = None

    @property
    def llama(self):
        if self._llama is None:
            from setup_llama_cpp import ensure  # built once into the user cache

            self._llama = ensure()
        return self._llama

    def artefact(self, point: Point) -> Path:
        """The weights file (GGUF) or model folder of `point` (which may not be made yet)."""
        if point.tool == "llama.cpp":
            return self.work / "llama.cpp" / f"{point.slug}.gguf"
        return self.work / point.tool / point.slug / ("model" if point.tool == "faq-deploy" else "")

    def make(self, point: Point) -> float:
        """Make the artefact; the seconds it took on this machine."""
        start = time.perf_counter()
        out = self.artefact(point)
        out.parent.mkdir(parents=True, exist_ok=True)
        if point.tool == "faq-deploy":
            _run([*FAQ_DEPLOY, "build", "--target", "x86", *(["--model", self.model] if self.model else []),
                  *point.recipe, "--eval-tokens", "1024", "--out", str(out.parent)])
        elif point.tool == "onnxruntime-genai":
            _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(self.float_folder), "-o",
                  str(out), "-p", "int4", "-e", "cpu", "-c", str(out / ".cache"), "--extra_options", *point.recipe])
        else:
            kind, imatrix = point.recipe
            if kind == "F32":
                self.llama.convert(self.float_folder, out)
            elif kind == "source":
                out.unlink(missing_ok=True)
                out.symlink_to(self.source_gguf())
            else:
                self.llama.quantize(self.f32(), out, kind, self.imatrix() if imatrix else None, self.threads)
        return time.perf_counter() - start

    def source_gguf(self) -> Path:
        from faq_deploy import models

        spec = models.embedded(self.model)
        if spec is None:
            raise RuntimeError(f"{self.model} is not an embedded model: it has no source GGUF")
        return models.fetch_embedded(spec)

    def f32(self) -> Path:
        path = self.artefact(CONTROL)
        if not path.exists():
            self.make(CONTROL)
        return path

    def imatrix(self) -> Path:
        """llama.cpp's importance matrix over the calibration text our methods calibrate on (32 rows of
        512 tokens, as `--samples 32 --seq-len 512`)."""
        path = self.work / "llama.cpp" / "imatrix.gguf"
        if not path.exists():
            from faq_deploy.data import SEPARATOR, load_corpus

            text = self.work / "llama.cpp" / "calibration.txt"
            text.write_text(SEPARATOR.join(d.text for d in load_corpus(CALIBRATION)))
            self.llama.imatrix(self.f32(), text, path, chunks=32, context=512, threads=self.threads)
        return path

    def weight_bytes(self, point: Point) -> int:
        path = self.artefact(point)
        return path.stat().st_size if path.is_file() else weight_files_bytes(path)


def _run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} … failed ({done.returncode}):\n" + done.stderr[-3000:])
    return done.stdout


def score(shop: Workshop, point: Point, text: str, tokens: int) -> dict:
    """Perplexity of `point` on `text` in a child process of its engine."""
    artefact = shop.artefact(point)
    if point.tool == "faq-deploy":
        result = json.loads(_run([*FAQ_DEPLOY, "eval", "--model", str(artefact), "--text", text, "--tokens",
                                  str(tokens), "--json"]))
        return {"perplexity": result["perplexity"], "tokens": result["tokens"]}
    env = shop.llama.environ() if point.tool == "llama.cpp" else None
    out = _run([sys.executable, __file__, "--score", point.tool, str(artefact), "--tokenizer", str(shop.float_folder),
                "--text", text, "--tokens", str(tokens), "--threads", str(shop.threads)], env)
    return json.loads(out.strip().splitlines()[-1])


def score_child(tool: str, artefact: Path, tokenizer: Path, text: str, tokens: int, threads: int) -> dict:
    """Child mode: the same windows and scoring (faq_deploy.perplexity) over this engine's logits."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer

    from faq_deploy.data import eval_tokens, load_corpus
    from faq_deploy.perplexity import perplexity

    ids = eval_tokens(Tokenizer.from_file(str(tokenizer / "tokenizer.json")), load_corpus(text), tokens)
    if tool == "llama.cpp":
        from llama_cpp import Llama

        llm = Llama(str(artefact), n_ctx=1024, n_batch=1024, n_ubatch=1024, logits_all=True, n_threads=threads,
                    n_threads_batch=threads, verbose=False)

        def logits(row: torch.Tensor) -> torch.Tensor:
            llm.reset()
            llm.eval(row.tolist())
            return torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32))
    else:
        import onnxruntime_genai as og

        model = og.Model(str(artefact))

        def logits(row: torch.Tensor) -> torch.Tensor:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(row) + 1)
            generator = og.Generator(model, params)
            generator.append_tokens(row.tolist())
            return torch.from_numpy(np.asarray(generator.get_output("logits"))[0].astype(np.float32))
    result = perplexity(logits, ids)
    return {"perplexity": round(result.perplexity, 4), "tokens": result.tokens}


def speed(shop: Workshop, points: list[Point], runs: int) -> dict[str, dict]:
    """Prefill and decode tokens/s of every point, interleaved: each repetition asks every worker in turn."""
    workers = {}
    for point in points:
        artefact = shop.artefact(point)
        gguf = artefact if point.tool == "llama.cpp" else shop.f32()
        folder = shop.float_folder if point.tool == "llama.cpp" else artefact
        env = shop.llama.environ() if point.tool == "llama.cpp" else None
        workers[point.name] = Worker(point.engine, folder, gguf, shop.threads, env)
    try:
        for worker in workers.values():  # warm-up
            for _, operation, n in MEASURES:
                worker.ask(operation, 8 if operation == "decode" else n)
        seconds = {name: {key: [] for key, _, _ in MEASURES} for name in workers}
        names = list(workers)
        for rep in range(runs):
            for key, operation, n in MEASURES:
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    seconds[name][key].append(workers[name].ask(operation, n))
            print(f"speed repetition {rep + 1}/{runs}", file=sys.stderr)
        return {name: {key: round(n / statistics.median(seconds[name][key]), 1) for key, _, n in MEASURES}
                for name in names}
    finally:
        for worker in workers.values():
            worker.close()


def frontier(rows: list[dict], text: str) -> list[dict]:
    """The points no smaller point of the same tool beats on `text`: each tool's quality-per-byte curve."""
    best, kept = float("inf"), []
    scored = [r for r in rows if r.get(text) is not None]
    for row in sorted(scored, key=lambda r: (r["bytes"], r[text])):  # of equal sizes, the best only
        if row[text] < best:
            best = row[text]
            kept.append(row)
    return kept


def at_bytes(curve: list[dict], text: str, size: float) -> float | None:
    """Perplexity along a frontier at `size` bytes, interpolated linearly between its points."""
    for left, right in zip(curve, curve[1:], strict=False):
        if left["bytes"] <= size <= right["bytes"]:
            share = (size - left["bytes"]) / (right["bytes"] - left["bytes"])
            return left[text] + share * (right[text] - left[text])
    return None


def report(rows: list[dict], control: dict, failures: list[dict], out: Path, command: str) -> None:
    mb = 1e6
    lines = ["# Quality per byte: faq-deploy vs onnxruntime-genai vs llama.cpp\n",
             "Made by `python scripts/bench_frontier.py` (every point once, resumable; this page was last written "
             f"by `{command}`) on this 2-core x86 host. Perplexity on the first {TEXTS['speeches-eval']:,} tokens of "
             f"speeches-eval and {TEXTS['bible-kjv']:,} of bible-kjv (1,024-token windows); bytes are the weight "
             f"files a board holds; speed: 2 threads, prefill of 128/1024 tokens and {DECODE} greedy tokens, median "
             "of interleaved runs. Control: the float model through llama.cpp (F32 GGUF) reads "
             f"{control.get('speeches-eval')} / {control.get('bible-kjv')}. Build s: on this host, the F32 GGUF's "
             "conversion not counted; the first imatrix point's includes computing the importance matrix. "
             "Speeds compare only within one speed run (the run column): a run measures its points interleaved, "
             "and runs on other days read up to 2x apart on this shared host.\n",
             "| tool | point | MB | speeches-eval | bible-kjv | prefill 1024 tok/s | decode tok/s | run | build s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (TOOLS.index(r["tool"]), r["bytes"])):
        lines.append(f"| {row['tool']} | {row['name']} | {row['bytes'] / mb:.1f} | {row.get('speeches-eval', '-')} | "
                     f"{row.get('bible-kjv', '-')} | {row.get('prefill_1024_tokens_s', '-')} | "
                     f"{row.get('decode_tokens_s', '-')} | {row.get('speed_run', '-')} | "
                     f"{row.get('build_seconds') or '-'} |")
    lines += ["", "## At equal bytes", "",
              "Each tool's frontier (its points that no smaller point of its own beats), interpolated at the size "
              "of each of our frontier points:", "",
              "| our point | MB | text | ours | llama.cpp | onnxruntime-genai |", "|---|---|---|---|---|---|"]
    for text in TEXTS:
        curves = {tool: frontier([r for r in rows if r["tool"] == tool], text) for tool in TOOLS}
        for ours in curves["faq-deploy"]:
            others = [at_bytes(curves[t], text, ours["bytes"]) for t in ("llama.cpp", "onnxruntime-genai")]
            cells = ["-" if v is None else f"{v:.4f}" for v in others]
            lines.append(f"| {ours['name']} | {ours['bytes'] / mb:.1f} | {text} | {ours[text]:.4f} | "
                         f"{cells[0]} | {cells[1]} |")
    if failures:
        lines += ["", "## Points a tool could not make", ""]
        lines += [f"- {f['tool']} {f['name']}: {f['error']}" for f in failures]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"texts": TEXTS, "window": 1024, "control": control,
                                                    "points": rows}, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"faq-deploy": "o", "onnxruntime-genai": "s", "llama.cpp": "^"}
    fig, (quality, fast) = plt.subplots(1, 2, figsize=(13, 5))
    for tool in TOOLS:
        mine = [r for r in rows if r["tool"] == tool and r.get("speeches-eval")]
        quality.scatter([r["bytes"] / 1e6 for r in mine], [r["speeches-eval"] for r in mine], marker=markers[tool],
                        label=tool)
        curve = frontier(mine, "speeches-eval")
        quality.plot([r["bytes"] / 1e6 for r in curve], [r["speeches-eval"] for r in curve], alpha=0.5)
        timed = [r for r in mine if r.get("decode_tokens_s")]
        fast.scatter([r["bytes"] / 1e6 for r in timed], [r["decode_tokens_s"] for r in timed],
                     marker=markers[tool], label=tool)
    quality.set(xlabel="weights (MB)", ylabel="perplexity, speeches-eval", title="quality per byte")
    fast.set(xlabel="weights (MB)", ylabel="decode tokens/s (2 threads)", title="speed")
    for axis in (quality, fast):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="the float model (default: the embedded SmolLM2)")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--points", nargs="+", default=None, help="only these point names")
    parser.add_argument("--budgets", nargs="+", default=["100", "105.5"],
                        help="megabytes of the `faq budget` points (default: 100 105.5, around SmolLM2's Q4_K_M)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="speed repetitions")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "frontier")
    parser.add_argument("--score", choices=TOOLS, help=argparse.SUPPRESS)  # child mode: score one artefact
    parser.add_argument("artefact", nargs="?", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--text", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score:
        print(json.dumps(score_child(args.score, args.artefact, args.tokenizer, args.text, args.tokens,
                                     args.threads)))
        return 0
    name = (args.model or "smollm2").split("/")[-1].lower()
    shop = Workshop(args.model, args.work or REPO / "build" / "frontier" / name, args.threads)
    log = ResultLog(args.out.with_suffix(".jsonl"))
    chosen = [p for p in points(args.budgets)
              if p.tool in args.tools and (args.points is None or p.name in args.points)]
    for point in [CONTROL, *chosen]:
        key = {"model": name, "tool": point.tool, "name": point.name}
        built = log.has({**key, "stage": "build"})
        # a speed run remakes what the work folder lost (the log keeps the first build's figures)
        if not built or (not args.no_speed and point in chosen and not shop.artefact(point).exists()):
            try:
                seconds = shop.make(point)
            except RuntimeError as exc:  # a tool that cannot make this point: recorded, not retried
                log.add({**key, "stage": "build", "error": str(exc).strip().splitlines()[-1][:300]})
                print(f"{point.tool} {point.name}: {log.rows[-1]['error']}", file=sys.stderr)
                continue
            if not built:
                log.add({**key, "stage": "build", "seconds": round(seconds, 1), "bytes": shop.weight_bytes(point)})
        if "error" in next(r for r in log.rows if r.items() >= {**key, "stage": "build"}.items()):
            continue
        for text, tokens in TEXTS.items():
            if not log.has({**key, "stage": text}):
                log.add({**key, "stage": text, **score(shop, point, text, tokens)})
                print(f"{point.tool} {point.name} {text}: {log.rows[-1]['perplexity']}", file=sys.stderr)
    failed = {(r["tool"], r["name"]) for r in log.rows if r["model"] == name and "error" in r}
    made = [p for p in chosen if (p.tool, p.name) not in failed]
    if not args.no_speed and not log.has({"model": name, "stage": "speed", "points": [p.name for p in made]}):
        log.add({"model": name, "stage": "speed", "points": [p.name for p in made],
                 "results": speed(shop, made, args.runs)})
    rows, control = collect(log.rows, name)
    failures = [r for r in log.rows if r["model"] == name and "error" in r]
    report(rows, control, failures, args.out, "python scripts/bench_frontier.py " + shlex.join(sys.argv[1:]))
    print(args.out.with_suffix(".md").read_text())
    return 0


def collect(entries: list[dict], model: str) -> tuple[list[dict], dict]:
    """One row per point from the log: bytes and build time, perplexity per text, the latest speed."""
    rows: dict[tuple[str, str], dict] = {}
    for entry in (e for e in entries if e["model"] == model and e["stage"] != "speed"):
        if "error" in entry:
            continue
        row = rows.setdefault((entry["tool"], entry["name"]), {"tool": entry["tool"], "name": entry["name"]})
        if entry["stage"] == "build":
            row.update(bytes=entry["bytes"], build_seconds=entry["seconds"])  # None: not timed cleanly
        else:
            row[entry["stage"]] = entry["perplexity"]
    speed_runs = [e for e in entries if e["model"] == model and e["stage"] == "speed"]
    for number, entry in enumerate(speed_runs, 1):
        for row in rows.values():
            if row["name"] in entry["results"]:
                row.update(entry["results"][row["name"]], speed_run=number)
    control = rows.pop((CONTROL.tool, CONTROL.name), {})
    return list(rows.values()), control


if __name__ == "__main__":
    sys.exit(main())
