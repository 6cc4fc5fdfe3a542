"""Write a bundle: model/, REPORT.md and a manifest hashing every file.

Reading and verifying live in faq_runtime.bundle, so host and board run the same checks.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tarfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

from faq_deploy.errors import BundleInvalid
from faq_runtime import bundle as runtime_bundle
from faq_runtime.bundle import MANIFEST, MODEL_DIR, SCHEMA_VERSION, Bundle, BundleError, bundle_id, file_record
from faq_runtime.files import staged_dir

REPORT = "REPORT.md"
WHEELS_DIR = "wheels"


def write(out: Path, model_dir: Path, sections: dict[str, Any], report: str, wheels: Path | None = None) -> Bundle:
    """Assemble the bundle beside `out` and rename it into place: `out` is complete or untouched.
    `sections` are the manifest's records (source, quantization, export, target, memory, evaluation);
    `wheels`, a folder of wheels the board installs the runtime from, becomes `wheels/`."""
    with staged_dir(out) as tmp:
        shutil.copytree(model_dir, tmp / MODEL_DIR)
        if wheels is not None:
            shutil.copytree(wheels, tmp / WHEELS_DIR)
        (tmp / REPORT).write_text(report)
        files = [file_record(tmp, p) for p in sorted(tmp.rglob("*")) if p.is_file()]
        manifest = {"schema_version": SCHEMA_VERSION, "bundle_id": bundle_id(files),
                    "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "faq_deploy_version": version("faq-deploy"), **sections, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        verify(tmp, hashes=False)  # the writer's self-check: schema, paths, sizes, id (hashes are fresh)
    return Bundle(out, manifest)


def verify(path: Path, hashes: bool = True) -> Bundle:
    """faq_runtime's verification, with its failure as this CLI's documented error."""
    try:
        return runtime_bundle.verify(Path(path), hashes=hashes)
    except BundleError as exc:
        raise BundleInvalid(exc.cause, exc.hint) from None



def write_tar(root: Path) -> Path:
    """`root` packed as `<root>.tar` (one top-level folder, the bundle's name), written atomically.
    Uncompressed: the weights are already dense, and a device can stream-extract it."""
    target = root.with_name(root.name + ".tar")
    partial = target.with_name(f".{target.name}.partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(root, arcname=root.name)
    os.replace(partial, target)
    return target
