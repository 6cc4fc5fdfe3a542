"""`faq-run`: the device-side command (standard library argparse: click is not a runtime dependency)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence

import onnxruntime

from faq_runtime import __version__


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="faq-run", description="Run faq-deploy bundles on this device.")
    parser.add_argument("--version", action="version", version=f"faq-runtime {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, machine and the execution providers onnxruntime lists")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(run=_info)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
