"""Options shared by several commands, declared once."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, is_dataclass
from typing import Any

import click

from faq_deploy.quant import METHODS
from faq_deploy.quant.scheme import QuantScheme

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _stack(*decorators: Decorator) -> Decorator:
    def apply(func: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


model_option = click.option(
    "--model", "model_spec", metavar="MODEL", default=None,
    help="Model folder, .gguf file or hub id; default: the embedded SmolLM2-135M-Instruct.")

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")


def method_option(default: str | None, help: str) -> Decorator:
    return click.option("--method", "method", type=click.Choice(sorted(METHODS)), default=default,
                        show_default=True, help=help)


scheme_options = _stack(
    click.option("--bits", type=int, default=4, show_default=True, help="Bits per weight: 2, 3, 4 or 8."),
    click.option("--group", "group_size", type=int, default=32, show_default=True,
                 help="Input channels per quantization group (a power of two ≥ 16)."),
    click.option("--symmetric", is_flag=True, help="Symmetric codes instead of an integer zero point."),
)


def scheme_from(bits: int, group_size: int, symmetric: bool) -> QuantScheme:
    return QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric)


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
