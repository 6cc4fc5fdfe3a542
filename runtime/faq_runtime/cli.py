"""`faq-run`: the device-side command (standard library argparse: click is not a runtime dependency).

The modules that import onnxruntime are imported by the commands that run a model, not here: an
onnxruntime wheel that crashes the interpreter on import (as one can on a board whose CPU description
it cannot parse) must leave `probe` and `verify` working, and the probe then names the crash.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from faq_runtime import __version__, probe
from faq_runtime.bundle import BundleError, verify
from faq_runtime.sampling import Sampling

if TYPE_CHECKING:
    from faq_runtime.generate import Generator
    from faq_runtime.load import LoadOptions

EXAMPLES = """examples:
  faq-run generate build/jetson --prompt "My fellow citizens," --max-tokens 32
  faq-run generate build/jetson --prompt "Once" --temperature 0.8 --top-p 0.95 --seed 7 --stop "."
  faq-run chat build/jetson --system "You answer in one sentence."
  faq-run serve build/jetson --host 0.0.0.0 --port 8000
  faq-run selftest build/jetson --json

exit codes: 0 ok, 1 selftest failed, 2 bad usage, 12 bundle invalid, 13 this device cannot run it"""


def _options(args: argparse.Namespace) -> LoadOptions:
    from faq_runtime.load import LoadOptions

    return LoadOptions(providers=args.providers.split(",") if args.providers else None, context=args.context,
                       threads=args.threads, check_device=args.device_check, speculate=args.speculate)


def _load(args: argparse.Namespace) -> Generator:
    from faq_runtime.load import load

    return load(args.bundle, _options(args))


def _sampling(args: argparse.Namespace) -> Sampling:
    return Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)


def _info(args: argparse.Namespace) -> int:
    import onnxruntime

    facts = {
        "faq_runtime": __version__,
        "onnxruntime": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        width = max(map(len, facts))
        for key, value in facts.items():
            print(f"{key:<{width}}  {', '.join(value) if isinstance(value, list) else value}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    generator = _load(args)
    prompt = generator.template.render([{"role": "user", "content": args.prompt}]) \
        if args.chat and generator.template else args.prompt
    stream = (lambda piece, _: print(piece, end="", flush=True)) if args.stream and not args.json else None
    done = generator.complete(generator.encode(prompt), args.max_tokens, sampling, args.stop, stream)
    if args.json:
        print(json.dumps({"text": done.text, "tokens": done.tokens, "prompt_tokens": done.prompt_tokens,
                          "finish_reason": done.finish_reason, "drafts": done.drafts.as_dict()}))
    else:
        print("" if stream else done.text)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from faq_runtime.load import CannotRun

    sampling = _sampling(args)
    generator = _load(args)
    template = generator.template
    if template is None:
        raise CannotRun(f"{args.bundle} has no chat template", "use `faq-run generate` for plain completion")
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: /reset clears the history, /exit or Ctrl-D leaves", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = _reply(generator, template.render(history), args, sampling)
        if reply is None:
            history.pop()
        else:
            history.append({"role": "assistant", "content": reply})


def _reply(generator: Generator, prompt: str, args: argparse.Namespace, sampling: Sampling) -> str | None:
    """The assistant's answer to the rendered conversation, printed as it comes; None when it
    cannot fit the context."""
    from faq_runtime.model import ContextFull

    ids = generator.encode(prompt)
    try:
        done = generator.complete(ids, args.max_tokens, sampling, args.stop,
                                  lambda piece, _: print(piece, end="", flush=True))
    except ContextFull as exc:
        print(f"error: {exc}; /reset to start over", file=sys.stderr)
        return None
    print()
    return done.text


def _serve(args: argparse.Namespace) -> int:
    from faq_runtime.server import Api, make_server  # http.server only when serving

    generator = _load(args)
    name = args.model_name or args.bundle.resolve().name
    server = make_server(Api(generator, name, args.max_waiting, log=not args.quiet, timeout=args.timeout),
                         args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving {name} on http://{host}:{port}/v1 ({generator.decoder.session.get_providers()[0]}, "
          f"context {generator.context}); Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _probe(args: argparse.Namespace) -> int:
    print(json.dumps(probe.probe(args.root, args.disk), indent=2, sort_keys=True))
    return 0


def _selftest(args: argparse.Namespace) -> int:
    from faq_runtime.selftest import selftest

    options = dataclasses.replace(_options(args), hashes=args.hashes)
    try:
        facts = selftest(args.bundle, args.tokens, options)
    except Exception as exc:  # any failure is the verdict: report it, exit non-zero
        facts = {"ok": False, "error": f"{type(exc).__name__}: {getattr(exc, 'cause', exc)}"}
    if args.json:
        print(json.dumps(facts))
    elif facts["ok"]:
        print(f"{args.bundle}: ok, {facts['tokens']} tokens at {facts['tokens_per_s']} tokens/s on "
              f"{facts['providers'][0]}, load {facts['load_s']} s, peak RSS {facts['peak_rss_bytes'] / 1e6:.0f} MB")
    else:
        print(f"{args.bundle}: FAILED: {facts['error']}", file=sys.stderr)
    return 0 if facts["ok"] else 1


def _verify(args: argparse.Namespace) -> int:
    bundle = verify(args.bundle)
    print(f"{args.bundle}: ok, bundle {bundle.id}, {len(bundle.manifest['files'])} files verified")
    return 0


def _model_parser() -> argparse.ArgumentParser:
    """Options of every command that loads a model."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("bundle", type=Path, help="bundle folder (verified first) or exported model folder")
    parser.add_argument("--context", type=int, help="tokens of context, prompt included (default: the bundle's)")
    parser.add_argument("--providers", help="execution providers to try in order, e.g. cuda,cpu "
                                            "(default: the bundle target's; CPU is always the last resort)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--no-device-check", dest="device_check", action="store_false",
                        help="skip the bundle-vs-device and memory checks")
    parser.add_argument("--speculate", action=argparse.BooleanOptionalAction, default=True,
                        help="draft tokens from the text so far (prompt lookup) and check each draft in one "
                             "forward: faster where the answer repeats its context; sampling keeps its distribution, "
                             "greedy its tokens up to near ties at accuracy level 4 (default: on)")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _sampling_parser(max_tokens: int) -> argparse.ArgumentParser:
    """Options checked before any model loads: argparse takes the types, Sampling the ranges."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--max-tokens", type=_positive, default=max_tokens,
                        help=f"new tokens at most; the context's end stops earlier (default {max_tokens})")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="make sampling repeatable")
    parser.add_argument("--stop", action="append", default=[], help="stop before this text (repeatable)")
    return parser


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="faq-run", description="Run faq-deploy bundles on this device, offline.",
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    root.add_argument("--version", action="version", version=f"faq-runtime {__version__}")
    commands = root.add_subparsers(dest="command", required=True)
    model = _model_parser()
    info = commands.add_parser("info", help="versions, machine and the execution providers onnxruntime lists")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(run=_info)
    generate = commands.add_parser("generate", parents=[model, _sampling_parser(64)],
                                   help="complete a prompt (greedy unless --temperature)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    generate.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                          help="print text as it is generated (default on)")
    generate.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, finish_reason")
    generate.set_defaults(run=_generate)
    chat = commands.add_parser("chat", parents=[model, _sampling_parser(256)],
                               help="talk to the model interactively (its chat template, with history)")
    chat.add_argument("--system", help="a system message to start the conversation with")
    chat.set_defaults(run=_chat)
    serve = commands.add_parser("serve", parents=[model],
                                help="OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, "
                                     "/v1/models, /healthz")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.add_argument("--model-name", help="the model id clients send (default: the bundle folder's name)")
    serve.add_argument("--max-waiting", type=int, default=4,
                       help="requests that may queue behind the running one; more get 429 (default 4)")
    serve.add_argument("--timeout", type=float, default=10.0,
                       help="seconds a request may take to arrive, and a write to a client may block (default 10)")
    serve.add_argument("--quiet", action="store_true", help="no per-request log lines")
    serve.set_defaults(run=_serve)
    check = commands.add_parser("verify", help="check a bundle's files against its manifest")
    check.add_argument("bundle", type=Path)
    check.set_defaults(run=_verify)
    test = commands.add_parser("selftest", parents=[model],
                               help="verify, load and run a bundle; exit 0 only when it works")
    test.add_argument("--tokens", type=int, default=8, help="greedy steps to run and time (default 8)")
    test.add_argument("--json", action="store_true", help="print one JSON object")
    test.add_argument("--no-hashes", dest="hashes", action="store_false",
                      help="skip the sha256 pass (sizes and paths still checked): the deployer has just hashed them")
    test.set_defaults(run=_selftest)
    facts = commands.add_parser("probe", help="this device's facts as JSON (what deploys check bundles against)")
    facts.add_argument("--root", default="/", help="read a recorded board under this folder (default: /)")
    facts.add_argument("--disk", default=None, help="measure free disk under this path (default: the root)")
    facts.set_defaults(run=_probe)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except BundleError as exc:  # CannotRun, a BundleError, has an exit code of its own
        print(f"error: {exc.cause}\nhint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:  # bad sampling values, an empty or too long prompt (ContextFull)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
