"""An arm64 board emulated on this machine: Debian bookworm's arm64 userland (what Raspberry Pi OS
bookworm is built on: Python 3.11, glibc 2.36) run by qemu-user through binfmt_misc, with a /proc/cpuinfo
that describes the emulated core. The kernel stays this machine's, as it would under any container.

It runs the real arm64 wheels, onnxruntime's arm64 kernels included, exactly and slowly: what the build
uses it for is a bundle's parity as the board's CPU computes it (`emulated_logits`), since the int8
kernels of accuracy level 4 round differently on arm64 than on x86.

debootstrap makes the root once (about 5 minutes) into a tarball in the user cache, named for what it
holds; each board unpacks it into a folder of its own in about a second. Every command runs in mount and
network namespaces of its own (unshare, so root is needed): nothing stays mounted once it ends, and
nothing inside reaches a network, so an install that works there works offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faq_deploy.errors import EmulationError
from faq_deploy.fetch import cache_dir
from faq_deploy.registry import Target
from faq_runtime import agent

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "python3-venv", "openssh-server", "ca-certificates")
BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
ENVIRONMENT = "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8"
DEVICE_ROOT = "/srv/faq"  # a push's layout: bundles/<id>/, the agent under .faq/, runtimes under runtime/


@dataclass(frozen=True)
class Core:
    """A qemu CPU model and the /proc/cpuinfo lines of the core it emulates."""

    qemu: str
    part: str
    variant: str
    features: str


# By the target's ISA tier: the qemu model with the tier's features and no more, which would let
# onnxruntime pick kernels the board cannot run (qemu's default, `max`, has SVE2 and SME). The feature
# lines are the Pi 4's and the Pi 5's (the Pi 4's A72 has no crypto extension, which no kernel here uses).
CORES = {
    "armv8.0_1": Core("cortex-a72", "0xd08", "0x0", "fp asimd evtstrm crc32 cpuid"),
    "armv8.2_2": Core("cortex-a76", "0xd0b", "0x4", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
                                                    "asimdhp cpuid asimdrdm lrcpc dcpop asimddp"),
}


def core_for(target: Target) -> Core:
    tier = target.capability.isa_tier
    if target.identity.machine != "aarch64" or tier not in CORES:
        raise EmulationError(f"{target.name} ({target.identity.machine}, ISA tier {tier}) has no emulated core: "
                             f"the tiers emulated are {', '.join(CORES)} on aarch64",
                             "drop --emulated-parity for this target")
    return CORES[tier]


def cpuinfo(core: Core, cores: int) -> str:
    """/proc/cpuinfo of `cores` such cores, as an arm64 Linux kernel writes it."""
    one = ("processor\t: {}\nBogoMIPS\t: 108.00\nFeatures\t: " + core.features + "\nCPU implementer\t: 0x41\n"
           "CPU architecture: 8\nCPU variant\t: " + core.variant + "\nCPU part\t: " + core.part +
           "\nCPU revision\t: 1\n")
    return "\n".join(one.format(n) for n in range(cores))


def check_host() -> None:
    """What emulation needs of this machine, before any long work."""
    if platform.machine() == "aarch64":
        raise EmulationError("this machine is aarch64 already: the build's own parity is the board's",
                             "drop --emulated-parity")
    if os.geteuid() != 0 or not shutil.which("unshare"):
        raise EmulationError("the emulated board runs in mount namespaces (unshare), which needs root",
                             "run the build as root, or drop --emulated-parity")
    if not BINFMT.exists():
        raise EmulationError(f"no qemu-aarch64 handler in binfmt_misc ({BINFMT})",
                             "install qemu-user-static, binfmt-support and debootstrap (scripts/setup.sh does, as "
                             "root)")


def root_tarball() -> Path:
    """The cached arm64 root, made by debootstrap on first use."""
    check_host()
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
            raise EmulationError(f"debootstrap of the arm64 root failed: {(made.stdout + made.stderr)[-500:]}",
                                 f"check that {MIRROR} is reachable and debootstrap is installed")
        partial = Path(work) / "root.tar"
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], check=True)
        partial.replace(tarball)
    return tarball


@dataclass(frozen=True)
class Dress:
    """What the board's /proc and /sys say of it: its cpuinfo and, when recorded, meminfo and device tree."""

    cpuinfo: Path
    meminfo: Path | None = None
    devicetree: Path | None = None  # a folder, bound at /sys/firmware/devicetree/base


class EmulatedBoard:
    """A fresh arm64 root in `folder`, dressed as `dress` says, its code run on the qemu core `qemu_cpu`."""

    def __init__(self, folder: Path, dress: Dress, qemu_cpu: str) -> None:
        self.root = folder / "root"
        self.root.mkdir(parents=True)
        subprocess.run(["tar", "-C", str(self.root), "--numeric-owner", "-xf", str(root_tarball())], check=True)
        self.firmware = folder / "firmware"  # bound over the host's /sys/firmware, which has no device tree
        if dress.devicetree:
            shutil.copytree(dress.devicetree, self.firmware / "devicetree" / "base")
        self.dress, self.qemu_cpu = dress, qemu_cpu

    def put(self, source: Path, inside: str) -> str:
        """Copy a file or folder of this machine to `inside` (an absolute path in the root)."""
        dest = self.root / inside.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, dest)
        return inside

    def _entered(self, command: str, dressed: bool, network: bool) -> list[str]:
        """The command line that runs `command` (sh) inside the board as root."""
        r = shlex.quote(str(self.root))
        mounts = [f"mount -t proc proc {r}/proc", f"mount -t sysfs sysfs {r}/sys"]
        if self.dress.devicetree:
            mounts.append(f"mount --bind {shlex.quote(str(self.firmware))} {r}/sys/firmware")
        if self.dress.meminfo:
            mounts.append(f"mount --bind {shlex.quote(str(self.dress.meminfo))} {r}/proc/meminfo")
        if dressed:
            mounts.append(f"mount --bind {shlex.quote(str(self.dress.cpuinfo))} {r}/proc/cpuinfo")
        enter = f'exec chroot {r} /usr/bin/env -i {ENVIRONMENT} QEMU_CPU={self.qemu_cpu} /bin/sh -c "$0"'
        namespaces = ["--mount"] if network else ["--mount", "--net"]
        return ["unshare", *namespaces, "--propagation", "private", "--", "sh", "-ec",
                " && ".join([*mounts, enter]), command]

    def run(self, command: str, timeout: float = 900, dressed: bool = True) -> subprocess.CompletedProcess:
        """`command` inside the board, with no network. `dressed=False` leaves the host's x86
        /proc/cpuinfo in place: an arm64 userland reading an x86 CPU description."""
        return subprocess.run(self._entered(command, dressed, network=False), capture_output=True, text=True,
                              timeout=timeout)

    def serve(self, command: str) -> subprocess.Popen:
        """`command` inside the board, left running, with this machine's loopback (a server's)."""
        return subprocess.Popen(self._entered(command, dressed=True, network=True), stderr=subprocess.PIPE, text=True)


LOGITS = """import json, sys
import numpy as np
from faq_runtime.model import Decoder
np.save(sys.argv[3], Decoder(sys.argv[1]).logits(json.load(open(sys.argv[2]))))
"""


def runtime_python(board: EmulatedBoard, wheels: Path) -> str:
    """Install faq-runtime in the board from `wheels` with the device agent, as a push does; its Python."""
    board.put(wheels, f"{DEVICE_ROOT}/bundles/build/wheels")
    board.put(Path(agent.__file__), f"{DEVICE_ROOT}/.faq/agent.py")
    done = board.run(f"python3 {DEVICE_ROOT}/.faq/agent.py install {DEVICE_ROOT} build")
    installed = json.loads(done.stdout) if done.returncode == 0 else {}
    if not installed.get("runtime"):
        raise EmulationError(f"faq-runtime did not install in the emulated board: "
                             f"{installed.get('reason') or done.stderr[-500:]}", "report this")
    return str(Path(installed["runtime"]).parent / "python")


def logits_inside(board: EmulatedBoard, python: str, model_dir: str, ids: list[int]) -> np.ndarray:
    """The runtime's logits [tokens, vocabulary] of `ids` from a model folder inside the board, computed there."""
    (board.root / "tmp" / "ids.json").write_text(json.dumps(ids))
    (board.root / "tmp" / "logits.py").write_text(LOGITS)
    done = board.run(f"{python} /tmp/logits.py {model_dir} /tmp/ids.json /tmp/logits.npy")
    if done.returncode != 0:
        raise EmulationError(f"the model did not run in the emulated board: {done.stderr[-500:]}", "report this")
    return np.load(board.root / "tmp" / "logits.npy")


def emulated_logits(target: Target, model_dir: Path, wheels: Path, ids: list[int], work: Path) -> np.ndarray:
    """The logits of `ids` from the exported `model_dir` as onnxruntime computes them on `target`'s CPU
    architecture, under emulation: the runtime installed from `wheels` (the target's wheelhouse) by the
    device agent, as a push installs it."""
    core = core_for(target)
    work.mkdir(parents=True, exist_ok=True)
    (work / "cpuinfo").write_text(cpuinfo(core, target.capability.cores or 4))  # cores unstated: a Pi's 4
    board = EmulatedBoard(work / "board", Dress(work / "cpuinfo"), core.qemu)
    python = runtime_python(board, wheels)
    return logits_inside(board, python, board.put(model_dir, f"{DEVICE_ROOT}/bundles/build/model"), ids)
