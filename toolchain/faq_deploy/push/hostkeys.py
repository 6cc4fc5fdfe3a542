"""known_hosts, read the way OpenSSH reads it, and the verdict on a key a device presents.

paramiko's own reader (5.1) raises InvalidHostKey on any marker line: it takes `@revoked` for the
host field and the key type for the key. This reader understands the markers: a revoked key is
refused even when another line trusts it.
`@cert-authority` lines are skipped (host certificates are not supported, and never trusted by accident).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path

import paramiko


class Verdict(enum.Enum):
    TRUSTED = "trusted"
    UNKNOWN = "unknown"
    CHANGED = "changed"
    REVOKED = "revoked"


@dataclass(frozen=True)
class Entry:
    marker: str | None
    patterns: tuple[str, ...]
    key_type: str
    key_blob: bytes
    source: str  # "file:line", for messages

    def names(self, name: str) -> bool:
        """Does this line's host field cover `name` (`host` or `[host]:port`)? Negations veto."""
        matched = False
        for pattern in self.patterns:
            negated = pattern.startswith("!")
            pattern = pattern.removeprefix("!")
            if pattern.startswith("|1|"):
                hit = _hashed_match(pattern, name)
            else:
                hit = _wildcard(pattern).fullmatch(name.lower()) is not None
            if hit and negated:
                return False
            matched = matched or hit
        return matched


def _wildcard(pattern: str) -> re.Pattern[str]:
    """OpenSSH patterns know only `*` and `?`; brackets (as in `[host]:port`) are literal."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower()))


def _hashed_match(pattern: str, name: str) -> bool:
    try:
        salt, digest = (base64.b64decode(part) for part in pattern[3:].split("|"))
    except ValueError:
        return False
    return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's `SHA256:…` form, what `ssh-keygen -lf` prints on the device."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def read(paths: tuple[str, ...]) -> list[Entry]:
    entries = []
    for path in paths:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            marker = fields.pop(0) if fields[0].startswith("@") else None
            if len(fields) < 3:
                continue  # malformed: OpenSSH skips it too
            try:
                blob = base64.b64decode(fields[2], validate=True)
            except ValueError:
                continue
            entries.append(Entry(marker, tuple(fields[0].split(",")), fields[1], blob, f"{path}:{number}"))
    return entries


def judge(entries: list[Entry], name: str, key: paramiko.PKey) -> tuple[Verdict, Entry | None]:
    """TRUSTED when a plain line for `name` holds this key; REVOKED when any @revoked line holds it
    (whatever its host field); CHANGED when lines for `name` exist but none holds it."""
    blob = key.asbytes()
    for entry in entries:
        if entry.marker == "@revoked" and entry.key_blob == blob:
            return Verdict.REVOKED, entry
    mine = [e for e in entries if e.marker is None and e.names(name)]
    for entry in mine:
        if entry.key_blob == blob:
            return Verdict.TRUSTED, entry
    return (Verdict.CHANGED, mine[0]) if mine else (Verdict.UNKNOWN, None)


def preferred_types(entries: list[Entry], name: str) -> list[str]:
    """Key types known for `name`: the ones to ask the server for first, as OpenSSH does."""
    return list(dict.fromkeys(e.key_type for e in entries if e.marker is None and e.names(name)))


def record(path: str, name: str, key: paramiko.PKey) -> None:
    """Append a line for `name`, creating the file (mode 600) and its folder when needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as handle:
        handle.write(f"{name} {key.get_name()} {key.get_base64()}\n")
