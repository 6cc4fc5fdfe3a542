"""--model resolution on real files: the embedded default and a local folder (a GGUF file: test_gguf's build
from a rewritten file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from faq_deploy import models
from faq_deploy.errors import ModelNotFound


def test_local_folder_is_used_in_place(real_cache: Path) -> None:
    folder = models.resolve(None).path
    ref = models.resolve(folder)
    assert (ref.kind, ref.path, ref.sha256) == ("folder", folder, None)
    assert models.info(folder).parameters == 134_515_008


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="has no config.json"):
        models.resolve(str(tmp_path))
