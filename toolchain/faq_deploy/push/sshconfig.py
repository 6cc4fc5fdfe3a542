"""Where and how to reach a host: `user@host[:port]` or an alias from ~/.ssh/config.

paramiko reads the config but ignores `Include` and ProxyJump, so this module inlines included
files (globs, relative paths resolved the way OpenSSH does) and resolves each jump host through
the same config.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from faq_deploy.errors import ConnectionFailed

DEFAULT_CONFIG = Path("~/.ssh/config")
DEFAULT_IDENTITIES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
_INCLUDE = re.compile(r"^\s*include\s+(.+)$", re.IGNORECASE)
_MAX_DEPTH = 16  # OpenSSH's own limit on nested Includes


@dataclass(frozen=True)
class HostConfig:
    """One hop's connection settings, everything resolved."""

    alias: str
    hostname: str
    port: int = 22
    user: str = field(default_factory=lambda: os.environ.get("USER", "root"))
    identity_files: tuple[str, ...] = ()
    identities_only: bool = False
    known_hosts: tuple[str, ...] = (DEFAULT_KNOWN_HOSTS,)
    jumps: tuple[HostConfig, ...] = ()
    connect_timeout: float = 10.0
    keepalive: int = 15

    @property
    def key_name(self) -> str:
        """How known_hosts names this host: `host`, or `[host]:port` off port 22."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"


def split_spec(spec: str) -> tuple[str | None, str, int | None]:
    """`user@host:port`, `host`, `[v6addr]:port` or `ssh://user@host:port` → (user, host, port)."""
    spec = spec.removeprefix("ssh://")
    user, _, rest = spec.rpartition("@")
    port = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail.startswith(":"):
            port = _port(tail[1:], spec)
    elif rest.count(":") == 1:
        rest, _, number = rest.partition(":")
        port = _port(number, spec)
        host = rest
    else:
        host = rest
    if not host:
        raise ConnectionFailed(f"{spec!r} names no host", "write HOST, USER@HOST or USER@HOST:PORT")
    return user or None, host, port


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConnectionFailed(f"{spec!r}: port {text!r} is not a number from 1 to 65535", "fix the host spec")
    return int(text)


def expand_includes(path: Path, depth: int = 0) -> str:
    """The config text with every `Include` replaced by the files it names (relative to ~/.ssh)."""
    if depth > _MAX_DEPTH:
        raise ConnectionFailed(f"{path}: Include nested deeper than {_MAX_DEPTH}", "look for an Include loop")
    lines = []
    for line in path.read_text().splitlines():
        match = _INCLUDE.match(line)
        if not match:
            lines.append(line)
            continue
        for pattern in match.group(1).split():
            pattern = os.path.expanduser(pattern)
            if not os.path.isabs(pattern):
                pattern = os.path.join(os.path.expanduser("~/.ssh"), pattern)
            for included in sorted(glob.glob(pattern)):
                lines.append(expand_includes(Path(included), depth + 1))
    return "\n".join(lines)


def load(config_path: Path | None) -> paramiko.SSHConfig:
    path = Path(os.path.expanduser(config_path or DEFAULT_CONFIG))
    if not path.is_file():
        if config_path is not None and Path(config_path) != DEFAULT_CONFIG:
            raise ConnectionFailed(f"SSH config {path} does not exist", "pass an existing file to --ssh-config")
        return paramiko.SSHConfig.from_text("")
    return paramiko.SSHConfig.from_text(expand_includes(path))


def resolve(spec: str, config: paramiko.SSHConfig, overrides: dict[str, str] | None = None,
            seen: tuple[str, ...] = ()) -> HostConfig:
    """The settings for `spec`: the config's answer for its host, the spec's user and port on top,
    then `overrides` (an inventory's variables); jump hosts resolved the same way, in order."""
    user, host, port = split_spec(spec)
    if host in seen:
        raise ConnectionFailed(f"ProxyJump loop: {' -> '.join((*seen, host))}", "fix ProxyJump in the SSH config")
    found = config.lookup(host)
    overrides = overrides or {}
    jumps = found.get("proxyjump", "none")
    identities = overrides.get("identity_file") or found.get("identityfile")
    return HostConfig(
        alias=spec,
        hostname=overrides.get("hostname") or found.get("hostname", host),
        port=int(overrides.get("port") or port or found.get("port", 22)),
        user=overrides.get("user") or user or found.get("user") or os.environ.get("USER", "root"),
        identity_files=tuple(os.path.expanduser(p) for p in
                             ([identities] if isinstance(identities, str) else identities or [])),
        identities_only=found.get("identitiesonly", "no").lower() == "yes",
        known_hosts=tuple(os.path.expanduser(p) for p in
                          found.get("userknownhostsfile", DEFAULT_KNOWN_HOSTS).split()),
        jumps=() if jumps.lower() == "none" else tuple(
            resolve(hop, config, seen=(*seen, host)) for hop in jumps.split(",")),
        connect_timeout=float(found.get("connecttimeout", 10)),
        keepalive=int(found.get("serveraliveinterval", 15)),
    )
