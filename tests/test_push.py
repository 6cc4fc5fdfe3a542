"""`faq-deploy push` and friends against a real OpenSSH server on 127.0.0.1 (tests/sshd.py).

Each test gets its own device root on the session's sshd and real bundles of the default model;
faults come from a TCP proxy (dropped and frozen links), a small tmpfs (full disks), damaged files
on the device, recorded boards (wrong architecture, wrong JetPack) and wrong host keys.
After every failure `current` must still point where it did.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from commands import FAQ_DEPLOY
from sshd import MAX_SESSIONS, FaultProxy, Sshd

from faq_deploy import bundle
from faq_deploy.errors import ConnectionFailed, DiskFull
from faq_deploy.push import deploy, inventory, sshconfig
from faq_deploy.push.connection import connect
from faq_deploy.push.device import Device
from faq_runtime.bundle import MANIFEST

BOARDS = Path(__file__).parent / "fixtures" / "boards"
RUNTIME = str(Path(sys.executable).parent / "faq-run")  # the device is this machine: its faq-run


def variant(source: Path, out: Path, note: str, *, wheels: bool = False, target: dict | None = None,
            break_model: bool = False) -> Path:
    """Another bundle of the same model: a different REPORT (so a different id), optionally without
    wheels, claiming another target's needs, or with a model that cannot load."""
    manifest = json.loads((source / MANIFEST).read_text())
    sections = {k: manifest[k] for k in ("source", "quantization", "export", "target", "memory", "evaluation")}
    if target:
        sections["target"] = {**sections["target"], "compatibility": target}
    model = source / "model"
    if break_model:
        model = shutil.copytree(model, out.with_name(out.name + "-model"))
        (model / "model.onnx").write_bytes(b"not an onnx graph")
    bundle.write(out, model, sections, note, source / "wheels" if wheels else None)
    return out


@pytest.fixture(scope="module")
def bundles(x86_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bundles")
    orin = {"machine": "aarch64", "isa_tier": "armv8.2_2", "l4t_major": 36, "python_min": "3.8",
            "onnxruntime_min": "1.23.0", "wheels_python": None, "memory_bytes": 600_000_000}
    return {"wheels": x86_bundle, "a": variant(x86_bundle, folder / "a", "a"),
            "b": variant(x86_bundle, folder / "b", "b"),
            "broken": variant(x86_bundle, folder / "broken", "broken", break_model=True),
            "orin": variant(x86_bundle, folder / "orin", "orin", target=orin)}


@dataclass
class Box:
    """One test device: a root served by the session's sshd, and an SSH config that names it."""

    config: Path
    root: Path
    known_hosts: Path
    alias: str = "device"

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        command, *rest = args
        return subprocess.run([*FAQ_DEPLOY, command, *rest, "--ssh-config", str(self.config), "--root", str(self.root)],
                              capture_output=True, text=True, timeout=timeout)

    def push(self, source: Path, *extra: str, alias: str | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run("push", str(source), alias or self.alias, "--runtime", RUNTIME, "--json", *extra,
                        timeout=timeout)

    def link(self, name: str) -> str | None:
        path = self.root / name
        return os.path.basename(os.readlink(path)) if path.is_symlink() else None


def ssh_config(sshd: Sshd, folder: Path, key: Path, port: int | None = None, alias: str = "device",
               extra: str = "") -> tuple[Path, Path]:
    known = folder / "known_hosts"
    known.write_text(sshd.host_key_line() + "\n" + (sshd.host_key_line(port) + "\n" if port else ""))
    config = folder / "ssh_config"
    with config.open("a") as handle:
        handle.write(f"Host {alias}\n  HostName 127.0.0.1\n  Port {port or sshd.port}\n  User {sshd.user}\n"
                     f"  IdentityFile {key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known}\n{extra}\n")
    return config, known


@pytest.fixture(scope="module")
def login_key(sshd: Sshd) -> Path:
    return sshd.authorize("deployer")


@pytest.fixture
def box(sshd: Sshd, login_key: Path, tmp_path: Path) -> Box:
    config, known = ssh_config(sshd, tmp_path, login_key)
    return Box(config, tmp_path / "root", known)


def id_of(path: Path) -> str:
    return json.loads((path / MANIFEST).read_text())["bundle_id"]


def answer(done: subprocess.CompletedProcess[str]) -> dict:
    assert done.stdout, done.stderr
    return json.loads(done.stdout)


# --- the happy paths ----------------------------------------------------------------------------------


def test_first_push_installs_the_runtime_from_the_wheelhouse_then_a_repush_sends_nothing(box: Box,
                                                                                            bundles: dict) -> None:
    done = box.run("push", str(bundles["wheels"]), "device", "--json")
    assert done.returncode == 0, done.stderr
    report = answer(done)
    assert report["result"] == "deployed" and report["previous"] is None
    assert report["sent_bytes"] == report["bundle_bytes"] - (bundles["wheels"] / MANIFEST).stat().st_size
    assert report["runtime"].startswith(str(box.root / "runtime" / "faq-runtime-"))
    assert report["selftest"]["ok"] and report["selftest"]["tokens"] == 8
    assert box.link("current") == id_of(bundles["wheels"])
    again = answer(box.run("push", str(bundles["wheels"]), "device", "--json"))
    assert again["result"] == "already current" and again["sent_bytes"] == 0
    status = answer(box.run("status", "device", "--json"))
    assert status["current"] == id_of(bundles["wheels"]) and status["locked_by"] is None and not status["staging"]
    log = box.run("logs", "device").stdout
    assert "installed from bundle" in log and "received and verified" in log and "already current" in log


def shared_files(first: Path, second: Path) -> dict[str, int]:
    """The files of bundle `second` that bundle `first` holds with the same bytes: path → size."""
    held = {(f["size"], f["sha256"]) for f in json.loads((first / MANIFEST).read_text())["files"]}
    files = json.loads((second / MANIFEST).read_text())["files"]
    return {f["path"]: f["size"] for f in files if (f["size"], f["sha256"]) in held}


def test_second_bundle_keeps_the_first_as_previous_rollback_swaps_and_gc_keeps_both(box: Box, bundles: dict) -> None:
    a, b = id_of(bundles["a"]), id_of(bundles["b"])
    assert box.push(bundles["a"]).returncode == 0
    done = box.push(bundles["b"])
    assert done.returncode == 0, done.stderr
    assert (box.link("current"), box.link("previous")) == (b, a)
    # b is the same model with another report: only what differs travels, the rest is linked from a
    shared, report = shared_files(bundles["a"], bundles["b"]), answer(done)
    assert "model/model.onnx.data" in shared and report["reused_bytes"] == sum(shared.values())
    manifest_bytes = (bundles["b"] / MANIFEST).stat().st_size  # sent by the stage, not counted
    assert report["sent_bytes"] == report["bundle_bytes"] - sum(shared.values()) - manifest_bytes
    data = [box.root / "bundles" / x / "model" / "model.onnx.data" for x in (a, b)]
    assert os.stat(data[0]).st_ino == os.stat(data[1]).st_ino
    back = box.run("rollback", "device", "--json")
    assert back.returncode == 0 and answer(back) == {"host": "device", "current": a, "previous": b}
    assert (box.link("current"), box.link("previous")) == (a, b)
    assert answer(box.run("gc", "device", "--json"))["removed"] == []
    assert sorted(os.listdir(box.root / "bundles")) == sorted([a, b])
    state = json.loads((box.root / "state.json").read_text())
    assert [e["event"] for e in state["history"]] == ["deploy", "deploy", "rollback"]


def test_a_damaged_file_of_another_bundle_is_sent_not_reused(box: Box, bundles: dict) -> None:
    assert box.push(bundles["a"]).returncode == 0
    damaged = box.root / "bundles" / id_of(bundles["a"]) / "model" / "genai_config.json"
    damaged.write_bytes(damaged.read_bytes().replace(b"{", b"[", 1))
    done = box.push(bundles["b"])
    assert done.returncode == 0, done.stderr
    shared, report = shared_files(bundles["a"], bundles["b"]), answer(done)
    assert report["reused_bytes"] == sum(shared.values()) - shared["model/genai_config.json"]
    received = box.root / "bundles" / id_of(bundles["b"]) / "model" / "genai_config.json"
    assert received.read_bytes() == (bundles["b"] / "model" / "genai_config.json").read_bytes()


# --- links that fail --------------------------------------------------------------------------------


@pytest.fixture
def proxy(sshd: Sshd) -> FaultProxy:
    relay = FaultProxy(sshd.port)
    yield relay
    relay.close()


@pytest.fixture
def proxied(sshd: Sshd, login_key: Path, proxy: FaultProxy, tmp_path: Path) -> Box:
    config, known = ssh_config(sshd, tmp_path, login_key, port=proxy.port)
    return Box(config, tmp_path / "root", known)


def staged_bytes(box: Box, bundle_id: str) -> int:
    return sum(p.stat().st_size for p in (box.root / "staging" / bundle_id).rglob("*.part"))


def test_a_dropped_link_fails_cleanly_and_the_rerun_sends_only_the_remainder(proxied: Box, proxy: FaultProxy,
                                                                            bundles: dict) -> None:
    """On an empty device: a bundle already there would lend b its files (they are a's too), and
    keeping `current` through a failure before the swap is the self-test test's."""
    proxy.drop_after = 60_000_000
    cut = proxied.push(bundles["b"])
    assert cut.returncode == 14, cut.stderr
    assert "link lost at about" in cut.stderr and "resumes" in cut.stderr
    assert proxied.link("current") is None and not (proxied.root / "bundles" / id_of(bundles["b"])).exists()
    kept = staged_bytes(proxied, id_of(bundles["b"]))
    assert 0 < kept < 60_000_000
    resumed = answer(proxied.push(bundles["b"]))
    assert resumed["result"] == "deployed" and resumed["resumed_bytes"] > 0
    assert resumed["sent_bytes"] == resumed["bundle_bytes"] - (bundles["b"] / MANIFEST).stat().st_size - \
        resumed["resumed_bytes"]
    assert proxied.link("current") == id_of(bundles["b"])


def test_a_stalled_link_ends_in_a_timeout_not_a_hang(proxied: Box, proxy: FaultProxy, bundles: dict) -> None:
    proxy.stall_after = 20_000_000
    done = proxied.push(bundles["a"], "--timeout", "3", timeout=120)
    assert done.returncode == 14, done.stderr
    assert "no progress for 3 s" in done.stderr
    assert proxied.link("current") is None


def test_a_link_that_dies_under_the_lock_reports_the_failure_not_an_error_from_closing(box: Box) -> None:
    """paramiko raises EOFError when a channel is closed on a socket that is gone before its reader
    thread noticed: releasing the lock must not put that in place of the failure being reported."""
    with connect(sshconfig.resolve(box.alias, sshconfig.load(box.config))) as connection:
        device = Device.connect(connection, str(box.root))
        with pytest.raises(ConnectionFailed), device.locked("test", 1.0, lambda holder: None):
            connection.transport.sock.shutdown(socket.SHUT_WR)
            device.op("state")


def test_a_link_found_dead_after_an_upload_failed_keeps_that_failure(box: Box) -> None:
    """After a failed upload the deployer asks the device whether its disk filled; on a link that is
    dead before paramiko noticed, that question must not put "cannot open a channel" in place of the
    upload's "link lost at …, re-run to resume" (seen once in CI). Made deterministic: with sshd's
    MaxSessions taken, the question's channel is refused while the transport is still active."""
    with connect(sshconfig.resolve(box.alias, sshconfig.load(box.config))) as connection:
        device = Device.connect(connection, str(box.root))
        held = [connection.open_channel() for _ in range(MAX_SESSIONS)]
        with pytest.raises(ConnectionFailed, match="cannot open a channel"):
            connection.open_channel()
        assert connection.transport.is_active()
        deploy._explain_full_disk(device, 1)  # returns: the upload's own failure will be raised
        assert all(channel.active for channel in held)


def test_a_corrupted_staged_file_is_detected_deleted_and_sent_again(box: Box, bundles: dict) -> None:
    """An earlier upload left every part complete, but one was damaged on the device's storage."""
    source, bundle_id = bundles["a"], id_of(bundles["a"])
    staging = box.root / "staging" / bundle_id
    for record in json.loads((source / MANIFEST).read_text())["files"]:
        part = staging / (record["path"] + ".part")
        part.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / record["path"], part)
    damaged = staging / "model" / "genai_config.json.part"
    damaged.write_bytes(damaged.read_bytes().replace(b"{", b"[", 1))
    done = box.push(source)
    assert done.returncode == 0, done.stderr
    report = answer(done)
    assert report["sent_bytes"] == (source / "model" / "genai_config.json").stat().st_size
    assert "sending again: model/genai_config.json" in done.stderr
    assert "failed the checksum" in box.run("logs", "device").stdout
    assert box.link("current") == bundle_id


# --- devices that cannot take the bundle ----------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    mount = tmp_path / "small"
    mount.mkdir()
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=False)  # the device side may still be closing files


def mount_tmpfs(path: Path, megabytes: int) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], check=True)


def test_a_disk_too_small_is_refused_before_any_byte_is_sent(box: Box, small_disk: Path, bundles: dict) -> None:
    mount_tmpfs(small_disk, 100)
    box.root = small_disk / "root"
    done = box.push(bundles["a"])
    assert done.returncode == 17, done.stderr
    assert "needed under" in done.stderr and "MB free" in done.stderr
    assert staged_bytes(box, id_of(bundles["a"])) == 0


def test_a_disk_that_fills_during_the_upload_is_explained_and_the_rerun_completes(
        box: Box, small_disk: Path, bundles: dict) -> None:
    mount_tmpfs(small_disk, 260)
    root = small_disk / "root"
    host = sshconfig.resolve("device", sshconfig.load(box.config))
    options = deploy.PushOptions(root=str(root), runtime=RUNTIME, stall=10)
    filler = small_disk / "filler"
    sent = [0]

    def fill_when_half_sent(n: int, total: int) -> None:
        sent[0] += n
        if sent[0] > 40_000_000 and not filler.exists():
            free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            with filler.open("wb") as handle:
                handle.truncate(0)
                handle.write(b"\0" * (free - 4096))

    source = bundle.verify(bundles["a"])
    with pytest.raises(DiskFull, match="filled up during the upload"):
        deploy.push(source, host, options, on_bytes=fill_when_half_sent)
    assert not (root / "current").exists()
    filler.unlink()
    report = deploy.push(source, host, options)
    assert report.result == "deployed" and report.resumed_bytes > 0


def test_wrong_architecture_and_wrong_jetpack_are_refused_before_upload(sshd: Sshd, tmp_path: Path,
                                                                        bundles: dict) -> None:
    pi = sshd.authorize("pi5", BOARDS / "raspberry-pi-5")
    xavier = sshd.authorize("xavier", BOARDS / "xavier-nx-jp5")
    config, _ = ssh_config(sshd, tmp_path, pi, alias="pi")
    ssh_config(sshd, tmp_path, xavier, alias="xavier")
    box = Box(config, tmp_path / "root", tmp_path / "known_hosts")
    arm = box.push(bundles["a"], alias="pi")
    assert arm.returncode == 16, arm.stderr
    assert "architecture: needs x86_64, device has aarch64" in arm.stderr
    jetpack = box.push(bundles["orin"], alias="xavier")
    assert jetpack.returncode == 16, jetpack.stderr
    assert "JetPack line: needs L4T R36, device has L4T R35" in jetpack.stderr
    assert not (box.root / "staging").exists() or not any((box.root / "staging").iterdir())


# --- trust -----------------------------------------------------------------------------------------------


def test_unknown_changed_and_revoked_host_keys_are_refused_and_trust_records_a_confirmed_key(
        box: Box, sshd: Sshd, tmp_path: Path) -> None:
    box.known_hosts.write_text("@cert-authority *.example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBYZ\n")
    unknown = box.run("status", "device")
    assert unknown.returncode == 13 and "is not in known_hosts" in unknown.stderr
    fingerprint = subprocess.run(["ssh-keygen", "-lf", str(sshd.host_key) + ".pub"], capture_output=True,
                                 text=True).stdout.split()[1]
    assert fingerprint in unknown.stderr and "faq-deploy trust device" in unknown.stderr
    trust = [*FAQ_DEPLOY, "trust", "device", "--ssh-config", str(box.config)]
    wrong = subprocess.run([*trust, "--fingerprint", "SHA256:wrong"], capture_output=True, text=True)
    assert wrong.returncode == 13 and "not the expected" in wrong.stderr
    unconfirmed = subprocess.run(trust, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert unconfirmed.returncode == 13 and "--yes" in unconfirmed.stderr
    assert subprocess.run([*trust, "--fingerprint", fingerprint], capture_output=True, text=True).returncode == 0
    assert box.run("status", "device").returncode == 0

    other = (Path(str(sshd.host_key)).parent / "deployer.pub").read_text().split()[:2]  # any other ed25519 key
    box.known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    changed = box.run("status", "device")
    assert changed.returncode == 13 and "holds another key" in changed.stderr and "ssh-keygen -R" in changed.stderr
    assert subprocess.run([*trust, "--yes"], capture_output=True, text=True).returncode == 13

    key = " ".join(sshd.host_key_line().split()[1:])
    box.known_hosts.write_text(f"{sshd.host_key_line()}\n@revoked * {key}\n")
    revoked = box.run("status", "device")
    assert revoked.returncode == 13 and "revoked at" in revoked.stderr


def test_a_key_the_device_does_not_accept_fails_authentication(sshd: Sshd, tmp_path: Path) -> None:
    from sshd import keygen
    stranger = keygen(tmp_path / "stranger")
    config, _ = ssh_config(sshd, tmp_path, stranger)
    done = subprocess.run([*FAQ_DEPLOY, "status", "device", "--ssh-config", str(config)], capture_output=True,
                          text=True)
    assert done.returncode == 15 and "accepted none of" in done.stderr


# --- a bundle that does not work -----------------------------------------------------------------------


def test_a_failing_self_test_leaves_current_on_the_previous_bundle(box: Box, bundles: dict) -> None:
    assert box.push(bundles["a"]).returncode == 0
    done = box.push(bundles["broken"])
    assert done.returncode == 19, done.stderr
    assert "failed its self-test" in done.stderr and f"still points at {id_of(bundles['a'])}" in done.stderr
    assert box.link("current") == id_of(bundles["a"])


def test_a_failing_health_check_rolls_back(box: Box, bundles: dict) -> None:
    assert box.push(bundles["a"]).returncode == 0
    done = box.push(bundles["b"], "--health-cmd", 'test "$(basename $(readlink -f $FAQ_BUNDLE))" = nope')
    assert done.returncode == 20, done.stderr
    assert f"rolled back, current -> {id_of(bundles['a'])}" in done.stderr
    assert (box.link("current"), box.link("previous")) == (id_of(bundles["a"]), None)
    assert "rollback: current ->" in box.run("logs", "device").stdout


# --- many pushes, many hosts -------------------------------------------------------------------------------


def test_concurrent_pushes_to_one_device_are_serialised_by_its_lock(box: Box, bundles: dict) -> None:
    results = {}

    def push(name: str) -> None:
        results[name] = box.push(bundles[name])

    threads = [threading.Thread(target=push, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(done.returncode == 0 for done in results.values()), {k: v.stderr for k, v in results.items()}
    assert any("waiting for the lock" in done.stderr for done in results.values())
    log = [line.split(" ", 1)[1] for line in (box.root / "deploy.log").read_text().splitlines()]
    pushes = [line for line in log if line.startswith(("bundle ", "push "))]
    # each push's "received" line is followed by its own "push ... deployed" line: no interleaving
    for received, finished in zip(pushes[::2], pushes[1::2], strict=True):
        assert received.split()[1] == finished.split()[1]
    assert {box.link("current"), box.link("previous")} == {id_of(bundles["a"]), id_of(bundles["b"])}


def test_a_fleet_from_an_inventory_reports_each_host_and_fails_for_the_bad_one(sshd: Sshd, login_key: Path,
                                                                               tmp_path: Path, bundles: dict) -> None:
    pi = sshd.authorize("fleet-pi", BOARDS / "raspberry-pi-5")
    known = tmp_path / "known_hosts"
    known.write_text(sshd.host_key_line() + "\n")
    config = tmp_path / "ssh_config"
    config.write_text(f"Host *\n  IdentityFile {login_key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known}\n")
    hosts = tmp_path / "hosts.ini"
    hosts.write_text(f"""
[edge]
box1 faq_deploy_root={tmp_path / 'r1'}
box2 faq_deploy_root={tmp_path / 'r2'}
pi ansible_ssh_private_key_file={pi} faq_deploy_root={tmp_path / 'r3'}

[edge:vars]
ansible_host=127.0.0.1
ansible_port={sshd.port}
ansible_user={sshd.user}
""")
    done = subprocess.run([*FAQ_DEPLOY, "push", str(bundles["a"]), "--hosts", str(hosts), "--ssh-config",
                           str(config), "--runtime", RUNTIME], capture_output=True, text=True, timeout=600)
    assert done.returncode == 16, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    assert "deployed" in rows["box1"] and "deployed" in rows["box2"] and "FAILED (16)" in rows["pi"]
    assert "1 of 3 host(s) failed (pi)" in done.stderr
    for root in ("r1", "r2"):
        assert os.readlink(tmp_path / root / "current").endswith(id_of(bundles["a"]))
    assert not (tmp_path / "r3" / "current").exists()


# --- reaching the device ------------------------------------------------------------------------------------


def test_include_proxyjump_and_the_ssh_agent_reach_the_device(sshd: Sshd, login_key: Path, tmp_path: Path) -> None:
    config, known = ssh_config(sshd, tmp_path, login_key, alias="jump")
    included = tmp_path / "conf.d" / "devices.conf"
    included.parent.mkdir()
    # the device is reached through the jump host, with no identity file: the key comes from the agent
    included.write_text(f"Host behind\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
                        f"  ProxyJump jump\n  UserKnownHostsFile {known}\n")
    main = tmp_path / "config"
    main.write_text(f"Include {included.parent}/*.conf\n" + config.read_text())
    agent = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True).stdout
    env = dict(os.environ, HOME=str(tmp_path))
    for part in agent.split(";"):
        if "=" in part and part.strip().startswith("SSH_"):
            key, value = part.strip().split("=", 1)
            env[key] = value
    try:
        subprocess.run(["ssh-add", str(login_key)], env=env, check=True, capture_output=True)
        host = sshconfig.resolve("behind", sshconfig.load(main))
        assert host.jumps and host.jumps[0].alias == "jump" and not host.identity_files
        done = subprocess.run([*FAQ_DEPLOY, "status", "behind", "--ssh-config", str(main), "--root",
                               str(tmp_path / "root"), "--json"], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["root"] == str(tmp_path / "root")
    finally:
        subprocess.run(["ssh-agent", "-k"], env=env, capture_output=True)


def test_host_specs_and_inventory_variables_resolve() -> None:
    assert sshconfig.split_spec("ubuntu@10.0.0.5:2222") == ("ubuntu", "10.0.0.5", 2222)
    assert sshconfig.split_spec("ssh://pi@[fe80::1]:22") == ("pi", "fe80::1", 22)
    assert sshconfig.split_spec("orin") == (None, "orin", None)
    with pytest.raises(Exception, match="port 'x'"):
        sshconfig.split_spec("a@b:x")


def test_ansible_inventory_groups_children_and_variable_precedence(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("""
loose ansible_host=10.0.0.9
[jetsons]
nano1 ansible_host=10.0.0.1 ansible_user=override
nano2 ansible_host=10.0.0.2
[pis]
pi1 ansible_host=10.0.1.1 ansible_python_interpreter=/usr/bin/python3.11
[edge:children]
jetsons
pis
[jetsons:vars]
ansible_user=nvidia
[edge:vars]
ansible_user=edge
faq_deploy_root=/opt/faq-deploy
[all:vars]
ansible_port=2222
""")
    found = {h.name: h.settings for h in inventory.read(hosts)}
    assert list(found) == ["loose", "nano1", "nano2", "pi1"]
    assert found["nano1"]["user"] == "override" and found["nano2"]["user"] == "nvidia"
    assert found["pi1"] == {"hostname": "10.0.1.1", "python": "/usr/bin/python3.11", "user": "edge",
                            "root": "/opt/faq-deploy", "port": "2222"}
    assert [h.name for h in inventory.read(hosts, "jetsons")] == ["nano1", "nano2"]
    with pytest.raises(Exception, match="no group 'x'"):
        inventory.read(hosts, "x")


def test_inventory_variables_come_from_every_ancestor_group_the_nearest_winning(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("""
[site:children]
lab
[lab:children]
bench
[bench]
orin1 ansible_host=10.0.2.1
[site:vars]
ansible_user=site
faq_deploy_root=/srv/site
ansible_port=2200
[lab:vars]
ansible_user=lab
[bench:vars]
ansible_port=2201
""")
    (orin,) = inventory.read(hosts, "site")
    assert orin.settings == {"hostname": "10.0.2.1", "user": "lab", "root": "/srv/site", "port": "2201"}
