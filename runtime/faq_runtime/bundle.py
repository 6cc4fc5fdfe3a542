"""A bundle on disk: its manifest, and the checks a board runs before trusting it.

Shared by both sides: faq-deploy writes bundles and verifies them with this module, the device
verifies them with the same code, so the two can never disagree on what "intact" means.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from faq_runtime.files import sha256_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MODEL_DIR = "model"

# Top-level manifest fields and their JSON types; nested sections are free-form records.
_FIELDS = {
    "schema_version": int,
    "bundle_id": str,
    "created": str,
    "faq_deploy_version": str,
    "source": dict,
    "quantization": dict,
    "export": dict,
    "target": dict,
    "memory": dict,
    "evaluation": dict,
    "files": list,
}
_FILE_FIELDS = {"path": str, "size": int, "sha256": str}


class BundleError(Exception):
    """A bundle that must not be run: the cause names the file and the values, the hint the fix."""

    exit_code = 12  # faq-run's exit status for it

    def __init__(self, cause: str, hint: str = "rebuild the bundle, or push it again") -> None:
        super().__init__(cause)
        self.cause = cause
        self.hint = hint


def file_record(root: Path, path: Path) -> dict[str, Any]:
    return {"path": path.relative_to(root).as_posix(), "size": path.stat().st_size, "sha256": sha256_file(path)}


def bundle_id(files: list[dict[str, Any]]) -> str:
    """The content hash: the same files (paths, sizes, hashes) give the same id on every machine."""
    canonical = json.dumps(sorted(files, key=lambda f: f["path"]), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def confined(root: Path, relative: str) -> Path:
    """`root / relative`, refusing absolute paths, `..` and symlinks that lead out of `root`."""
    parts = PurePosixPath(relative)
    if parts.is_absolute() or ".." in parts.parts or not parts.parts:
        raise BundleError(f"manifest path {relative!r} is not a plain path inside the bundle")
    path = root.joinpath(*parts.parts)
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise BundleError(f"{relative} resolves outside the bundle ({path.resolve()})") from None
    return path


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict[str, Any]

    @property
    def id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_DIR


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest, checked against the schema (not the files: see `verify`)."""
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} has no {MANIFEST}: not a faq-deploy bundle",
                          "pass the folder that `faq-deploy build` wrote")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc})") from None
    _check_fields(manifest, _FIELDS, str(path))
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema_version {manifest['schema_version']}, this runtime reads "
                          f"{SCHEMA_VERSION}", "install the faq-runtime that matches the toolchain")
    for i, record in enumerate(manifest["files"]):
        _check_fields(record, _FILE_FIELDS, f"{path}: files[{i}]")
    return manifest


def _check_fields(record: Any, fields: dict[str, type], where: str) -> None:
    if not isinstance(record, dict):
        raise BundleError(f"{where} must be a JSON object")
    for name, kind in fields.items():
        if name not in record:
            raise BundleError(f"{where}: field {name!r} is missing")
        if not isinstance(record[name], kind) or isinstance(record[name], bool):
            raise BundleError(f"{where}: field {name!r} must be {kind.__name__}, "
                              f"got {type(record[name]).__name__}")


def verify(root: Path, hashes: bool = True) -> Bundle:
    """Open a bundle if every listed file is present, confined, of its size and (with `hashes`)
    its sha256, nothing unlisted sits beside them, and the id matches the content."""
    root = Path(root)
    manifest = read_manifest(root)
    listed = set()
    for record in manifest["files"]:
        path = confined(root, record["path"])
        listed.add(path.relative_to(root).as_posix())
        if not path.is_file():
            raise BundleError(f"{record['path']} is listed in the manifest but missing")
        size = path.stat().st_size
        if size != record["size"]:
            raise BundleError(f"{record['path']}: {size} bytes, the manifest says {record['size']}")
        if hashes and (actual := sha256_file(path)) != record["sha256"]:
            raise BundleError(f"{record['path']}: sha256 {actual}, the manifest says {record['sha256']}")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}
    if extra := sorted(present - listed - {MANIFEST}):
        raise BundleError(f"files not in the manifest: {', '.join(extra[:5])}",
                          "remove them, or rebuild the bundle")
    if (expected := bundle_id(manifest["files"])) != manifest["bundle_id"]:
        raise BundleError(f"bundle_id {manifest['bundle_id']} does not match the listed content ({expected})")
    return Bundle(root, manifest)
