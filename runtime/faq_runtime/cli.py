"""`faq-run`: the device-side command (standard library argparse: click is not a runtime dependency)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import onnxruntime

from faq_runtime import __version__, probe
from faq_runtime.bundle import BundleError, verify
from faq_runtime.generate import Generator, model_folder
from faq_runtime.selftest import selftest


def _info(args: argparse.Namespace) -> int:
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
    generator = Generator(model_folder(args.bundle), threads=args.threads)
    stream = (lambda piece: print(piece, end="", flush=True)) if args.stream else None
    text = generator.generate(args.prompt, args.max_tokens, stream)
    print("" if args.stream else text)
    return 0


def _probe(args: argparse.Namespace) -> int:
    print(json.dumps(probe.probe(args.root, args.disk), indent=2, sort_keys=True))
    return 0


def _selftest(args: argparse.Namespace) -> int:
    try:
        facts = selftest(args.bundle, args.tokens, args.threads, hashes=args.hashes)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="faq-run", description="Run faq-deploy bundles on this device.")
    parser.add_argument("--version", action="version", version=f"faq-runtime {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, machine and the execution providers onnxruntime lists")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(run=_info)
    generate = commands.add_parser("generate", help="complete a prompt (greedy) with a bundle or model folder")
    generate.add_argument("bundle", type=Path, help="bundle folder (verified first) or exported model folder")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (default 64)")
    generate.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    generate.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                          help="print text as it is generated (default on)")
    generate.set_defaults(run=_generate)
    check = commands.add_parser("verify", help="check a bundle's files against its manifest")
    check.add_argument("bundle", type=Path)
    check.set_defaults(run=_verify)
    test = commands.add_parser("selftest", help="verify, load and run a bundle; exit 0 only when it works")
    test.add_argument("bundle", type=Path)
    test.add_argument("--tokens", type=int, default=8, help="greedy steps to run and time (default 8)")
    test.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    test.add_argument("--json", action="store_true", help="print one JSON object")
    test.add_argument("--no-hashes", dest="hashes", action="store_false",
                      help="skip the sha256 pass (sizes and paths still checked): the deployer has just hashed them")
    test.set_defaults(run=_selftest)
    facts = commands.add_parser("probe", help="this device's facts as JSON (what deploys check bundles against)")
    facts.add_argument("--root", default="/", help="read a recorded board under this folder (default: /)")
    facts.add_argument("--disk", default=None, help="measure free disk under this path (default: the root)")
    facts.set_defaults(run=_probe)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except BundleError as exc:
        print(f"error: {exc.cause}\nhint: {exc.hint}", file=sys.stderr)
        return 12
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
