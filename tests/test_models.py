"""--model resolution on real files: the embedded default, a local folder, a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


@pytest.mark.heavy
def test_gguf_file_is_dequantized_to_the_same_float32_model(real_cache: Path, empty_cache: Path) -> None:
    gguf = real_cache / "gguf" / models.DEFAULT_MODEL.gguf_name
    ref = models.resolve(str(gguf))
    assert ref.kind == "gguf" and ref.sha256 == models.DEFAULT_MODEL.sha256
    assert Path(ref.path).is_relative_to(empty_cache)
    config = json.loads((Path(ref.path) / "config.json").read_text())
    assert "quantization_config" not in config  # a leftover GGUF config breaks saving and readers

    from_gguf = models.load(str(gguf)).model.state_dict()
    embedded = models.load(str(real_cache / "models" / Path(models.resolve(None).path).name)).model.state_dict()
    assert from_gguf.keys() == embedded.keys()
    assert all(torch.equal(from_gguf[k], embedded[k]) for k in embedded)
