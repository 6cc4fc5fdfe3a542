"""Hosts named on the command line or by an inventory, and one job run on many of them at once."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from faq_deploy.errors import FaqDeployError, FleetFailed
from faq_deploy.push import inventory, sshconfig
from faq_deploy.push.deploy import PushOptions
from faq_deploy.push.sshconfig import HostConfig

T = TypeVar("T")


@dataclass(frozen=True)
class Destination:
    """One host with the options that apply to it (an inventory may set its root and Python)."""

    host: HostConfig
    options: PushOptions


@dataclass
class Outcome:
    name: str
    value: Any = None
    error: FaqDeployError | None = None


def destinations(specs: tuple[str, ...], hosts_file: Path | None, group: str | None, ssh_config: Path | None,
                 options: PushOptions) -> list[Destination]:
    config = sshconfig.load(ssh_config)
    found = [Destination(sshconfig.resolve(spec, config), options) for spec in specs]
    if hosts_file:
        for entry in inventory.read(hosts_file, group):
            settings = entry.settings
            host = sshconfig.resolve(settings.get("hostname", entry.name), config, settings)
            found.append(Destination(replace(host, alias=entry.name),
                                     replace(options, root=settings.get("root", options.root),
                                             python=settings.get("python", options.python))))
    if not found:
        raise FleetFailed("no host given", "name HOST arguments, or an inventory with --hosts FILE")
    return found


def run(targets: list[Destination], job: Callable[[Destination], T], parallel: int) -> list[Outcome]:
    """`job` on every destination, `parallel` at a time; each host's result or failure, in order."""
    def one(target: Destination) -> Outcome:
        try:
            return Outcome(target.host.alias, job(target))
        except FaqDeployError as exc:
            return Outcome(target.host.alias, error=exc)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(one, targets))


def verdict(outcomes: list[Outcome]) -> FaqDeployError | None:
    """None when every host succeeded; the one failure's own error when all failures agree."""
    failures = [o.error for o in outcomes if o.error]
    if not failures:
        return None
    codes = {f.exit_code for f in failures}
    names = ", ".join(o.name for o in outcomes if o.error)
    if len(codes) == 1:
        first = failures[0]
        return type(first)(f"{len(failures)} of {len(outcomes)} host(s) failed ({names}): {first.cause}"
                           if len(outcomes) > 1 else first.cause, first.hint)
    return FleetFailed(f"{len(failures)} of {len(outcomes)} hosts failed ({names}), for different reasons",
                       "see the table above; re-run the push for those hosts")
