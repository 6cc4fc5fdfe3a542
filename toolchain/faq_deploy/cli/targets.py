"""`faq-deploy targets`: the boards we build for, which one a device is, and whether a bundle suits it."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from faq_deploy import bundle, detect
from faq_deploy.cli.options import json_option, load_targets, table, targets_dir_option
from faq_deploy.errors import TargetError
from faq_runtime import compat, probe

root_option = click.option(
    "--root", type=click.Path(path_type=Path, file_okay=False, exists=True), default=Path("/"), show_default=True,
    help="Read the device's files under this folder: a recording made with "
         "`python3 -m faq_runtime.probe --record DIR` on the board.")


@click.group("targets")
def targets() -> None:
    """Boards as data: list and show them, detect this device, check a bundle against it.

    \b
    Shipped boards live in targets/*.toml; add or override boards with --targets-dir DIR or
    $FAQ_DEPLOY_TARGETS (files named <name>.toml, same schema).
    """


@targets.command("list")
@targets_dir_option
@json_option
def list_targets(targets_dirs: tuple[Path, ...], as_json: bool) -> None:
    """Every target with its aliases, CPU tier, RAM, bandwidth and software line."""
    registry = load_targets(targets_dirs)
    if as_json:
        click.echo(json.dumps([t.describe() for t in registry.targets.values()], indent=2))
        return
    rows = [{"name": t.name, "aliases": ",".join(t.aliases), "machine": t.identity.machine,
             "tier": t.capability.isa_tier, "RAM GB": "/".join(f"{gb:g}" for gb in t.capability.ram_gb) or None,
             "GB/s": t.capability.bandwidth_gbs, "python": t.software.python,
             "onnxruntime≤": t.software.onnxruntime_max, "providers": ",".join(t.software.execution_providers),
             "user file": None if t.source.startswith("targets/") else t.source}
            for t in registry.targets.values()]
    columns = ["name", "aliases", "machine", "tier", "RAM GB", "GB/s", "python", "onnxruntime≤", "providers"]
    click.echo(table(rows, columns + (["user file"] if any(r["user file"] for r in rows) else [])))


@targets.command("show")
@click.argument("name")
@targets_dir_option
@json_option
def show(name: str, targets_dirs: tuple[Path, ...], as_json: bool) -> None:
    """One target's identity, capability, software line and build defaults."""
    target = load_targets(targets_dirs).resolve(name)
    data = target.describe()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{target.name}: {target.description}  ({target.source})")
    click.echo(f"aliases: {', '.join(target.aliases) or '-'}")
    for section in ("identity", "capability", "software", "build"):
        click.echo(f"[{section}]")
        for key, value in data[section].items():
            if value not in (None, (), [], ""):
                click.echo(f"  {key:<24} {', '.join(map(str, value)) if isinstance(value, list | tuple) else value}")


@targets.command("detect")
@root_option
@targets_dir_option
@json_option
def detect_cmd(root: Path, targets_dirs: tuple[Path, ...], as_json: bool) -> None:
    """Probe this device (or a recording) and name the target it is, with why the others are not."""
    facts = probe.probe(str(root))
    judged = detect.match(load_targets(targets_dirs), facts)
    best = judged[0] if judged[0].ok else None
    if as_json:
        click.echo(json.dumps({"target": best.target.name if best else None, "facts": facts,
                               "candidates": [{"name": m.target.name, "ok": m.ok, "confirmed": m.confirmed,
                                               "mismatches": m.mismatches} for m in judged]}, indent=2))
    else:
        cpu = facts["cpu"]
        click.echo(f"device   {facts['model'] or facts['machine']}, {cpu['cores']} cores, "
                   f"tier {compat.tier_of(facts['machine'], cpu['features'])}, python {facts['python']}")
        for m in judged:
            mark = "*" if m is best else ("+" if m.ok else "-")
            click.echo(f"{mark} {m.target.name:<22} " + ("; ".join(m.confirmed) if m.ok else "; ".join(m.mismatches)))
    if best is None:
        raise TargetError(f"no target matches this {facts['machine']} device",
                          "describe it in a target file of your own (--targets-dir)")


@targets.command("check")
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(path_type=Path))
@root_option
@json_option
def check(bundle_path: Path, root: Path, as_json: bool) -> None:
    """Can this device (or a recording) run BUNDLE? Architecture, CPU tier, JetPack line, Python,
    onnxruntime and memory, each with what is needed, what is there and the fix."""
    manifest = bundle.verify(bundle_path, hashes=False).manifest
    needs = manifest["target"]["compatibility"]
    mismatches = compat.check(needs, probe.probe(str(root)))
    if as_json:
        click.echo(json.dumps({"bundle": str(bundle_path), "target": manifest["target"]["name"],
                               "compatible": not mismatches, "mismatches": [asdict(m) for m in mismatches]},
                              indent=2))
    elif not mismatches:
        click.echo(f"{bundle_path}: compatible (built for {manifest['target']['name']})")
    if mismatches:
        raise TargetError(f"{bundle_path} (built for {manifest['target']['name']}) cannot run here: "
                          + "; ".join(map(str, mismatches)), "build the bundle for this device's target "
                          "(`faq-deploy targets detect` names it)")
