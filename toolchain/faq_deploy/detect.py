"""Which target is this device? Probe facts (faq_runtime.probe) matched against the registry.

A target matches when none of its identity or capability claims contradict the facts; among the
matches the one with the most confirmed claims wins, so a board file beats the generic target of
its architecture. Every other target comes back with the reasons it was ruled out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from faq_deploy.registry import Registry, Target
from faq_runtime.compat import ISA_TIERS
from faq_runtime.fit import GIB

# MemTotal is the marketed size less firmware carve-outs (and GPU carve-outs on Jetsons): 7.4 GiB on
# an 8 GB Orin Nano, 3.8 GiB on a 4 GB Raspberry Pi 4.
_MEMTOTAL_FLOOR = 0.75


@dataclass(frozen=True)
class Match:
    target: Target
    confirmed: tuple[str, ...]   # claims the facts bear out
    mismatches: tuple[str, ...]  # claims the facts contradict

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _judge(target: Target, facts: dict[str, Any]) -> Match:
    ident, cap = target.identity, target.capability
    yes: list[str] = []
    no: list[str] = []

    def claim(holds: bool, what: str, why_not: str) -> None:
        (yes if holds else no).append(what if holds else why_not)

    machine = facts.get("machine")
    if machine != ident.machine:  # nothing else about the board matters then
        return Match(target, (), (f"machine is {machine}, not {ident.machine}",))
    yes.append(f"machine {machine}")
    if ident.model:
        model = facts.get("model") or ""
        claim(any(m in model for m in ident.model), f"model {model!r}",
              f"device-tree model {model!r} names none of {', '.join(ident.model)}" if model
              else "no device-tree model")
    if ident.compatible:
        listed = [c for c in ident.compatible if c in (facts.get("compatible") or [])]
        claim(bool(listed), f"compatible {', '.join(listed)}",
              f"device-tree compatible lists none of {', '.join(ident.compatible)}")
    if ident.l4t_major is not None:
        l4t = facts.get("l4t")
        claim(bool(l4t) and l4t["major"] == ident.l4t_major, f"L4T R{ident.l4t_major}",
              f"L4T is R{l4t['release']}, not R{ident.l4t_major}" if l4t else "no /etc/nv_tegra_release (not a Jetson)")
    cpu = facts.get("cpu") or {}
    if ident.cpu_parts and cpu.get("parts"):
        claim(set(cpu["parts"]) <= set(ident.cpu_parts), f"CPU parts {', '.join(cpu['parts'])}",
              f"CPU parts {', '.join(cpu['parts'])} are not {', '.join(ident.cpu_parts)}")
    missing = [f for f in ISA_TIERS[cap.isa_tier][1] if f not in cpu.get("features", [])]
    claim(not missing, f"ISA tier {cap.isa_tier}", f"CPU lacks {', '.join(missing)} ({cap.isa_tier})")
    total = (facts.get("memory") or {}).get("total_bytes")
    if cap.ram_gb and total:
        fits = [gb for gb in cap.ram_gb if _MEMTOTAL_FLOOR * gb * GIB <= total <= gb * GIB]
        claim(bool(fits), f"RAM {fits[0] if fits else ''} GB",
              f"{total / GIB:.1f} GiB of RAM matches none of {', '.join(map(str, cap.ram_gb))} GB")
    return Match(target, tuple(yes), tuple(no))


def match(registry: Registry, facts: dict[str, Any]) -> list[Match]:
    """Every target judged against `facts`: matches first, best (most confirmed claims) first."""
    judged = [_judge(t, facts) for t in registry.targets.values()]
    return sorted(judged, key=lambda m: (not m.ok, -len(m.confirmed), m.target.name))
