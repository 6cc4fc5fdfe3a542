"""Corpora, token budgets and seeded calibration rows on the real speeches and tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from faq_deploy import models
from faq_deploy.data import SEPARATOR, calibration_rows, eval_tokens, load_corpus, token_stream
from faq_deploy.errors import TextError


@pytest.fixture(scope="module")
def tokenizer(real_cache: Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(models.resolve(None).path) / "tokenizer.json"))


def test_named_corpora_split_at_2000_in_their_orders(real_cache: Path) -> None:
    calib, evaluation = load_corpus("speeches-calib"), load_corpus("speeches-eval")
    assert calib[0].name == "1790-Washington-1" and calib[-1].name.startswith("1999")
    assert evaluation[0].name == "2026-Trump-1" and evaluation[-1].name.startswith("2000")
    assert not {d.name for d in calib} & {d.name for d in evaluation}


def test_year_range_selects_one_decade(real_cache: Path) -> None:
    decade = load_corpus("speeches:1990-1999")
    assert decade and all(1990 <= int(d.name[:4]) <= 1999 for d in decade)


def test_book_range_selects_the_new_testament(real_cache: Path) -> None:
    testament = load_corpus("bible-kjv:40-66")
    assert (len(testament), testament[0].name, testament[-1].name) == (27, "Matthew", "Revelation")
    assert [d.name for d in load_corpus("bible-kjv:1-2")] == ["Genesis", "Exodus"]


def test_text_file_and_folder(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "notes.md").write_text("ignored")
    assert [d.text for d in load_corpus(str(tmp_path))] == ["first", "second"]
    assert load_corpus(str(tmp_path / "b.txt"))[0].text == "second"


@pytest.mark.parametrize("spec", ["no-such-corpus", "speeches:1999-1990", "bible-kjv:66-40", "bible-kjv:0-3",
                                  "bible-kjv:60-67"])
def test_bad_text_spec(spec: str, real_cache: Path) -> None:
    with pytest.raises(TextError):
        load_corpus(spec)


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(TextError, match="latin1.txt"):
        load_corpus(str(tmp_path))


def test_budget_equals_the_prefix_of_the_whole_joined_text(tokenizer: Tokenizer, real_cache: Path) -> None:
    docs = load_corpus("speeches-eval")[:4]
    whole = tokenizer.encode(SEPARATOR.join(d.text for d in docs), add_special_tokens=False).ids
    assert token_stream(tokenizer, docs, 9000) == whole[:9000]
    assert eval_tokens(tokenizer, docs, 100).tolist() == whole[:100]


def test_too_few_tokens_is_a_text_error(tokenizer: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("only a few words")
    with pytest.raises(TextError, match="fewer than"):
        eval_tokens(tokenizer, load_corpus(str(tmp_path)), 1000)


def test_calibration_rows_are_seeded(tokenizer: Tokenizer, real_cache: Path) -> None:
    docs = load_corpus("speeches-calib")
    a = calibration_rows(tokenizer, docs, samples=8, seq_len=128, seed=0)
    b = calibration_rows(tokenizer, docs, samples=8, seq_len=128, seed=0)
    c = calibration_rows(tokenizer, docs, samples=8, seq_len=128, seed=1)
    assert a.shape == (8, 128) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(row[:16].tolist()) for row in a}) == 8  # distinct windows


def test_narrow_corpus_is_revisited_with_fresh_windows(tokenizer: Tokenizer, real_cache: Path) -> None:
    decade = load_corpus("speeches:1990-1999")
    rows = calibration_rows(tokenizer, decade, samples=3 * len(decade), seq_len=64, seed=0)
    assert rows.shape == (3 * len(decade), 64)
    assert len({tuple(row.tolist()) for row in rows}) == len(rows)


def test_calibration_text_shorter_than_a_row_is_refused(tokenizer: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("a few words only")
    with pytest.raises(TextError, match="fewer than 512 tokens"):
        calibration_rows(tokenizer, load_corpus(str(tmp_path)), samples=2, seq_len=512, seed=0)
