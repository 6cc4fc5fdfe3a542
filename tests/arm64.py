"""An emulated arm64 board for the tests: Debian bookworm's arm64 userland (what Raspberry Pi OS
bookworm is built on: Python 3.11, glibc 2.36) run by qemu-user through binfmt_misc, dressed as one of
fixtures/boards: the board's cpuinfo and meminfo bound over /proc's, its device tree under
/sys/firmware. The kernel stays this machine's, as it would under any container.

debootstrap makes the root once (about 5 minutes) into a tarball in the user cache, named for what it
holds; each board unpacks it into a folder of its own in seconds. Every command runs in mount and
network namespaces of its own (unshare): nothing stays mounted once it ends, and nothing inside reaches
a network, so an install that works there works offline.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from faq_deploy.fetch import cache_dir

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "python3-venv", "openssh-server", "ca-certificates")
# A Cortex-A76, the Pi 5's core: qemu's default CPU has features no board has, which the wheels would use
QEMU_CPU = "cortex-a76"
BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
ENVIRONMENT = f"PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8 QEMU_CPU={QEMU_CPU}"


def root_tarball() -> Path:
    """The cached arm64 root, made by debootstrap on first use."""
    if not BINFMT.exists():
        raise RuntimeError(f"no qemu-aarch64 handler in binfmt_misc ({BINFMT}): run scripts/setup.sh as root")
    key = hashlib.sha256(" ".join((SUITE, MIRROR, *PACKAGES)).encode()).hexdigest()[:12]
    tarball = cache_dir() / "arm64" / f"debian-{SUITE}-arm64-{key}.tar"
    if tarball.exists():
        return tarball
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tarball.parent) as work:
        root = Path(work) / "root"
        made = subprocess.run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                               SUITE, str(root), MIRROR], capture_output=True, text=True)
        if made.returncode != 0:
            raise RuntimeError(f"debootstrap failed: {(made.stdout + made.stderr)[-2000:]}")
        partial = Path(work) / "root.tar"
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], check=True)
        partial.replace(tarball)
    return tarball


class Arm64Board:
    """A fresh arm64 root in `folder` that reads as the recorded `board` (a folder of fixtures/boards)."""

    def __init__(self, folder: Path, board: Path) -> None:
        self.root = folder / "root"
        self.root.mkdir(parents=True)
        subprocess.run(["tar", "-C", str(self.root), "--numeric-owner", "-xf", str(root_tarball())], check=True)
        # what sysfs would hold on the board; bound over the host's /sys/firmware, which has none
        self.firmware = folder / "firmware"
        shutil.copytree(board / "proc" / "device-tree", self.firmware / "devicetree" / "base")
        self.board = board

    def put(self, source: Path, inside: str) -> str:
        """Copy a file or folder of this machine to `inside` (an absolute path in the root)."""
        dest = self.root / inside.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, dest)
        return inside

    def _entered(self, command: str, dressed: bool, network: bool) -> list[str]:
        """The command line that runs `command` (sh) inside the board as root."""
        r, board = shlex.quote(str(self.root)), shlex.quote(str(self.board))
        mounts = [f"mount -t proc proc {r}/proc", f"mount -t sysfs sysfs {r}/sys",
                  f"mount --bind {shlex.quote(str(self.firmware))} {r}/sys/firmware",
                  f"mount --bind {board}/proc/meminfo {r}/proc/meminfo"]
        if dressed:
            mounts.append(f"mount --bind {board}/proc/cpuinfo {r}/proc/cpuinfo")
        enter = f'exec chroot {r} /usr/bin/env -i {ENVIRONMENT} /bin/sh -c "$0"'
        namespaces = ["--mount"] if network else ["--mount", "--net"]
        return ["unshare", *namespaces, "--propagation", "private", "--", "sh", "-ec",
                " && ".join([*mounts, enter]), command]

    def run(self, command: str, timeout: float = 900, dressed: bool = True) -> subprocess.CompletedProcess:
        """`command` inside the board, with no network. `dressed=False` leaves the host's x86
        /proc/cpuinfo in place: an arm64 userland reading an x86 CPU description."""
        return subprocess.run(self._entered(command, dressed, network=False), capture_output=True, text=True,
                              timeout=timeout)

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
        return subprocess.Popen(self._entered("exec /usr/sbin/sshd -D -e -f /etc/ssh/sshd_test_config",
                                              dressed=True, network=True), stderr=subprocess.PIPE, text=True)
