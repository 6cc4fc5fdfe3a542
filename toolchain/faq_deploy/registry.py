"""Target boards as data: one TOML file per board, validated, looked up by name or alias.

Shipped files live in `targets/` (package data `faq_deploy.targets`); users add or override boards
with folders of their own (`$FAQ_DEPLOY_TARGETS`, then `--targets-dir`, later folders winning).
The schema is the dataclasses below: each field's type hint is its type and its metadata holds the
rule it must keep, so a broken file fails naming the file, the field and the rule.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from faq_deploy.errors import TargetError
from faq_runtime.compat import ISA_TIERS, version

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

DEFAULT_TARGET = "generic-x86_64"
ENV_DIRS = "FAQ_DEPLOY_TARGETS"
PROVIDERS = ("TensorRT", "CUDA", "CPU")
Rule = Callable[[Any], "str | None"]  # the rule a value breaks, or None


def _rule(check: Rule, default: Any = dataclasses.MISSING) -> Any:
    return field(default=default, metadata={"rule": check})


def _one_of(*choices: Any) -> Rule:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(str, choices))}"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be positive"


def _version(v: str) -> str | None:
    return None if version(v) and ".".join(map(str, version(v))) == v else "must be a dotted version like 3.10"


def _slug(v: str) -> str | None:
    return None if v and v == v.lower() and all(c.isalnum() or c in "-_." for c in v) else \
        "must be lower case letters, digits, '-', '_' or '.'"


def _each(check: Rule) -> Rule:
    return lambda values: next((f"item {v!r} {broken}" for v in values if (broken := check(v))), None)


def _tier(v: str) -> str | None:
    return None if v in ISA_TIERS else f"must be a llama.cpp CPU tier: {', '.join(ISA_TIERS)}"


def _group(v: int) -> str | None:
    return None if v >= 16 and not v & (v - 1) else "must be a power of two ≥ 16"


@dataclass(frozen=True)
class Identity:
    """How the probe recognises the board (faq_runtime.probe facts)."""

    machine: str = _rule(_one_of("aarch64", "x86_64"))    # uname -m
    model: tuple[str, ...] = ()              # substrings of /proc/device-tree/model, any of
    compatible: tuple[str, ...] = ()         # entries of /proc/device-tree/compatible, any of
    l4t_major: int | None = _rule(_positive, None)  # /etc/nv_tegra_release R<major>: the JetPack line
    cpu_parts: tuple[str, ...] = ()          # /proc/cpuinfo "CPU part" values the board's cores report


@dataclass(frozen=True)
class Capability:
    """What the hardware can do."""

    isa_tier: str = _rule(_tier)             # the tier the board's cores all reach, llama.cpp's names
    cores: int | None = _rule(_positive, None)
    cpu: str = ""
    features: tuple[str, ...] = ()           # notable /proc/cpuinfo flags (the tier's are implied)
    ram_gb: tuple[float, ...] = _rule(_each(_positive), ())  # every RAM size the board ships with
    bandwidth_gbs: float | None = _rule(_positive, None)     # peak DRAM bandwidth
    gpu: str = ""
    cuda_compute_capability: str | None = _rule(_version, None)


@dataclass(frozen=True)
class Software:
    """The software line the board runs, and what onnxruntime it can get."""

    execution_providers: tuple[str, ...] = _rule(_each(_one_of(*PROVIDERS)))
    os: str = ""
    jetpack: str | None = _rule(_version, None)
    l4t: str | None = _rule(_version, None)
    cuda: str | None = _rule(_version, None)
    python: str | None = _rule(_version, None)            # the system Python a bundle's wheels target
    glibc: str | None = _rule(_version, None)             # picks the manylinux wheels that install
    onnxruntime_max: str | None = _rule(_version, None)   # newest PyPI wheel for that Python and glibc
    reserved_gb: float = _rule(_positive, 1.0)            # firmware carve-outs and a headless OS


@dataclass(frozen=True)
class BuildDefaults:
    """What `faq-deploy build --target` uses unless told otherwise."""

    bits: int = _rule(_one_of(2, 3, 4, 8))
    group: int = _rule(_group)
    accuracy_level: int = _rule(_one_of(0, 1, 2, 3, 4))  # MatMulNBits activations: 4 = int8, 0 = float
    exporter: str = _rule(_one_of("builder", "dynamo"))
    providers: tuple[str, ...] = _rule(_each(_one_of(*PROVIDERS)))  # the runtime's preference order
    context: int = _rule(_positive, 2048)                              # tokens the memory fit assumes
    float_activations: tuple[str, ...] = _rule(_each(_one_of("lm_head", "8bit")), ())  # nodes kept at level 0
    threads: int | None = _rule(_positive, None)   # the bundle's intra-op threads; None: one per core


@dataclass(frozen=True)
class Target:
    name: str = _rule(_slug)                 # the file's name without .toml
    identity: Identity
    capability: Capability
    software: Software
    build: BuildDefaults
    description: str = ""
    aliases: tuple[str, ...] = _rule(_each(_slug), ())
    source: str = field(default="", compare=False)  # the file it came from (set by the loader)

    def describe(self) -> dict[str, Any]:
        """The target as plain data (what `targets show --json` prints)."""
        return dataclasses.asdict(self)


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a TOML value fits a field's type hint (str, int, float, tuple[X, ...], X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if origin is tuple:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if isinstance(value, bool):  # TOML true/false are ints to Python; no field wants them
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    """A type hint in words: "an integer", "a list of strings"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return f"a list of {_type_name(args[0]).split(' ', 1)[1]}s"
    if args:
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}.get(hint, hint.__name__)


def _build(cls: type, data: dict[str, Any], where: str, path: str) -> Any:
    """An instance of dataclass `cls` from TOML `data`, or TargetError naming `path` and the field."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{where}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            guess = f" (did you mean {where}{close[0]}?)" if close else ""
            raise TargetError(f"{path}: unknown field {name!r}{guess}",
                              f"fields of [{where.rstrip('.') or 'top level'}]: {', '.join(fields)}")
        if dataclasses.is_dataclass(hints[key]):  # a [table]
            if not isinstance(value, dict):
                raise TargetError(f"{path}: {key} must be a [{key}] table", "see targets/README.md")
            values[key] = _build(hints[key], value, f"{key}.", path)
            continue
        if not _conforms(value, hints[key]):
            raise TargetError(f"{path}: {name} = {value!r} has the wrong type: must be {_type_name(hints[key])}",
                              "see targets/README.md for the schema")
        rule = fields[key].metadata.get("rule")
        broken = rule(value) if rule else None
        if broken:
            raise TargetError(f"{path}: {name} = {value!r} {broken}", "see targets/README.md for the schema")
        values[key] = tuple(value) if isinstance(value, list) else value
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING:
            what = f"table [{name}]" if dataclasses.is_dataclass(hints[name]) else f"field {where}{name}"
            raise TargetError(f"{path}: missing required {what}", "see targets/README.md for the schema")
    return cls(**values)


def _consistent(target: Target, path: str) -> None:
    """Rules across fields."""
    tier_machine = ISA_TIERS[target.capability.isa_tier][0]
    if tier_machine != target.identity.machine:
        raise TargetError(f"{path}: capability.isa_tier = {target.capability.isa_tier!r} is a {tier_machine} tier "
                          f"but identity.machine is {target.identity.machine!r}", "use a tier of the board's CPU")
    if "CPU" not in target.software.execution_providers:
        raise TargetError(f"{path}: software.execution_providers must include CPU", "every board runs on CPU")
    unknown = [p for p in target.build.providers if p not in target.software.execution_providers]
    if unknown:
        raise TargetError(f"{path}: build.providers {unknown} are not in software.execution_providers",
                          "prefer only providers the board has")


def parse(text: str, path: str) -> Target:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{path}: not valid TOML: {exc}", "fix the file's syntax") from None
    target = dataclasses.replace(_build(Target, data, "", path), source=path)
    if Path(path).stem != target.name:
        raise TargetError(f"{path}: name = {target.name!r} must match the file name",
                          f"rename the file to {target.name}.toml or change the name")
    _consistent(target, path)
    return target


def _files(folder: Any) -> Iterable[Any]:
    return sorted((f for f in folder.iterdir() if f.name.endswith(".toml")), key=lambda f: f.name)


def user_dirs(extra: Iterable[Path] = ()) -> list[Path]:
    """$FAQ_DEPLOY_TARGETS (os.pathsep-separated), then `extra` (--targets-dir), in override order."""
    from_env = [Path(p) for p in os.environ.get(ENV_DIRS, "").split(os.pathsep) if p]
    return from_env + list(extra)


@dataclass(frozen=True)
class Registry:
    targets: dict[str, Target]   # by name, sorted

    @property
    def names(self) -> dict[str, Target]:
        """Every name and alias → its target."""
        return {**{a: t for t in self.targets.values() for a in t.aliases}, **self.targets}

    def resolve(self, name: str | None) -> Target:
        """A target by name or alias (case-insensitive); an unknown one names the closest."""
        wanted = (name or DEFAULT_TARGET).lower()
        names = self.names
        if wanted in names:
            return names[wanted]
        close = difflib.get_close_matches(wanted, list(names), n=3, cutoff=0.4)
        raise TargetError(f"unknown target {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""),
                          "`faq-deploy targets list` shows every target and alias")


def load(dirs: Iterable[Path] = ()) -> Registry:
    """The shipped targets, overridden and extended by the files in `dirs` (each checked)."""
    targets: dict[str, Target] = {}
    for entry in _files(resources.files("faq_deploy.targets")):
        target = parse(entry.read_text(), f"targets/{entry.name}")
        targets[target.name] = target
    for folder in dirs:
        if not folder.is_dir():
            raise TargetError(f"targets folder {folder} does not exist", f"create it or fix ${ENV_DIRS}/--targets-dir")
        for entry in _files(folder):
            target = parse(entry.read_text(), str(entry))
            targets[target.name] = target
    owner: dict[str, Target] = {}
    for target in targets.values():
        for alias in target.aliases:
            other = targets.get(alias) or owner.get(alias)
            if other is not None and other is not target:
                raise TargetError(f"{target.source}: alias {alias!r} is already {other.name!r} ({other.source})",
                                  "give one of them another alias")
            owner[alias] = target
    return Registry(dict(sorted(targets.items())))
