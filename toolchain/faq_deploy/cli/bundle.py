"""`faq-deploy inspect` and `verify`: read and check a bundle (no torch needed)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from faq_deploy import bundle
from faq_deploy.cli.options import emit, json_option


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@json_option
def inspect_cmd(path: Path, as_json: bool) -> None:
    """Show what a bundle holds (its manifest), without checking file hashes."""
    manifest = bundle.verify(path, hashes=False).manifest
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    q, ev, mem = manifest["quantization"], manifest["evaluation"], manifest["memory"]
    # keys that came later in schema 1 default to what the bundles before them held
    scheme, export = q["scheme"], manifest.get("export", {})
    quantization = f"{q['method']} w{scheme['bits']} g{scheme['group_size']}"
    quantization += " symmetric" if scheme.get("symmetric") else ""
    quantization += f", {scheme['scale_dtype']} scales" if scheme.get("scale_dtype", "float32") != "float32" else ""
    emit({"bundle_id": manifest["bundle_id"], "created": manifest["created"],
          "source": manifest["source"]["name"], "target": manifest["target"]["name"],
          "quantization": quantization,
          "export": (f"{export.get('exporter', 'builder')} graph for {export.get('provider', 'cpu')}, "
                     f"{export.get('weights', 'matmulnbits')} at accuracy level {export.get('accuracy_level', 4)}, "
                     f"lm_head {export.get('lm_head', 'float')}, embedding {export.get('embedding', 'float')}"),
          "weights_mb": round(mem["weights_bytes"] / 1e6, 1),
          "perplexity": f"{ev['perplexity_float']} float → {ev['perplexity_bundle']} bundle",
          "files": len(manifest["files"])}, as_json=False)


@click.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@json_option
def verify_cmd(path: Path, as_json: bool) -> None:
    """Check a bundle: schema, every file's size and sha256, paths confined, nothing unlisted."""
    verified = bundle.verify(path)
    emit({"bundle": str(path), "bundle_id": verified.id, "files": len(verified.manifest["files"]), "ok": True},
         as_json)


@click.command("run", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                        "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run_cmd(args: tuple[str, ...]) -> None:
    """Run a bundle on this host with the device runtime: the same code as `faq-run` on a board
    (generate, chat, serve, selftest, info, verify; `faq-deploy run --help` lists them).

    \b
    Examples:
      faq-deploy run generate build/jetson --prompt "My fellow citizens," --no-device-check
      faq-deploy run serve build/x86 --port 8000
    """
    from faq_runtime.cli import main

    raise SystemExit(main(list(args) or ["--help"]))
