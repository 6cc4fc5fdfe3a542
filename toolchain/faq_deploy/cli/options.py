"""Options and output helpers shared by several commands, declared once (light: no torch)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import click

from faq_deploy import registry
from faq_deploy.registry import ENV_DIRS, Registry

model_option = click.option(
    "--model", "model_spec", metavar="MODEL", default=None,
    help="Embedded model key (`faq-deploy models list`), model folder, .gguf file or hub id; "
         "default: the embedded SmolLM2-135M-Instruct.")

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")

targets_dir_option = click.option(
    "--targets-dir", "targets_dirs", multiple=True, type=click.Path(path_type=Path, file_okay=False),
    help=f"Folder of target files that add to or override the shipped ones (repeatable; also ${ENV_DIRS}).")


def load_targets(targets_dirs: tuple[Path, ...]) -> Registry:
    """The registry the --targets-dir options and $FAQ_DEPLOY_TARGETS describe."""
    return registry.load(registry.user_dirs(targets_dirs))


def emit(result: Any, as_json: bool) -> None:
    """A dataclass (or dict) as JSON, or as aligned `key  value` lines."""
    data = asdict(result) if is_dataclass(result) else dict(result)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    width = max(map(len, data))
    for key, value in data.items():
        click.echo(f"{key:<{width}}  {value}")


def table(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    rows = [["-" if row.get(c) is None else str(row[c]) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
