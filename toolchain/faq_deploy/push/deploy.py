"""The push protocol for one host, and the smaller commands on a device root.

lock → preflight (probe vs the manifest's needs, free disk) before any byte is sent → skip the
upload when the device already holds the bundle intact → resumable upload → sha256 on the device,
damaged files sent again → fsync + rename into bundles/ → runtime from the bundle's wheelhouse →
self-test → swap previous/current → health check, rolled back when it fails → gc → unlock.
Every failure before the swap leaves `current` as it was; a failed health check puts it back.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from faq_deploy.errors import (
    ConnectionFailed,
    DeviceMismatch,
    DiskFull,
    FaqDeployError,
    HealthCheckFailed,
    HostKeyError,
    SelfTestFailed,
    TransferFailed,
)
from faq_deploy.push import hostkeys, transfer
from faq_deploy.push.connection import connect, handshake, refuse, through_jumps
from faq_deploy.push.device import DEFAULT_ROOT, Device
from faq_deploy.push.sshconfig import HostConfig
from faq_runtime import compat
from faq_runtime.bundle import MANIFEST, Bundle

RESEND_ROUNDS = 2
# Free space kept beyond the bundle: file-system slack, deploy.log and state.json growth.
DISK_MARGIN = 32 << 20
# A runtime venv takes about 3x its wheels once unpacked (numpy, onnxruntime: measured 2.9x on x86).
VENV_PER_WHEEL_BYTE = 3


@dataclass(frozen=True)
class PushOptions:
    root: str = DEFAULT_ROOT
    python: str = "python3"          # the device's interpreter for the agent, probe and runtime venv
    runtime: str | None = None       # a faq-run already on the device, instead of the bundle's wheelhouse
    channels: int | None = None     # parallel SFTP channels; None: by the link's round trip
    stall: float = 30.0              # seconds without progress before the link counts as dead
    lock_wait: float = 600.0
    selftest_timeout: float = 300.0
    health_cmd: str | None = None    # run on the device after the switch, with $FAQ_BUNDLE set


@dataclass
class PushReport:
    host: str
    bundle: str
    result: str = "failed"
    sent_bytes: int = 0
    bundle_bytes: int = 0
    resumed_bytes: int = 0           # already on the device from an earlier, interrupted push
    reused_bytes: int = 0            # files another bundle on the device holds: linked there, not sent
    seconds: float = 0.0
    previous: str | None = None
    runtime: str | None = None
    selftest: dict[str, Any] = field(default_factory=dict)


Say = Callable[[str], None]


def owner() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"


def push(bundle: Bundle, host: HostConfig, options: PushOptions, say: Say = lambda s: None,
         on_bytes: Callable[[int, int], None] = lambda n, total: None) -> PushReport:
    """Deploy `bundle` to `host`; the report of what happened. Raises FaqDeployError on failure."""
    started = time.monotonic()
    report = PushReport(str(host.alias), bundle.id, bundle_bytes=_bundle_bytes(bundle))
    with connect(host) as connection:
        device = Device.connect(connection, options.root, options.python, options.stall)
        with device.locked(owner(), options.lock_wait, lambda holder: say(f"waiting for the lock ({holder})")):
            try:
                _deploy(bundle, device, options, report, say, on_bytes)
            except FaqDeployError as exc:
                _note(device, f"push {bundle.id} by {owner()} failed: {exc.cause}")
                raise
    report.seconds = round(time.monotonic() - started, 2)
    return report


def _deploy(bundle: Bundle, device: Device, options: PushOptions, report: PushReport, say: Say,
            on_bytes: Callable[[int, int], None]) -> None:
    state = device.op("state")
    report.previous = state["current"]
    wheels = options.runtime is None and any(f["path"].startswith("wheels/") for f in bundle.manifest["files"])
    runtime = options.runtime or (None if wheels else state["state"].get("runtimes", {}).get(state["current"]))
    if not wheels and not runtime:
        raise DeviceMismatch(f"{device.connection.host}: the bundle has no wheelhouse and no faq-runtime is "
                             f"installed under {device.root}",
                             "rebuild with `build --wheelhouse`, or name the device's faq-run with --runtime")
    say("preflight: probing the device")
    _preflight(bundle, device.probe(), wheels, str(device.connection.host))
    if not _already_there(bundle, device, state):
        _receive(bundle, device, options, state, wheels, report, say, on_bytes)
    if wheels:
        say("runtime: installing faq-runtime from the bundle's wheelhouse (once per version)")
        installed = device.op("install", bundle.id, timeout=options.selftest_timeout)
        if not installed.get("runtime"):
            raise SelfTestFailed(f"{device.connection.host}: the runtime did not install: {installed.get('reason')}",
                                 "check the device's Python against the bundle's target; `current` is unchanged")
        runtime = installed["runtime"]
    report.runtime = runtime
    say("self-test: loading the bundle and running a few tokens on the device")
    report.selftest = _selftest(device, runtime, device.path("bundles", bundle.id), options)
    if not report.selftest.get("ok"):
        raise SelfTestFailed(f"{device.connection.host}: bundle {bundle.id} failed its self-test: "
                             f"{report.selftest.get('error')}", "`current` still points at "
                             f"{state['current'] or 'nothing'}; see `faq-deploy logs HOST`")
    if state["current"] == bundle.id:
        report.result = "already current"
    else:
        device.op("swap", bundle.id, "--runtime", runtime)
        say(f"switched: current -> {bundle.id} (previous {state['current']})")
        problem = _health(device, runtime, options)
        if problem:
            device.op("rollback", "--reason", problem, "--restore", state["current"] or "-", state["previous"] or "-")
            raise HealthCheckFailed(f"{device.connection.host}: health check failed after the switch ({problem}); "
                                    f"rolled back, current -> {state['current'] or 'nothing'}",
                                    "see `faq-deploy logs HOST`; the new bundle stays on the device for inspection")
        report.result = "deployed"
    device.op("gc")
    _note(device, f"push {bundle.id} by {owner()}: {report.result}")


def _bundle_bytes(bundle: Bundle) -> int:
    return sum(f["size"] for f in bundle.manifest["files"]) + (bundle.root / MANIFEST).stat().st_size


def _preflight(bundle: Bundle, facts: dict[str, Any], wheels: bool, host: str) -> None:
    """Refuse before any byte is sent when the device cannot run the bundle. The device's own
    onnxruntime does not matter (the runtime comes from the wheelhouse or --runtime); its Python
    does only when the wheelhouse's venv will run on it."""
    needs = dict(bundle.manifest["target"].get("compatibility", {}))
    facts = {**facts, "onnxruntime": None}
    if not wheels:
        needs.pop("wheels_python", None)
        facts["python"] = None
    problems = compat.check(needs, facts)
    if problems:
        raise DeviceMismatch(f"{host} cannot run bundle {bundle.id} (target "
                             f"{bundle.manifest['target'].get('name')}): " + "; ".join(map(str, problems)),
                             problems[0].fix)


def _already_there(bundle: Bundle, device: Device, state: dict[str, Any]) -> bool:
    if bundle.id not in state["bundles"]:
        return False
    found = device.op("verify", bundle.id, timeout=device.timeout * 10)
    return found.get("intact", False)


def _receive(bundle: Bundle, device: Device, options: PushOptions, state: dict[str, Any], wheels: bool,
             report: PushReport, say: Say, on_bytes: Callable[[int, int], None]) -> None:
    """Check free disk, stage (linking in the files other bundles on the device hold), upload what is
    missing, then commit; damaged files are sent again."""
    manifest = (bundle.root / MANIFEST).read_bytes()
    sizes = {f["path"]: f["size"] for f in bundle.manifest["files"]}
    staging = device.path("staging", bundle.id)
    # Disk first, from what `state` saw staged: nothing is written to a device that cannot hold the bundle.
    held = {path.removesuffix(transfer.PART): size for path, size in state["staging"].get(bundle.id, {}).items()}
    report.resumed_bytes = sum(min(held.get(p, 0), size) for p, size in sizes.items())
    _check_disk(bundle, device, sum(sizes.values()) - report.resumed_bytes, wheels, state)
    if report.resumed_bytes:
        say(f"resuming: {report.resumed_bytes:,} bytes already on the device")
    for _ in range(RESEND_ROUNDS + 1):
        # the device hashes each held file it reuses, so the stage may take as long as the commit
        answer = device.op("stage", bundle.id, stdin=manifest, timeout=options.selftest_timeout)
        staged, reused = answer["staged"], sum(answer["reused"].values())
        if reused:
            report.reused_bytes += reused
            say(f"reusing {reused:,} bytes that other bundles on the device hold")
        pieces = [transfer.Piece(p, size, staged.get(p, 0)) for p, size in sizes.items() if staged.get(p, 0) < size]
        remaining = sum(p.size - p.offset for p in pieces)
        channels = options.channels or transfer.channels_for(device.connection.rtt(options.stall))
        try:
            report.sent_bytes += transfer.upload(device.connection, bundle.root, staging, pieces,
                                                 channels=channels, stall=options.stall,
                                                 on_bytes=lambda n, total=remaining: on_bytes(n, total))
        except ConnectionFailed:
            _explain_full_disk(device, remaining)
            raise
        say("verifying: sha256 of every file on the device")
        committed = device.op("commit", bundle.id, timeout=options.selftest_timeout)
        if committed["committed"]:
            return
        say(f"checksum mismatch, sending again: {', '.join(committed['bad'])}")
    raise TransferFailed(f"{device.connection.host}: {', '.join(committed['bad'])} arrived damaged "
                         f"{RESEND_ROUNDS + 1} times", "check the device's storage (dmesg) and the link")


def _check_disk(bundle: Bundle, device: Device, remaining: int, wheels: bool, state: dict[str, Any]) -> None:
    wheel_bytes = sum(f["size"] for f in bundle.manifest["files"] if f["path"].startswith("wheels/"))
    venv = VENV_PER_WHEEL_BYTE * wheel_bytes if wheels and not state["runtimes"] else 0
    need = remaining + venv + DISK_MARGIN
    free = state["free_bytes"]
    if free is not None and free < need:
        reclaim = sum(size for b, size in state["bundles"].items() if b not in (state["current"], state["previous"]))
        raise DiskFull(f"{device.connection.host}: {_mb(need)} needed under {device.root} ({_mb(remaining)} to "
                       f"send, {_mb(venv)} runtime, {_mb(DISK_MARGIN)} margin), {_mb(free)} free",
                       f"free {_mb(need - free)} on the device" +
                       (f"; `faq-deploy gc HOST` reclaims {_mb(reclaim)}" if reclaim else ""))


def _explain_full_disk(device: Device, remaining: int) -> None:
    """A write that failed on a live link is the device's disk (SFTP says only "Failure"). The link
    may be dead before paramiko notices (is_active() still true): then the upload's failure stands."""
    if not device.connection.transport.is_active():
        return
    try:
        free = device.op("state")["free_bytes"]
    except ConnectionFailed:
        return
    if free is not None and free < 1 << 20:
        raise DiskFull(f"{device.connection.host}: the device's disk filled up during the upload "
                       f"({_mb(free)} free under {device.root}, {_mb(remaining)} were still to send)",
                       "free space on the device, then re-run: the bytes already sent are kept")


def _selftest(device: Device, runtime: str, bundle_path: str, options: PushOptions) -> dict[str, Any]:
    # --no-hashes: the agent's commit (or verify) has just hashed every file; reading a 200 MB bundle
    # twice more per push is what slow eMMC boards notice.
    done = device.connection.run([runtime, "selftest", bundle_path, "--json", "--no-hashes"],
                                 timeout=options.selftest_timeout)
    lines = done.out.strip().splitlines()
    try:
        facts = json.loads(lines[-1])
    except (IndexError, ValueError):
        facts = {"ok": False, "error": (done.err or done.out).strip()[-400:] or f"exit {done.code}"}
    if done.code != 0:
        facts["ok"] = False
    return facts


def _health(device: Device, runtime: str, options: PushOptions) -> str | None:
    """Why the device is unhealthy on `current`, or None: the self-test through the link, then the
    user's own check (e.g. restarting a service and asking its /healthz)."""
    facts = _selftest(device, runtime, device.path("current"), options)
    if not facts.get("ok"):
        return f"self-test through `current`: {facts.get('error')}"
    if options.health_cmd:
        done = device.connection.run(["env", f"FAQ_BUNDLE={device.path('current')}", "sh", "-c", options.health_cmd],
                                     timeout=options.selftest_timeout)
        if done.code != 0:
            return f"`{options.health_cmd}` exited {done.code}: {(done.err or done.out).strip()[-200:]}"
    return None


def _note(device: Device, text: str) -> None:
    """Best effort: a log line must not hide the failure being reported."""
    try:
        device.op("log", text)
    except FaqDeployError:
        pass


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def status(host: HostConfig, options: PushOptions) -> dict[str, Any]:
    with connect(host) as connection:
        device = Device.connect(connection, options.root, options.python, options.stall)
        return {"host": host.alias, "root": device.root, **device.op("state")}


def rollback(host: HostConfig, options: PushOptions, say: Say = lambda s: None) -> dict[str, Any]:
    with connect(host) as connection:
        device = Device.connect(connection, options.root, options.python, options.stall)
        with device.locked(owner(), options.lock_wait, lambda holder: say(f"waiting for the lock ({holder})")):
            return device.op("rollback", "--reason", f"asked by {owner()}")


def gc(host: HostConfig, options: PushOptions, say: Say = lambda s: None) -> dict[str, Any]:
    with connect(host) as connection:
        device = Device.connect(connection, options.root, options.python, options.stall)
        with device.locked(owner(), options.lock_wait, lambda holder: say(f"waiting for the lock ({holder})")):
            return device.op("gc")


def logs(host: HostConfig, options: PushOptions, lines: int) -> str:
    with connect(host) as connection:
        return Device.connect(connection, options.root, options.python, options.stall).text("logs", "-n", str(lines))


def trust(host: HostConfig, confirm: Callable[[str], bool], expected: str | None = None) -> str:
    """Record the key `host` presents in its known_hosts after the user confirms the fingerprint
    (or it equals `expected`); the recorded file. A changed or revoked key is refused, never replaced."""
    sock, opened = through_jumps(host)
    transport, key, verdict, entry = handshake(host, sock)
    try:
        if verdict is hostkeys.Verdict.TRUSTED:
            return f"{host.key_name} is already trusted ({entry.source})"
        if verdict is not hostkeys.Verdict.UNKNOWN:
            refuse(host, key, verdict, entry)
        shown = hostkeys.fingerprint(key)
        if expected is not None and expected != shown:
            raise HostKeyError(f"{host.key_name} presents {shown}, not the expected {expected}",
                               "check the fingerprint on the device: ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub")
        if expected is None and not confirm(f"{host.key_name} presents {key.get_name()} {shown}"):
            raise HostKeyError(f"{host.key_name}: not trusted (not confirmed)", "run trust again to confirm")
        hostkeys.record(host.known_hosts[0], host.key_name, key)
        return f"{host.key_name} {key.get_name()} {shown} recorded in {host.known_hosts[0]}"
    finally:
        for link in [transport, *reversed(opened)]:
            link.close()
