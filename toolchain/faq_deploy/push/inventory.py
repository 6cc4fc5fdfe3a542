"""Ansible-style INI inventories, so a fleet already described for Ansible deploys as it stands.

Understood: hosts before any section and under `[group]`, `[group:vars]`, `[all:vars]`,
`[group:children]`, and the variables `ansible_host`, `ansible_port`, `ansible_user`,
`ansible_ssh_private_key_file`, `ansible_python_interpreter`, plus `faq_deploy_root`.
Precedence as in Ansible: all:vars < parent group < child group < the host's own line.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from faq_deploy.errors import ConnectionFailed

# Inventory variable → HostConfig override (or push option) name.
VARIABLES = {"ansible_host": "hostname", "ansible_port": "port", "ansible_user": "user",
             "ansible_ssh_private_key_file": "identity_file", "ansible_python_interpreter": "python",
             "faq_deploy_root": "root"}


@dataclass(frozen=True)
class InventoryHost:
    name: str
    settings: dict[str, str]  # keys from VARIABLES' values


def read(path: Path, group: str | None = None) -> list[InventoryHost]:
    """The hosts of `path` (of `group` and its children when given), in file order."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConnectionFailed(f"cannot read inventory {path} ({exc.strerror})",
                               "pass an existing --hosts file") from None
    members: dict[str, list[str]] = {"all": [], "ungrouped": []}   # group → hosts, in order
    host_vars: dict[str, dict[str, str]] = {}
    group_vars: dict[str, dict[str, str]] = {}
    children: dict[str, list[str]] = {}
    section, kind = "ungrouped", "hosts"
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip() if not raw.lstrip().startswith(("#", ";")) else ""
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section, _, kind = line[1:-1].partition(":")
            kind = kind or "hosts"
            if kind not in ("hosts", "vars", "children"):
                raise ConnectionFailed(f"{path}:{number}: unknown section kind {kind!r}",
                                       "use [group], [group:vars] or [group:children]")
            members.setdefault(section, [])
            continue
        words = shlex.split(line)
        if kind == "hosts":
            name = words[0]
            if "[" in name:
                raise ConnectionFailed(f"{path}:{number}: host ranges ({name}) are not supported",
                                       "list the hosts one per line")
            members[section].append(name)
            host_vars.setdefault(name, {}).update(_pairs(words[1:], path, number))
        elif kind == "vars":
            group_vars.setdefault(section, {}).update(_pairs(words, path, number))
        else:
            children.setdefault(section, []).append(words[0])
    chosen = group or "all"
    if chosen not in members and chosen not in children:
        raise ConnectionFailed(f"{path} has no group {chosen!r}",
                               f"groups: {', '.join(sorted(set(members) | set(children)))}")
    hosts: list[InventoryHost] = []
    for name in _hosts_of(chosen, members, children):
        merged: dict[str, str] = dict(group_vars.get("all", {}))
        for lineage in _groups_of(name, members, children):
            merged.update(group_vars.get(lineage, {}))
        merged.update(host_vars.get(name, {}))
        settings = {VARIABLES[k]: v for k, v in merged.items() if k in VARIABLES}
        hosts.append(InventoryHost(name, settings))
    if not hosts:
        raise ConnectionFailed(f"{path}: no hosts" + (f" in group {group!r}" if group else ""), "add hosts to it")
    return hosts


def _pairs(words: list[str], path: Path, number: int) -> dict[str, str]:
    pairs = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise ConnectionFailed(f"{path}:{number}: {word!r} is not key=value", "fix the inventory line")
        pairs[key] = value
    return pairs


def _hosts_of(group: str, members: dict[str, list[str]], children: dict[str, list[str]],
              seen: frozenset[str] = frozenset()) -> list[str]:
    if group == "all":
        names = [h for hosts in members.values() for h in hosts]
    else:
        names = list(members.get(group, []))
        for child in children.get(group, []):
            if child not in seen:
                names += _hosts_of(child, members, children, seen | {group})
    return list(dict.fromkeys(names))


def _groups_of(host: str, members: dict[str, list[str]], children: dict[str, list[str]]) -> list[str]:
    """The host's groups and all their ancestors, each ancestor before its descendants, so the
    nearest group's variables win (as Ansible's do)."""
    def lineage(group: str, seen: frozenset[str]) -> list[str]:
        parents = [p for p, kids in children.items() if group in kids and p not in seen]
        return [g for p in parents for g in lineage(p, seen | {p})] + [group]

    direct = [g for g, hosts in members.items() if host in hosts and g not in ("all", "ungrouped")]
    return list(dict.fromkeys(g for group in direct for g in lineage(group, frozenset({group}))))
