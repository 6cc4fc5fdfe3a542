"""A real OpenSSH server on 127.0.0.1 for the push tests, and a TCP proxy that injects faults.

The server is the distribution's sshd (scripts/setup.sh installs openssh-server) with its own
host key, key-only login and the stock sftp subsystem. Each login key can carry a recorded board
(FAQ_PROBE_ROOT in authorized_keys), which is how one server plays several kinds of device.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
MAX_SESSIONS = 100  # channels sshd opens on one connection
SFTP_SERVER = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                                "/usr/libexec/sftp-server") if os.path.exists(p)), "internal-sftp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path


class Sshd:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.user = getpass.getuser()
        self.host_key = keygen(folder / "host_ed25519")
        self.authorized = folder / "authorized_keys"
        self.authorized.write_text("")
        config = folder / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"PidFile {folder / 'sshd.pid'}", f"AuthorizedKeysFile {self.authorized}", "StrictModes no",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password", "UsePAM no", "PermitUserEnvironment FAQ_PROBE_ROOT",
            f"Subsystem sftp {SFTP_SERVER}", "AllowTcpForwarding yes", "MaxStartups 100",
            f"MaxSessions {MAX_SESSIONS}",
            "LogLevel ERROR", "",
        ]))
        os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory
        self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=open(folder / "sshd.log", "w"))
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not start: {(folder / 'sshd.log').read_text()}") from None
                time.sleep(0.05)

    def host_key_line(self, port: int | None = None) -> str:
        kind, blob = (self.folder / "host_ed25519.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{port or self.port} {kind} {blob}"

    def authorize(self, name: str, board: Path | None = None) -> Path:
        """A new login key; with `board`, the device's probe answers as that recorded board."""
        key = keygen(self.folder / name)
        option = f'environment="FAQ_PROBE_ROOT={board}" ' if board else ""
        with self.authorized.open("a") as handle:
            handle.write(option + (self.folder / f"{name}.pub").read_text())
        return key

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


class FaultProxy:
    """Forwards 127.0.0.1:port to the sshd; the next connection can be cut or frozen after N bytes
    sent towards the server (`drop_after`, `stall_after`), later ones pass untouched."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.drop_after: int | None = None
        self.stall_after: int | None = None
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [client, server]
            drop, stall = self.drop_after, self.stall_after
            self.drop_after = self.stall_after = None
            threading.Thread(target=self._pump, args=(client, server, drop, stall), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, None, None), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, drop: int | None, stall: int | None) -> None:
        moved = 0
        try:
            while data := source.recv(1 << 16):
                moved += len(data)
                if drop is not None and moved > drop:
                    break
                if stall is not None and moved > stall:
                    while True:  # swallow everything, answer nothing: a black-holed link
                        if not source.recv(1 << 16):
                            return
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        for s in self._sockets:
            s.close()
