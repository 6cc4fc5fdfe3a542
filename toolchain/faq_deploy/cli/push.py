"""`faq-deploy push | status | rollback | gc | logs | trust`: bundles onto devices over SSH."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import wraps
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from faq_deploy import bundle
from faq_deploy.cli.options import json_option, table
from faq_deploy.errors import HostKeyError
from faq_deploy.push import deploy, fleet, sshconfig
from faq_deploy.push.deploy import PushOptions
from faq_deploy.push.device import DEFAULT_ROOT
from faq_deploy.push.fleet import Destination, Outcome


def device_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Where the devices are and how to reach them: shared by every command of this module."""
    options = [
        click.argument("hosts", nargs=-1),
        click.option("--hosts", "hosts_file", type=click.Path(path_type=Path, dir_okay=False),
                     help="Ansible-style INI inventory of hosts (ansible_host, ansible_port, ansible_user, "
                          "ansible_ssh_private_key_file, ansible_python_interpreter, faq_deploy_root)."),
        click.option("--group", default=None, help="Only this inventory group (and its children)."),
        click.option("--ssh-config", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="SSH config to read host aliases from (Include and ProxyJump resolved) "
                          "[default: ~/.ssh/config]."),
        click.option("--root", default=DEFAULT_ROOT, show_default=True, help="Device root folder on the device."),
        click.option("--python", default="python3", show_default=True, help="The device's Python interpreter."),
        click.option("--timeout", type=float, default=30.0, show_default=True,
                     help="Seconds without progress before the link counts as dead."),
        click.option("--parallel", type=int, default=8, show_default=True, help="Hosts worked on at once."),
    ]
    for option in reversed(options):
        command = option(command)

    @wraps(command)
    def wrapper(hosts: tuple[str, ...], hosts_file: Path | None, group: str | None, ssh_config: Path | None,
                root: str, python: str, timeout: float, parallel: int, **kwargs: Any) -> Any:
        base = PushOptions(root=root, python=python, stall=timeout)
        targets = fleet.destinations(hosts, hosts_file, group, ssh_config, base)
        return command(targets=targets, parallel=parallel, **kwargs)

    return wrapper


def _say(name: str, many: bool) -> Callable[[str], None]:
    return lambda text: click.echo(f"[{name}] {text}" if many else text, err=True)


def _finish(outcomes: list[Outcome], rows: list[dict[str, Any]], columns: list[str], as_json: bool,
            data: list[Any]) -> None:
    """Print the results (a table, or JSON), then fail with the right exit code if any host failed."""
    if as_json:
        click.echo(json.dumps(data if len(data) > 1 else data[0], indent=2, default=str))
    elif len(outcomes) > 1 or outcomes[0].error is None:
        click.echo(table(rows, columns))
    if error := fleet.verdict(outcomes):
        raise error


@click.command("push")
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(path_type=Path, file_okay=False))
@device_options
@click.option("--runtime", default=None,
              help="A faq-run already installed on the device, used instead of the bundle's wheelhouse.")
@click.option("--channels", type=click.IntRange(1, 16), default=None,
              help="Parallel SFTP channels per host [default: 1, or 4 when the round trip exceeds 50 ms].")
@click.option("--lock-wait", type=float, default=600.0, show_default=True,
              help="Seconds to wait for another push to the same device to finish.")
@click.option("--health-cmd", default=None,
              help="Shell command run on the device after the switch ($FAQ_BUNDLE is the current bundle); "
                   "a non-zero exit rolls back.")
@json_option
def push_cmd(bundle_path: Path, targets: list[Destination], parallel: int, runtime: str | None, channels: int | None,
             lock_wait: float, health_cmd: str | None, as_json: bool) -> None:
    """Deploy BUNDLE to HOST... (user@host[:port] or ~/.ssh/config aliases) or an inventory.

    \b
    Before any byte is sent: lock the device, probe it, check the bundle's needs (architecture, CPU
    tier, JetPack, Python, memory) and free disk. Then a resumable upload (a re-run continues where a
    lost link stopped), sha256 on the device, a self-test of the new bundle, an atomic switch of
    `current`, and a health check that rolls back on failure. `current` never points at a bundle
    that did not pass.
    """
    verified = bundle.verify(bundle_path)
    many = len(targets) > 1
    bars: dict[str, tqdm] = {}

    def job(target: Destination) -> deploy.PushReport:
        name = target.host.alias

        def on_bytes(n: int, total: int) -> None:
            if many:
                return
            if name not in bars:
                live = sys.stderr.isatty()
                bars[name] = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"upload {name}",
                                  file=sys.stderr, ascii=not live, mininterval=0.2 if live else 10.0)
            bars[name].update(n)

        options = replace(target.options, runtime=runtime, channels=channels, lock_wait=lock_wait,
                          health_cmd=health_cmd)
        try:
            return deploy.push(verified, target.host, options, _say(name, many), on_bytes)
        finally:
            if name in bars:
                bars.pop(name).close()

    outcomes = fleet.run(targets, job, parallel)
    rows = [{"host": o.name, "result": o.value.result if o.value else f"FAILED ({o.error.exit_code})",
             "bundle": verified.id, "sent MB": f"{o.value.sent_bytes / 1e6:.1f}" if o.value else None,
             "seconds": o.value.seconds if o.value else None,
             "previous": o.value.previous if o.value else None,
             "note": "" if o.value else o.error.cause} for o in outcomes]
    data = [asdict(o.value) if o.value else {"host": o.name, "result": "failed", "exit_code": o.error.exit_code,
                                             "message": o.error.cause, "hint": o.error.hint} for o in outcomes]
    _finish(outcomes, rows, ["host", "result", "bundle", "sent MB", "seconds", "previous", "note"], as_json, data)


@click.command("status")
@device_options
@json_option
def status_cmd(targets: list[Destination], parallel: int, as_json: bool) -> None:
    """What each device runs: current and previous bundle, kept bundles, staged uploads, lock holder."""
    outcomes = fleet.run(targets, lambda t: deploy.status(t.host, t.options), parallel)
    rows = [{"host": o.name, "current": o.value["current"], "previous": o.value["previous"],
             "bundles": len(o.value["bundles"]), "staged": len(o.value["staging"]),
             "free GB": f"{o.value['free_bytes'] / 1e9:.1f}" if o.value["free_bytes"] is not None else None,
             "locked by": o.value["locked_by"]} if o.value else
            {"host": o.name, "current": f"FAILED: {o.error.cause}"} for o in outcomes]
    data = [o.value or {"host": o.name, "error": o.error.cause} for o in outcomes]
    _finish(outcomes, rows, ["host", "current", "previous", "bundles", "staged", "free GB", "locked by"], as_json,
            data)


@click.command("rollback")
@device_options
@json_option
def rollback_cmd(targets: list[Destination], parallel: int, as_json: bool) -> None:
    """Swap `current` and `previous` on each device (under the device's lock)."""
    outcomes = fleet.run(targets, lambda t: deploy.rollback(t.host, t.options, _say(t.host.alias, True)), parallel)
    rows = [{"host": o.name, **(o.value or {"current": f"FAILED: {o.error.cause}"})} for o in outcomes]
    _finish(outcomes, rows, ["host", "current", "previous"], as_json,
            [{"host": o.name, **(o.value or {"error": o.error.cause})} for o in outcomes])


@click.command("gc")
@device_options
@json_option
def gc_cmd(targets: list[Destination], parallel: int, as_json: bool) -> None:
    """Remove bundles, staged uploads and runtimes that neither `current` nor `previous` uses."""
    outcomes = fleet.run(targets, lambda t: deploy.gc(t.host, t.options, _say(t.host.alias, True)), parallel)
    rows = [{"host": o.name, "removed": ", ".join(o.value["removed"]) or "nothing",
             "freed MB": f"{o.value['freed_bytes'] / 1e6:.1f}"} if o.value else
            {"host": o.name, "removed": f"FAILED: {o.error.cause}"} for o in outcomes]
    _finish(outcomes, rows, ["host", "removed", "freed MB"], as_json,
            [{"host": o.name, **(o.value or {"error": o.error.cause})} for o in outcomes])


@click.command("logs")
@device_options
@click.option("-n", "lines", type=int, default=50, show_default=True, help="Last lines of each device's deploy.log.")
def logs_cmd(targets: list[Destination], parallel: int, lines: int) -> None:
    """Each device's deploy.log: pushes, switches, rollbacks, failures."""
    outcomes = fleet.run(targets, lambda t: deploy.logs(t.host, t.options, lines), parallel)
    for outcome in outcomes:
        if len(outcomes) > 1:
            click.echo(f"== {outcome.name}")
        click.echo((outcome.value or f"FAILED: {outcome.error.cause}\n").rstrip("\n"))
    if error := fleet.verdict(outcomes):
        raise error


@click.command("trust")
@click.argument("host")
@click.option("--ssh-config", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="SSH config to read the host alias from [default: ~/.ssh/config].")
@click.option("--fingerprint", default=None, help="Record the key only if it has this SHA256:… fingerprint.")
@click.option("--yes", is_flag=True, help="Record the key without asking (after checking it another way).")
def trust_cmd(host: str, ssh_config: Path | None, fingerprint: str | None, yes: bool) -> None:
    """Record HOST's SSH host key in known_hosts, after you compare its fingerprint with the device's
    (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on its console). A changed key is refused."""
    resolved = sshconfig.resolve(host, sshconfig.load(ssh_config))

    def confirm(shown: str) -> bool:
        click.echo(shown)
        if yes:
            return True
        if not sys.stdin.isatty():
            raise HostKeyError(f"{shown}; not recorded: no terminal to confirm on",
                               "check the fingerprint, then re-run with --yes or --fingerprint SHA256:...")
        return click.confirm("Does it match the fingerprint shown on the device?", default=False)

    click.echo(deploy.trust(resolved, confirm, fingerprint))
