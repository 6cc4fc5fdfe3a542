"""A device root reached over SSH: the agent and probe scripts sent alone, run with the device's
own Python, their JSON answers returned; and the root's lock, held by a device process."""

from __future__ import annotations

import json
import os
import posixpath
import shlex
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paramiko

from faq_deploy.errors import ConnectionFailed, DeviceBusy, TransferFailed
from faq_deploy.push.connection import Connection, close_quietly
from faq_runtime import agent, probe

DEFAULT_ROOT = "~/.local/share/faq-deploy"
TOOLS = ".faq"  # under the root: agent.py and probe.py, refreshed on every connection
# The root as an absolute path (`~` is the device user's home), created with its tools folder.
_ABSPATH = ("import os,sys; p=os.path.abspath(os.path.expanduser(sys.argv[1])); "
            "os.makedirs(p+'/.faq', exist_ok=True); print(p)")


class Device:
    """A device root whose tools are installed; `Device.connect` makes one."""

    def __init__(self, connection: Connection, root: str, python: str, timeout: float) -> None:
        self.connection = connection
        self.root = root  # absolute, as the device resolved it
        self.python = python
        self.timeout = timeout

    @classmethod
    def connect(cls, connection: Connection, root: str = DEFAULT_ROOT, python: str = "python3",
                timeout: float = 30.0) -> Device:
        """Resolve `root` on the device (creating it) and send the agent and probe scripts there."""
        done = connection.run([python, "-c", _ABSPATH, root], timeout=timeout)
        if done.code == 127:
            raise TransferFailed(f"{connection.host}: `{python}` is not installed on the device",
                                 "install Python 3 there, or name its interpreter with --python")
        if done.code != 0:
            raise TransferFailed(f"{connection.host}: cannot create the device root {root}: {done.err.strip()[-300:]}",
                                 "pick a writable --root")
        device = cls(connection, done.out.strip(), python, timeout)
        sftp = connection.sftp(timeout)
        try:
            for module in (agent, probe):
                # written aside, then renamed over: another push's python may be starting the old copy
                part = f"{device.tool(module)}.{uuid.uuid4().hex[:8]}.part"
                with Path(module.__file__).open("rb") as source:
                    sftp.putfo(source, part)
                sftp.posix_rename(part, device.tool(module))
        except (OSError, paramiko.SSHException) as exc:
            raise ConnectionFailed(f"{connection.host}: cannot write to {device.root} ({exc})", "re-run") from None
        finally:
            close_quietly(sftp)
        return device

    def tool(self, module: Any) -> str:
        return posixpath.join(self.root, TOOLS, os.path.basename(module.__file__))

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def op(self, name: str, *args: str, stdin: bytes | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Run one agent operation on the root; its JSON answer."""
        done = self.connection.run([self.python, self.tool(agent), name, self.root, *args], stdin,
                                   timeout or self.timeout)
        if done.code != 0:
            raise TransferFailed(f"{self.connection.host}: agent {name} failed: "
                                 f"{(done.err or done.out).strip().splitlines()[-1:] or ['exit ' + str(done.code)]}",
                                 "see `faq-deploy logs HOST`, fix the device, then re-run")
        lines = done.out.strip().splitlines()
        return json.loads(lines[-1]) if lines else {}

    def text(self, name: str, *args: str) -> str:
        """An agent operation whose answer is plain text (logs)."""
        return self.connection.run([self.python, self.tool(agent), name, self.root, *args], timeout=self.timeout).out

    def probe(self) -> dict[str, Any]:
        done = self.connection.run([self.python, self.tool(probe), "--disk", self.root], timeout=self.timeout)
        if done.code != 0:
            raise TransferFailed(f"{self.connection.host}: the probe failed: {done.err.strip()[-300:]}",
                                 "run `python3 -m faq_runtime.probe` on the device to see why")
        return json.loads(done.out)

    @contextmanager
    def locked(self, owner: str, wait: float, on_wait: Callable[[str], None]) -> Iterator[None]:
        """Hold the root's lock for the block. A device process holds it until our channel closes,
        so a push that dies (or loses its link) never leaves the device locked."""
        channel = self.connection.open_channel()
        try:
            self._acquire(channel, owner, wait, on_wait)
            yield
        finally:
            close_quietly(channel)

    def _acquire(self, channel: paramiko.Channel, owner: str, wait: float, on_wait: Callable[[str], None]) -> None:
        try:
            channel.settimeout(wait + self.timeout)
            channel.exec_command(shlex.join([self.python, self.tool(agent), "lock", self.root, "--owner", owner,
                                              "--wait", str(wait)]))
            answers = channel.makefile("r")
            while True:
                line = answers.readline()
                if not line:
                    raise TransferFailed(f"{self.connection.host}: the lock could not be taken: "
                                         f"{channel.makefile_stderr('r').read().strip()[-300:]}", "re-run")
                answer = json.loads(line)
                if answer["lock"] == "held":
                    return
                if answer["lock"] == "waiting":
                    on_wait(answer["holder"])
                else:
                    raise DeviceBusy(f"{self.connection.host}: {answer['holder']} held the lock for {wait:.0f} s",
                                     "wait for that push to finish, or raise --lock-wait")
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise ConnectionFailed(f"{self.connection.host}: the link failed while taking the lock ({exc})",
                                   "re-run") from None
