"""An emulated arm64 board for the tests (faq_deploy.emulate) dressed as one of fixtures/boards: the
board's cpuinfo and meminfo bound over /proc's, its device tree under /sys/firmware, so that detection
sees that board; its own OpenSSH server for pushes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from faq_deploy.emulate import CORES, Dress, EmulatedBoard

# A Cortex-A76, the Pi 5's core: qemu's default CPU has features no board has, which the wheels would use
QEMU_CPU = CORES["armv8.2_2"].qemu


class Arm64Board(EmulatedBoard):
    """A fresh arm64 root in `folder` that reads as the recorded `board` (a folder of fixtures/boards)."""

    def __init__(self, folder: Path, board: Path) -> None:
        proc = board / "proc"
        super().__init__(folder, Dress(proc / "cpuinfo", proc / "meminfo", proc / "device-tree"), QEMU_CPU)

    def sshd(self, port: int, login_key: Path) -> subprocess.Popen:
        """The board's own OpenSSH server (arm64, emulated) on 127.0.0.1:`port`, root logging in with
        `login_key`; the host key is made here, since generating one under emulation is slow."""
        keygen = self.root / "etc" / "ssh" / "test_host_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keygen)], check=True)
        (self.root / "root" / ".ssh").mkdir(mode=0o700, exist_ok=True)
        shutil.copy(f"{login_key}.pub", self.root / "root" / ".ssh" / "authorized_keys")
        (self.root / "run" / "sshd").mkdir(parents=True, exist_ok=True)
        (self.root / "etc" / "ssh" / "sshd_test_config").write_text("\n".join([
            f"Port {port}", "ListenAddress 127.0.0.1", "HostKey /etc/ssh/test_host_ed25519",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "Subsystem sftp /usr/lib/openssh/sftp-server", "MaxSessions 100", "LogLevel ERROR", ""]))
        return self.serve("exec /usr/sbin/sshd -D -e -f /etc/ssh/sshd_test_config")
