"""Loopback push throughput: our upload path vs `scp` of the same files, and the bytes a resume re-sends.

Starts the test suite's real sshd on 127.0.0.1, writes a bundle of incompressible data, then times
  - `faq-deploy`'s data path (agent stage → resumable SFTP upload → sha256 and commit on the device)
    with 1, 2 and 4 channels,
  - `scp -r` of the same files (OpenSSH's C client, its default cipher),
  - a push whose link is cut half-way (tests/sshd.py's FaultProxy), then the re-run: bytes sent by
    each, against the bundle's size.
Writes docs/results/push.json and push.md.

    python scripts/bench_push.py [--mb 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the suite's sshd and fault proxy: one implementation of each

from sshd import FaultProxy, Sshd  # noqa: E402

from faq_deploy import bundle  # noqa: E402
from faq_deploy.errors import ConnectionFailed  # noqa: E402
from faq_deploy.push import sshconfig, transfer  # noqa: E402
from faq_deploy.push.connection import connect  # noqa: E402
from faq_deploy.push.device import Device  # noqa: E402
from faq_runtime.bundle import MANIFEST  # noqa: E402


def make_bundle(folder: Path, megabytes: int) -> bundle.Bundle:
    """A bundle shaped like ours (one large weights file, a few small ones) of random bytes."""
    model = folder / "src"
    model.mkdir(parents=True)
    small = 1 << 18
    for name in ("model.onnx", "tokenizer.json", "genai_config.json"):
        (model / name).write_bytes(os.urandom(small))
    with (model / "model.onnx.data").open("wb") as handle:
        left = megabytes * 1_000_000 - 3 * small
        while left > 0:
            handle.write(os.urandom(min(left, 1 << 20)))
            left -= 1 << 20
    return bundle.write(folder / "bundle", model, {k: {} for k in
                        ("source", "quantization", "export", "target", "memory", "evaluation")}, "bench")


def ours(device: Device, source: bundle.Bundle, channels: int) -> tuple[float, int]:
    """stage → upload → commit into a fresh root; seconds and bytes sent."""
    sizes = [transfer.Piece(f["path"], f["size"], 0) for f in source.manifest["files"]]
    start = time.perf_counter()
    device.op("stage", source.id, stdin=(source.root / MANIFEST).read_bytes())
    sent = transfer.upload(device.connection, source.root, device.path("staging", source.id), sizes, channels=channels)
    assert device.op("commit", source.id, timeout=300)["committed"]
    return time.perf_counter() - start, sent


def scp(server: Sshd, key: Path, known: Path, source: Path, dest: str) -> float:
    start = time.perf_counter()
    subprocess.run(["scp", "-q", "-r", "-P", str(server.port), "-i", str(key), "-o", f"UserKnownHostsFile={known}",
                    "-o", "IdentitiesOnly=yes", str(source), f"{server.user}@127.0.0.1:{dest}"], check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="bundle size in MB (default 100)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method; the median is reported")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-push-"))
    (work / "sshd").mkdir()
    server = Sshd(work / "sshd")
    try:
        key = server.authorize("bench")
        known = work / "known_hosts"
        proxy = FaultProxy(server.port)
        known.write_text(server.host_key_line() + "\n" + server.host_key_line(proxy.port) + "\n")
        config = work / "ssh_config"
        config.write_text(f"Host *\n  IdentityFile {key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known}\n")
        hosts = sshconfig.load(config)
        source = make_bundle(work / "data", args.mb)
        total = sum(f["size"] for f in source.manifest["files"])
        rows = []
        with connect(sshconfig.resolve(f"{server.user}@127.0.0.1:{server.port}", hosts)) as link:
            for channels in (1, 2, 4):
                times = []
                for run in range(args.repeat):
                    device = Device(link, str(work / f"root-{channels}-{run}"))
                    seconds, sent = ours(device, source, channels)
                    assert sent == total
                    times.append(seconds)
                rows.append({"method": f"faq-deploy ({channels} channel{'s' * (channels > 1)})",
                             "seconds": statistics.median(times), "cipher": link.transport.local_cipher})
        times = [scp(server, key, known, source.root, str(work / f"scp-{run}")) for run in range(args.repeat)]
        rows.append({"method": "scp -r (OpenSSH)", "seconds": statistics.median(times), "cipher": "OpenSSH default"})
        for row in rows:
            row["MB/s"] = round(total / 1e6 / row["seconds"], 1)
            row["seconds"] = round(row["seconds"], 2)

        # A link cut half-way, then the re-run through a healthy one.
        proxy.drop_after = total // 2
        via_proxy = sshconfig.resolve(f"{server.user}@127.0.0.1:{proxy.port}", hosts)
        root = str(work / "root-resume")
        pieces = [transfer.Piece(f["path"], f["size"], 0) for f in source.manifest["files"]]
        with connect(via_proxy) as link:
            device = Device(link, root)
            device.op("stage", source.id, stdin=(source.root / MANIFEST).read_bytes())
            first = []
            try:
                transfer.upload(link, source.root, device.path("staging", source.id), pieces, on_bytes=first.append)
            except ConnectionFailed:
                pass
        with connect(via_proxy) as link:
            device = Device(link, root)
            staged = device.op("stage", source.id, stdin=(source.root / MANIFEST).read_bytes())["staged"]
            rest = [transfer.Piece(p.path, p.size, staged.get(p.path, 0)) for p in pieces]
            second = transfer.upload(link, source.root, device.path("staging", source.id),
                                     [p for p in rest if p.offset < p.size])
            assert device.op("commit", source.id, timeout=300)["committed"]
        kept = sum(staged.values())
        resume = {"bundle_bytes": total, "cut_after_bytes": total // 2, "handed_to_link_before_cut": sum(first),
                  "kept_on_device": kept, "sent_on_rerun": second, "re_sent_bytes": kept + second - total}
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    result = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "bundle_mb": args.mb, "repeat": args.repeat, "throughput": rows, "resume": resume}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "push.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Loopback push, {total / 1e6:.0f} MB bundle ({os.cpu_count()} CPUs, median of {args.repeat})", "",
             "| method | seconds | MB/s | cipher |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['seconds']} | {r['MB/s']} | {r['cipher']} |" for r in rows]
    lines += ["", f"Resume: link cut after {resume['cut_after_bytes']:,} bytes; the device kept "
              f"{resume['kept_on_device']:,}; the re-run sent {resume['sent_on_rerun']:,}, so "
              f"{resume['re_sent_bytes']:,} bytes were sent twice.", "",
              "`faq-deploy` times include staging and the sha256 check and commit on the device; `scp` does "
              "no verification.", "", "Command: `python scripts/bench_push.py" +
              (f" --mb {args.mb}" if args.mb != 100 else "") + "`"]
    (args.out / "push.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
