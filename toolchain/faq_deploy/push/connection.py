"""An SSH connection to a device with paramiko: jump hosts, enforced host keys, key-only login,
keepalive, and commands that end on a deadline instead of hanging on a dead link."""

from __future__ import annotations

import os
import select
import shlex
import socket
import threading
import time
from dataclasses import dataclass

import paramiko

from faq_deploy.errors import AuthenticationFailed, ConnectionFailed, HostKeyError
from faq_deploy.push import hostkeys
from faq_deploy.push.sshconfig import DEFAULT_IDENTITIES, HostConfig

_WINDOW = 8 << 20  # per channel: keeps a long pipeline of SFTP writes in flight on slow links


@dataclass
class Result:
    code: int
    out: str
    err: str


class Connection:
    """An authenticated transport to one host (the hops before it are kept open behind it)."""

    def __init__(self, host: HostConfig, transport: paramiko.Transport, hops: list[paramiko.Transport]) -> None:
        self.host = host
        self.transport = transport
        self._hops = hops

    def run(self, argv: list[str], stdin: bytes | None = None, timeout: float = 60.0) -> Result:
        """Run `argv` on the device; `timeout` bounds the whole command (the link may die silently)."""
        channel = self.open_channel()
        command = " ".join(shlex.quote(a) for a in argv)
        try:
            channel.exec_command(command)
            if stdin is not None:
                channel.sendall(stdin)
                channel.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + timeout
            while not (channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready()):
                if time.monotonic() > deadline:
                    raise ConnectionFailed(f"{self.host}: `{argv[0]} {argv[1] if len(argv) > 1 else ''}` gave no "
                                           f"answer within {timeout:.0f} s",
                                           "check the link and the device's load, then re-run")
                if not self.transport.is_active():
                    raise ConnectionFailed(f"{self.host}: the link dropped while `{command[:60]}` ran",
                                           "re-run when the device is reachable")
                select.select([channel], [], [], 0.1)
                while channel.recv_ready():
                    out += channel.recv(1 << 16)
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(1 << 16)
            return Result(channel.recv_exit_status(), out.decode(errors="replace"), err.decode(errors="replace"))
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise ConnectionFailed(f"{self.host}: the link failed while `{command[:60]}` ran ({exc})",
                                   "re-run when the device is reachable") from None
        finally:
            close_quietly(channel)

    def rtt(self, timeout: float) -> float:
        """One round trip to the device's sshd (a keepalive request it must answer), in seconds.
        paramiko waits for the answer without a deadline, so a thread does the waiting."""
        answered = threading.Event()
        start = time.perf_counter()
        threading.Thread(target=lambda: (self.transport.global_request("keepalive@openssh.com"), answered.set()),
                         daemon=True).start()
        if not answered.wait(timeout):
            raise ConnectionFailed(f"{self.host}: no answer to a keepalive within {timeout:.0f} s",
                                   "check the link, then re-run")
        return time.perf_counter() - start

    def open_channel(self) -> paramiko.Channel:
        try:
            return self.transport.open_session(window_size=_WINDOW, timeout=self.host.connect_timeout)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise ConnectionFailed(f"{self.host}: cannot open a channel ({exc})", "re-run") from None

    def sftp(self, timeout: float) -> paramiko.SFTPClient:
        try:
            client = paramiko.SFTPClient.from_transport(self.transport, window_size=_WINDOW)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise ConnectionFailed(f"{self.host}: SFTP is not available ({exc})",
                                   "enable the sftp Subsystem in the device's sshd_config") from None
        client.get_channel().settimeout(timeout)
        return client

    def close(self) -> None:
        for transport in [self.transport, *reversed(self._hops)]:
            transport.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_quietly(closable: paramiko.Channel | paramiko.SFTPClient) -> None:
    """Close on a link that may be dead. paramiko sends a close message and raises EOFError when the
    socket is gone before its reader thread noticed; that must not replace the failure being reported."""
    try:
        closable.close()
    except (OSError, paramiko.SSHException, EOFError):
        pass


def handshake(host: HostConfig, sock: socket.socket | paramiko.Channel | None = None
              ) -> tuple[paramiko.Transport, paramiko.PKey, hostkeys.Verdict, hostkeys.Entry | None]:
    """Open the SSH transport (no login yet) and judge the host key the device presents."""
    where = f"{host.hostname}:{host.port}"
    transport = None
    try:
        if sock is None:
            sock = socket.create_connection((host.hostname, host.port), timeout=host.connect_timeout)
        transport = paramiko.Transport(sock)
        known = hostkeys.read(host.known_hosts)
        options = transport.get_security_options()
        preferred = [t for t in hostkeys.preferred_types(known, host.key_name) if t in options.key_types]
        options.key_types = preferred + [t for t in options.key_types if t not in preferred]
        # AES-GCM first: no separate MAC pass, 30% faster than paramiko's default aes128-ctr
        # (scripts/bench_push.py), and OpenSSH servers have offered it since 6.2.
        options.ciphers = tuple(sorted(options.ciphers, key=lambda c: "-gcm@" not in c))
        transport.start_client(timeout=host.connect_timeout)
    except socket.gaierror as exc:
        raise ConnectionFailed(f"cannot resolve {host.hostname} ({exc.strerror})",
                               "check the name, or give the address") from None
    except (OSError, paramiko.SSHException, EOFError) as exc:
        if transport is not None:
            transport.close()
        raise ConnectionFailed(f"cannot reach {where} ({exc or type(exc).__name__})",
                               "check that the device is on and sshd listens on that port") from None
    key = transport.get_remote_server_key()
    verdict, entry = hostkeys.judge(known, host.key_name, key)
    return transport, key, verdict, entry


def refuse(host: HostConfig, key: paramiko.PKey, verdict: hostkeys.Verdict, entry: hostkeys.Entry | None) -> None:
    shown = f"{key.get_name()} {hostkeys.fingerprint(key)}"
    check = "on the device: ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub"
    if verdict is hostkeys.Verdict.UNKNOWN:
        raise HostKeyError(f"{host.key_name} is not in known_hosts; it presents {shown}",
                           f"compare the fingerprint ({check}), then: faq-deploy trust {host.alias}")
    if verdict is hostkeys.Verdict.CHANGED:
        raise HostKeyError(f"{host.key_name} presents {shown}, but {entry.source} holds another key for it: "
                           "the device was reinstalled, or someone is in the middle",
                           f"if the change is expected ({check}), remove the old line "
                           f"(ssh-keygen -R '{host.key_name}') and run faq-deploy trust {host.alias}")
    raise HostKeyError(f"{host.key_name} presents {shown}, revoked at {entry.source}",
                       "this key must not be trusted: find out why it was revoked")


def _keys(host: HostConfig) -> list[tuple[str, paramiko.PKey]]:
    """Keys to offer: the agent's (unless IdentitiesOnly), then the identity files that load."""
    keys: list[tuple[str, paramiko.PKey]] = []
    if not host.identities_only:
        keys += [("ssh-agent key", key) for key in paramiko.Agent().get_keys()]
    files = host.identity_files or tuple(p for p in map(os.path.expanduser, DEFAULT_IDENTITIES) if os.path.exists(p))
    for path in files:
        try:
            keys.append((path, paramiko.PKey.from_path(path)))
        except (OSError, paramiko.SSHException):
            continue  # missing, encrypted without an agent, or not a key: OpenSSH skips it too
    return keys


def _login(host: HostConfig, transport: paramiko.Transport) -> None:
    tried = []
    for name, key in _keys(host):
        try:
            transport.auth_publickey(host.user, key)
            return
        except paramiko.AuthenticationException:
            tried.append(name)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise ConnectionFailed(f"{host}: the link dropped during login ({exc})", "re-run") from None
    raise AuthenticationFailed(f"{host} accepted none of: {', '.join(tried) or 'no keys found'}",
                               "add your public key to the device's ~/.ssh/authorized_keys (ssh-copy-id), "
                               "or set IdentityFile in the SSH config")


def through_jumps(host: HostConfig) -> tuple[paramiko.Channel | None, list[paramiko.Transport]]:
    """A channel to `host` through its (trusted, logged-in) jump hosts, and the transports opened;
    (None, []) when it has none."""
    opened: list[paramiko.Transport] = []
    sock = None
    try:
        for hop in host.jumps:
            jump = connect(hop)
            opened += [*jump._hops, jump.transport]
            try:
                sock = jump.transport.open_channel("direct-tcpip", (host.hostname, host.port), ("127.0.0.1", 0),
                                                   timeout=host.connect_timeout)
            except (OSError, paramiko.SSHException) as exc:
                raise ConnectionFailed(f"jump host {hop} cannot reach {host.hostname}:{host.port} ({exc})",
                                       "check ProxyJump and that the jump host allows TCP forwarding") from None
    except BaseException:
        for transport in reversed(opened):
            transport.close()
        raise
    return sock, opened


def connect(host: HostConfig) -> Connection:
    """Log in to `host` through its jump hosts; every hop's host key must be trusted."""
    sock, opened = through_jumps(host)
    try:
        transport, key, verdict, entry = handshake(host, sock)
        opened.append(transport)
        if verdict is not hostkeys.Verdict.TRUSTED:
            refuse(host, key, verdict, entry)
        _login(host, transport)
        transport.set_keepalive(host.keepalive)
        return Connection(host, transport, opened[:-1])
    except BaseException:
        for transport in reversed(opened):
            transport.close()
        raise
