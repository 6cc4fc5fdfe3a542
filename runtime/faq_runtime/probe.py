"""What this device is: the facts deployment decisions need, read with the standard library only.

This one file is also sent over SSH and run with whatever `python3` a board has before anything is
installed (Jetson Nano's JetPack 4 ships 3.6), so it stays self-contained and 3.6-compatible: no
imports from faq_runtime, no dataclasses, no postponed annotations.

`--root DIR` (or $FAQ_PROBE_ROOT) reads a recorded board instead of this machine: the same files under DIR, plus
`.faq-probe/interpreter.json` for what no file holds (Python, onnxruntime). `--record DIR` writes
such a recording of this machine, which is how test fixtures and bug reports are made.

The machine is the userland's, read from the interpreter's own ELF header: that is what decides which
wheels run. The kernel's (/proc/sys/kernel/arch) can differ, on a 32-bit userland over a 64-bit kernel or
an emulated one under qemu-user; it is reported as `kernel_machine` beside it. onnxruntime is imported
in a child process, so a wheel that crashes on this CPU becomes a reported fact (`onnxruntime_error`)
instead of the probe's death, and with it a deploy's preflight.

    python3 -m faq_runtime.probe [--root DIR] [--disk PATH] [--record DIR]
    python3 probe.py ...            (the same, copied alone to a device)
"""

import argparse
import json
import os
import platform
import signal
import struct
import subprocess
import sys

PROBE_VERSION = 2  # 2: machine is the userland's; kernel_machine and onnxruntime_error added
# A recording to answer for this machine, also when run over SSH by a deploy: how a test device
# (or a support engineer replaying a customer's board) stands in for a real one.
ROOT_ENV = "FAQ_PROBE_ROOT"
INTERPRETER = os.path.join(".faq-probe", "interpreter.json")
# Every file the probe reads, relative to the root; a recording copies exactly these. A tuple: the first
# that exists (/proc/device-tree is a link to sysfs's copy of the device tree, which a chroot may lack).
FILES = {
    "arch": "proc/sys/kernel/arch",
    "model": ("proc/device-tree/model", "sys/firmware/devicetree/base/model"),
    "compatible": ("proc/device-tree/compatible", "sys/firmware/devicetree/base/compatible"),
    "tegra": "etc/nv_tegra_release",
    "cpuinfo": "proc/cpuinfo",
    "meminfo": "proc/meminfo",
    "cgroup": "proc/self/cgroup",
}
# Memory cgroups (a container's limit, a systemd slice's): (mount, limit file, usage file, the
# memory.stat key of page cache the kernel reclaims before it would kill us), v2 then v1.
CGROUPS = (
    ("sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
    ("sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
)
NO_LIMIT = 2 ** 62  # v1 writes "no limit" as 2**63 - 1 rounded to a page, v2 as "max"


def _paths(key):
    paths = FILES[key]
    return paths if isinstance(paths, tuple) else (paths,)


def _read(root, key):
    for relative in _paths(key):
        text = _read_file(root, relative)
        if text is not None:
            return text
    return None


def _read_file(root, relative):
    try:
        with open(os.path.join(root, relative), "rb") as handle:
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return None


def _device_tree(text):
    """Device-tree strings are NUL-terminated (and NUL-separated for lists)."""
    return [part for part in (text or "").split("\0") if part.strip()]


def _l4t(text):
    """`# R36 (release), REVISION: 4.3, GCID: ...` → {"major": 36, "revision": "4.3", "release": "36.4.3"}."""
    if not text or not text.startswith("# R"):
        return None
    head = text[3:].split(",")
    major = head[0].split(" ")[0]
    revision = ""
    for part in head[1:]:
        if part.strip().startswith("REVISION:"):
            revision = part.split(":", 1)[1].strip()
    if not major.isdigit():
        return None
    return {"major": int(major), "revision": revision, "release": major + "." + revision if revision else major}


def _cpu(text):
    """Cores, the union of feature flags (ARM `Features`, x86 `flags`), ARM core part numbers."""
    features, parts, names, cores = set(), set(), set(), 0
    for line in (text or "").splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor":
            cores += 1
        elif key in ("Features", "flags"):
            features.update(value.split())
        elif key == "CPU part":
            parts.add(value.lower())
        elif key == "model name":
            names.add(value)
    return {"cores": cores or None, "features": sorted(features), "parts": sorted(parts), "names": sorted(names)}


def _memory(text):
    found = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(":")
        if key in ("MemTotal", "MemAvailable") and value.strip().endswith("kB"):
            found[key] = int(value.split()[0]) * 1024
    return {"total_bytes": found.get("MemTotal"), "available_bytes": found.get("MemAvailable")}


def _cgroup_levels(root):
    """This process's memory cgroup folders, innermost first up to the mount, with their CGROUPS row."""
    levels = []
    for line in (_read(root, "cgroup") or "").splitlines():
        ident, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if ident == "0" and not controllers:
            kind = CGROUPS[0]
        elif "memory" in controllers.split(","):
            kind = CGROUPS[1]
        else:
            continue
        mount = kind[0]
        folder = os.path.join(mount, path.strip("/")) if path.strip("/") else mount
        if not os.path.isdir(os.path.join(root, folder)):  # a container sees its own cgroup at the mount
            folder = mount
        while True:
            levels.append((folder, kind))
            if folder == mount:
                break
            folder = os.path.dirname(folder)
    return levels


def _cgroup_files(root):
    return [os.path.join(folder, name) for folder, (_, limit, usage, _) in _cgroup_levels(root)
            for name in (limit, usage, "memory.stat")]


def _cgroup_memory(root):
    """(tightest limit, least room left under any limit) over the enclosing memory cgroups, or None."""
    found = []
    for folder, (_, limit_name, usage_name, cache_key) in _cgroup_levels(root):
        limit = _integer(_read_file(root, os.path.join(folder, limit_name)))
        usage = _integer(_read_file(root, os.path.join(folder, usage_name)))
        if limit is None or limit >= NO_LIMIT or usage is None:
            continue
        stat = dict(line.split(" ", 1) for line in (_read_file(root, os.path.join(folder, "memory.stat")) or "")
                    .splitlines() if " " in line)
        found.append((limit, limit - usage + (_integer(stat.get(cache_key)) or 0)))
    return (min(f[0] for f in found), min(f[1] for f in found)) if found else None


def _integer(text):
    text = (text or "").strip()
    return int(text) if text.isdigit() else None


# e_machine of an ELF header → the name platform.machine() gives that userland
ELF_MACHINES = {3: "i686", 40: "armv7l", 62: "x86_64", 183: "aarch64", 243: "riscv64"}
# Seconds for the child that imports onnxruntime: tens on a cold SD card or under emulation
IMPORT_TIMEOUT = 180
ONNXRUNTIME_FACTS = ("import json, onnxruntime; print(json.dumps({'version': onnxruntime.__version__, "
                     "'providers': list(onnxruntime.get_available_providers())}))")


def userland_machine(executable=None):
    """The machine the interpreter's own binary is built for (platform.machine() when it cannot be read)."""
    try:
        with open(executable or sys.executable, "rb") as handle:
            head = handle.read(20)
    except OSError:
        return platform.machine()
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return platform.machine()
    (number,) = struct.unpack("<H" if head[5] == 1 else ">H", head[18:20])
    return ELF_MACHINES.get(number, platform.machine())


def onnxruntime_facts():
    """(onnxruntime's version and providers or None, why it is unusable or None). Read in a child process
    unless this one has imported it already: a wheel built for a newer CPU dies of SIGILL or SIGSEGV
    on import, and that must not take the probe with it. Not installed is no error: the wheelhouse brings one."""
    module = sys.modules.get("onnxruntime")
    if module is not None:
        return {"version": module.__version__, "providers": list(module.get_available_providers())}, None
    try:
        done = subprocess.run([sys.executable, "-c", ONNXRUNTIME_FACTS], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=IMPORT_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None, "importing onnxruntime took longer than {} s".format(IMPORT_TIMEOUT)
    except OSError as exc:
        return None, "could not start {}: {}".format(sys.executable, exc)
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = "signal {}".format(-done.returncode)
        return None, "importing onnxruntime crashed the interpreter ({})".format(name)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        last = lines[-1] if lines else "exit status {}".format(done.returncode)
        if "No module named 'onnxruntime'" in last:
            return None, None
        return None, "importing onnxruntime failed: " + last
    try:
        return json.loads(done.stdout), None
    except ValueError:
        return None, "importing onnxruntime printed no facts: " + done.stdout.strip()[-200:]


def interpreter():
    """Facts about the Python running this probe and the onnxruntime it can import."""
    runtime, error = onnxruntime_facts()
    return {"machine": userland_machine(), "python": platform.python_version(), "onnxruntime": runtime,
            "onnxruntime_error": error}


def probe(root="/", disk=None):
    """The facts of the machine at `root` (this one when "/"); free disk measured under `disk`."""
    live = os.path.abspath(root) == "/"
    if live:
        runtime = interpreter()
    else:
        try:
            with open(os.path.join(root, INTERPRETER)) as handle:
                runtime = json.load(handle)
        except (OSError, ValueError):
            runtime = {"machine": None, "python": None, "onnxruntime": None}
    kernel = (_read(root, "arch") or "").strip() or None
    memory = _memory(_read(root, "meminfo"))
    cgroup = _cgroup_memory(root)
    if cgroup:  # in a container the limit, not the board's RAM, is what the kernel enforces
        memory["cgroup_limit_bytes"] = cgroup[0]
        available = memory["available_bytes"]
        memory["available_bytes"] = max(0, cgroup[1] if available is None else min(available, cgroup[1]))
    model = _device_tree(_read(root, "model"))
    disk_path = disk or root
    try:
        stat = os.statvfs(disk_path)
        free = stat.f_bavail * stat.f_frsize
    except OSError:
        free = None
    return {
        "probe_version": PROBE_VERSION,
        "machine": runtime.get("machine") or kernel,
        "kernel_machine": kernel,
        "model": model[0].strip() if model else None,
        "compatible": _device_tree(_read(root, "compatible")),
        "l4t": _l4t(_read(root, "tegra")),
        "cpu": _cpu(_read(root, "cpuinfo")),
        "memory": memory,
        "python": runtime.get("python"),
        "onnxruntime": runtime.get("onnxruntime"),
        "onnxruntime_error": runtime.get("onnxruntime_error"),
        "disk": {"path": disk_path, "free_bytes": free},
    }


def record(dest, root="/"):
    """Copy the files the probe reads (those present) under `dest`, and the interpreter facts."""
    for relative in [path for key in FILES for path in _paths(key)] + _cgroup_files(root):
        source = os.path.join(root, relative)
        if os.path.isfile(source):
            target = os.path.join(dest, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(source, "rb") as handle:
                data = handle.read()  # /proc files report size 0: copy what a read returns
            with open(target, "wb") as handle:
                handle.write(data)
    os.makedirs(os.path.join(dest, ".faq-probe"), exist_ok=True)
    with open(os.path.join(dest, INTERPRETER), "w") as handle:
        json.dump(interpreter(), handle, indent=2)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="faq-probe", description="Print this device's facts as JSON.")
    parser.add_argument("--root", default=os.environ.get(ROOT_ENV, "/"),
                        help="read a recorded board under this folder (default: $" + ROOT_ENV + " or /)")
    parser.add_argument("--disk", default=None, help="measure free disk under this path (default: the root)")
    parser.add_argument("--record", metavar="DIR", help="record this machine's files under DIR instead")
    args = parser.parse_args(argv)
    if args.record:
        record(args.record, args.root)
        print("recorded " + args.root + " under " + args.record)
        return 0
    print(json.dumps(probe(args.root, args.disk), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
