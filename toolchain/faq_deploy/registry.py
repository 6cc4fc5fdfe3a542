"""Target boards as data: `targets/*.toml`, shipped as package data, looked up by name or alias.

This is the minimal reader the build needs (name, aliases, the board's facts as records, and
the build defaults); the target-registry issue adds the schema, user folders and detection.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass
from importlib import resources
from typing import Any

from faq_deploy.errors import TargetError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

DEFAULT_TARGET = "generic-x86_64"


@dataclass(frozen=True)
class BuildDefaults:
    bits: int
    group: int
    accuracy_level: int  # MatMulNBits activations: 4 = int8 (CPU fast path), 0 = float32
    exporter: str
    provider: str        # the builder's execution provider: cpu or cuda


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    aliases: tuple[str, ...]
    identity: dict[str, Any]
    capability: dict[str, Any]
    software: dict[str, Any]
    build: BuildDefaults

    def record(self) -> dict[str, Any]:
        """What a manifest says of its target: enough for the device to check compatibility."""
        return {"name": self.name, "machine": self.identity.get("machine"),
                "isa_tier": self.capability.get("isa_tier"),
                "execution_providers": list(self.software.get("execution_providers", [])),
                "python": self.software.get("python"), "l4t": self.software.get("l4t")}


def _parse(text: str) -> Target:
    data = tomllib.loads(text)
    return Target(name=data["name"], description=data.get("description", ""),
                  aliases=tuple(data.get("aliases", ())), identity=data.get("identity", {}),
                  capability=data.get("capability", {}), software=data.get("software", {}),
                  build=BuildDefaults(**data["build"]))


def shipped() -> dict[str, Target]:
    folder = resources.files("faq_deploy.targets")
    found = [_parse(entry.read_text()) for entry in folder.iterdir() if entry.name.endswith(".toml")]
    return {t.name: t for t in sorted(found, key=lambda t: t.name)}


def resolve(name: str | None) -> Target:
    """A target by name or alias; an unknown one names the closest."""
    targets = shipped()
    wanted = (name or DEFAULT_TARGET).lower()
    names = {t.name: t for t in targets.values()} | {a: t for t in targets.values() for a in t.aliases}
    if wanted in names:
        return names[wanted]
    close = difflib.get_close_matches(wanted, list(names), n=3, cutoff=0.4)
    raise TargetError(f"unknown target {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""),
                      f"known targets: {', '.join(sorted(names))}")
