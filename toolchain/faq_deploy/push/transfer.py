"""Resumable upload of a bundle's files into staging/<id>/<path>.part over SFTP.

Each file continues from the bytes the device already holds (the agent's `stage` answer), so a
re-run after a lost link sends only the remainder. Writes are pipelined (many requests in flight,
acknowledgements read at the end), and files are spread over parallel SFTP channels. A watchdog
closes the link when no byte has moved for `stall` seconds: a black-holed link ends in an error
instead of a hang.
"""

from __future__ import annotations

import posixpath
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko

from faq_deploy.errors import ConnectionFailed
from faq_deploy.push.connection import Connection, close_quietly

PART = ".part"
_CHUNK = 1 << 20
# SFTP write size: paramiko's 32 KiB default costs a Python round of work per 32 KiB; OpenSSH's
# sftp-server takes messages up to 256 KiB. 255 KiB doubled single-channel loopback throughput.
_REQUEST = 255 * 1024
# Above this round trip one channel's window runs dry between acknowledgements: spread files over more.
FAR_RTT_S = 0.05
FAR_CHANNELS = 4


def channels_for(rtt: float) -> int:
    return FAR_CHANNELS if rtt > FAR_RTT_S else 1


@dataclass(frozen=True)
class Piece:
    """One file still to send: its bundle path, full size and the offset the device holds."""

    path: str
    size: int
    offset: int


class _Link:
    """Shared progress of one upload; `moved` feeds the watchdog and the progress callback."""

    def __init__(self, on_bytes: Callable[[int], None]) -> None:
        self.sent = 0
        self.last_move = time.monotonic()
        self.failure: BaseException | None = None
        self._lock = threading.Lock()
        self._on_bytes = on_bytes

    def moved(self, n: int) -> None:
        with self._lock:
            self.sent += n
            self.last_move = time.monotonic()
        self._on_bytes(n)


def upload(connection: Connection, local_root: Path, staging: str, pieces: list[Piece], *,
           channels: int = 2, stall: float = 30.0, on_bytes: Callable[[int], None] = lambda n: None) -> int:
    """Send what `pieces` lack; the bytes sent. Raises ConnectionFailed (with how far it got) when the
    link drops or stalls; the device keeps every byte that arrived for the next run."""
    todo: queue.SimpleQueue[Piece] = queue.SimpleQueue()
    for piece in sorted(pieces, key=lambda p: p.offset - p.size):  # largest remainder first
        todo.put(piece)
    link = _Link(on_bytes)
    stop = threading.Event()
    workers = [threading.Thread(target=_worker, args=(connection, local_root, staging, todo, link, stall), daemon=True)
               for _ in range(max(1, min(channels, len(pieces))))]
    watchdog = threading.Thread(target=_watch, args=(connection, link, stall, stop), daemon=True)
    watchdog.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stop.set()
    watchdog.join()
    if link.failure is not None:
        total = sum(p.size for p in pieces)
        held = sum(p.offset for p in pieces) + link.sent
        raise ConnectionFailed(f"{connection.host}: link lost at about {held:,} of {total:,} bytes "
                               f"({link.failure or type(link.failure).__name__})",
                               "re-run the same push: it resumes from what the device holds") from link.failure
    return link.sent


def _watch(connection: Connection, link: _Link, stall: float, stop: threading.Event) -> None:
    while not stop.wait(min(1.0, stall / 4)):
        if time.monotonic() - link.last_move > stall:
            link.failure = link.failure or TimeoutError(f"no progress for {stall:.0f} s")
            connection.transport.close()  # unblocks every channel waiting on the dead link
            return


def _worker(connection: Connection, local_root: Path, staging: str, todo: queue.SimpleQueue[Piece], link: _Link,
            stall: float) -> None:
    try:
        sftp = connection.sftp(stall)
        try:
            while link.failure is None:
                try:
                    piece = todo.get_nowait()
                except queue.Empty:
                    return
                _send(sftp, local_root / piece.path, posixpath.join(staging, piece.path + PART), piece, link)
        finally:
            close_quietly(sftp)
    except (OSError, paramiko.SSHException, EOFError, ConnectionFailed) as exc:
        link.failure = link.failure or exc


def _send(sftp: paramiko.SFTPClient, local: Path, remote: str, piece: Piece, link: _Link) -> None:
    with sftp.open(remote, "r+b" if piece.offset else "wb") as out, local.open("rb") as source:
        out.set_pipelined(True)
        out.MAX_REQUEST_SIZE = _REQUEST
        out.seek(piece.offset)
        source.seek(piece.offset)
        while link.failure is None and (block := source.read(_CHUNK)):
            out.write(block)
            link.moved(len(block))
