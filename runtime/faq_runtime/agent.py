"""The device half of `faq-deploy push`: every change to a device root, made atomically.

Like probe.py, this file is copied alone to a board and run by its system `python3` before anything
is installed, so it stays self-contained and 3.6-compatible. The host decides; this script only
acts on the root and answers in JSON, one operation per invocation:

    python3 agent.py lock ROOT --owner TEXT --wait S   hold the root's lock until stdin closes
    python3 agent.py state ROOT                        links, bundles, staged parts, runtimes, free disk
    python3 agent.py stage ROOT ID < manifest.json     make staging/ID, link in files other bundles hold,
                                                       answer each part's size
    python3 agent.py commit ROOT ID                    hash the parts; good: fsync, rename into bundles/
    python3 agent.py verify ROOT ID                    re-hash bundles/ID (is it there, intact?)
    python3 agent.py install ROOT ID                   runtime venv from bundles/ID/wheels, once a version
    python3 agent.py swap ROOT ID --runtime PATH       previous := current, current := ID
    python3 agent.py rollback ROOT [--restore C P]     current <-> previous, or both set back
    python3 agent.py gc ROOT [--keep ID]               drop bundles, staging and runtimes nothing points at
    python3 agent.py log ROOT TEXT / logs ROOT -n N    append to / read deploy.log

Layout: bundles/<id>/ (immutable), staging/<id>/<path>.part, current and previous (relative
symlinks replaced with os.replace of a temporary link: `ln -sfn` is not atomic), runtime/<name>/,
state.json, deploy.log, .lock/.
"""

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

PART = ".part"
MANIFEST = "manifest.json"
BUSY = 75  # EX_TEMPFAIL: another push holds the lock
HISTORY = 20


def _path(root, *parts):
    return os.path.join(root, *parts)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link(root, name):
    """The bundle id a link points at, or None."""
    try:
        return os.path.basename(os.readlink(_path(root, name)))
    except OSError:
        return None


def _set_link(root, name, bundle):
    temporary = _path(root, ".%s.%d" % (name, os.getpid()))
    os.symlink(os.path.join("bundles", bundle), temporary)
    os.replace(temporary, _path(root, name))


def _write_json(path, data):
    temporary = path + ".%d" % os.getpid()
    with open(temporary, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _read_json(path, default):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return default


def _log(root, text):
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(_path(root, "deploy.log"), "a") as handle:
        handle.write("%s %s\n" % (stamp, text))


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _size(path):
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def _plain(relative):
    """Manifest paths must stay inside the bundle: no absolute paths, no `..`."""
    parts = relative.split("/")
    if relative.startswith("/") or ".." in parts or "" in parts:
        raise SystemExit("manifest path %r is not a plain path inside the bundle" % relative)
    return os.path.join(*parts)


def _files(manifest):
    return [(_plain(f["path"]), f["size"], f["sha256"]) for f in manifest["files"]]


def _emit(data):
    sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    return 0


def lock(args):
    folder = _path(args.root, ".lock")
    os.makedirs(folder, exist_ok=True)
    fd = os.open(_path(folder, "flock"), os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.time() + args.wait
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            holder = _read_json(_path(folder, "owner.json"), {}).get("owner", "another push")
            if time.time() >= deadline:
                _emit({"lock": "busy", "holder": holder})
                return BUSY
            if not waiting:
                _emit({"lock": "waiting", "holder": holder})
                sys.stdout.flush()
                waiting = True
            time.sleep(0.2)
    _write_json(_path(folder, "owner.json"), {"owner": args.owner, "since": time.time(), "pid": os.getpid()})
    _emit({"lock": "held"})
    sys.stdout.flush()
    # The kernel drops the flock when this process ends, and it ends when the SSH channel closes:
    # a push that dies, even on a lost link, never leaves the device locked.
    sys.stdin.read()
    return 0


def state(args):
    root = args.root
    staged = {}
    for bundle in _listdir(_path(root, "staging")):
        parts = {}
        base = _path(root, "staging", bundle)
        for folder, _, names in os.walk(base):
            for name in names:
                full = os.path.join(folder, name)
                parts[os.path.relpath(full, base)] = os.path.getsize(full)
        staged[bundle] = parts
    stat = os.statvfs(root) if os.path.isdir(root) else None
    return _emit({
        "current": _link(root, "current"),
        "previous": _link(root, "previous"),
        "bundles": dict((b, _size(_path(root, "bundles", b))) for b in _listdir(_path(root, "bundles"))),
        "staging": staged,
        "runtimes": _listdir(_path(root, "runtime")),
        "state": _read_json(_path(root, "state.json"), {}),
        "free_bytes": stat.f_bavail * stat.f_frsize if stat else None,
        "locked_by": _holder(root),
    })


def _holder(root):
    """Who holds the lock now (None when free): the flock tells, owner.json names them."""
    try:
        fd = os.open(_path(root, ".lock", "flock"), os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except OSError:
        return _read_json(_path(root, ".lock", "owner.json"), {}).get("owner", "another push")
    finally:
        os.close(fd)


def _listdir(path):
    try:
        return sorted(n for n in os.listdir(path) if not n.startswith("."))
    except OSError:
        return []


def _held_files(root, bundle):
    """(size, sha256) -> the path of a file with those bytes in another bundle, by its manifest."""
    held = {}
    for other in _listdir(_path(root, "bundles")):
        manifest = _read_json(_path(root, "bundles", other, MANIFEST), None) if other != bundle else None
        for relative, size, digest in _files(manifest) if manifest else []:
            held.setdefault((size, digest), _path(root, "bundles", other, relative))
    return held


def _reuse(source, part, size, digest):
    """Put a held file's bytes at `part`: a hard link (bundles are never changed in place), a copy where
    the filesystem has none. False when the held file no longer has the manifest's bytes."""
    if not os.path.isfile(source) or os.path.getsize(source) != size or _sha256(source) != digest:
        return False
    try:
        os.link(source, part)
    except OSError:
        shutil.copyfile(source, part)
    return True


def stage(args):
    """Create staging/ID with the manifest's folders, link in the files another bundle already holds
    (a new build for the same board shares its wheelhouse, often its tokenizer); answer how many bytes
    of each file are there, and which were reused."""
    manifest = json.load(sys.stdin)
    base = _path(args.root, "staging", args.id)
    held = _held_files(args.root, args.id)
    have, reused = {}, {}
    for relative, size, digest in _files(manifest):
        part = _path(base, relative + PART)
        os.makedirs(os.path.dirname(part), exist_ok=True)
        try:
            have[relative] = os.path.getsize(part)
        except OSError:
            have[relative] = 0
        if have[relative] > size:  # not this file's bytes: start it again
            os.remove(part)
            have[relative] = 0
        if have[relative] == 0 and size and (size, digest) in held:
            if os.path.exists(part):
                os.remove(part)
            if _reuse(held[size, digest], part, size, digest):
                have[relative] = reused[relative] = size
    _write_json(_path(base, MANIFEST + PART), manifest)
    return _emit({"staged": dict((k.replace(os.sep, "/"), v) for k, v in have.items()),
                  "reused": dict((k.replace(os.sep, "/"), v) for k, v in reused.items())})


def commit(args):
    """Check every staged part's size and sha256. A bad part is deleted (the host sends it again);
    when all are good they are fsynced and renamed, and staging/ID becomes bundles/ID in one rename."""
    root, bundle = args.root, args.id
    base = _path(root, "staging", bundle)
    manifest = _read_json(_path(base, MANIFEST + PART), None)
    if manifest is None:
        raise SystemExit("staging/%s has no manifest: stage it first" % bundle)
    bad = []
    for relative, size, digest in _files(manifest):
        part = _path(base, relative + PART)
        if not os.path.isfile(part) or os.path.getsize(part) != size or _sha256(part) != digest:
            if os.path.exists(part):
                os.remove(part)
            bad.append(relative.replace(os.sep, "/"))
    if bad:
        _log(root, "bundle %s: %d file(s) failed the checksum and were deleted: %s"
             % (bundle, len(bad), ", ".join(bad)))
        return _emit({"committed": False, "bad": bad})
    folders = set()
    for relative, _, _ in _files(manifest) + [(MANIFEST, 0, "")]:
        part = _path(base, relative + PART)
        with open(part, "rb") as handle:
            os.fsync(handle.fileno())
        os.rename(part, _path(base, relative))
        folders.add(os.path.dirname(_path(base, relative)))
    for folder in folders:
        _fsync_dir(folder)
    os.makedirs(_path(root, "bundles"), exist_ok=True)
    os.rename(base, _path(root, "bundles", bundle))
    _fsync_dir(_path(root, "bundles"))
    _log(root, "bundle %s received and verified (%d files)" % (bundle, len(manifest["files"])))
    return _emit({"committed": True, "bad": []})


def verify(args):
    """Is bundles/ID present and intact? A damaged copy that nothing points at is removed."""
    folder = _path(args.root, "bundles", args.id)
    manifest = _read_json(_path(folder, MANIFEST), None)
    if manifest is None:
        return _emit({"present": False})
    bad = [r for r, size, digest in _files(manifest)
           if not os.path.isfile(_path(folder, r)) or os.path.getsize(_path(folder, r)) != size
           or _sha256(_path(folder, r)) != digest]
    if bad and args.id not in (_link(args.root, "current"), _link(args.root, "previous")):
        shutil.rmtree(folder)
        _log(args.root, "bundle %s was damaged (%s) and was removed" % (args.id, ", ".join(bad)))
    return _emit({"present": True, "intact": not bad, "bad": bad})


def install(args):
    """A venv with faq-runtime from the bundle's wheelhouse, offline; one per runtime and Python version.
    pip runs from its own wheel in the wheelhouse, so boards without ensurepip (python3-venv) work."""
    wheels = _path(args.root, "bundles", args.id, "wheels")
    names = _listdir(wheels)
    runtime = [n for n in names if n.startswith("faq_runtime-") and n.endswith(".whl")]
    pip = [n for n in names if n.startswith("pip-") and n.endswith(".whl")]
    if not runtime or not pip:
        return _emit({"runtime": None, "reason": "the bundle's wheelhouse lacks faq-runtime or pip: rebuild it"})
    name = "faq-runtime-%s-py%d.%d" % (runtime[0].split("-")[1], sys.version_info[0], sys.version_info[1])
    venv = _path(args.root, "runtime", name)
    executable = _path(venv, "bin", "faq-run")
    if os.path.exists(_path(venv, ".complete")):
        return _emit({"runtime": executable, "installed": False})
    shutil.rmtree(venv, ignore_errors=True)  # an install that was cut off: start over
    steps = [[sys.executable, "-m", "venv", "--without-pip", venv],
             [_path(venv, "bin", "python"), _path(wheels, pip[0], "pip"), "install", "-q", "--no-index",
              "--find-links", wheels, "--disable-pip-version-check", "faq-runtime"]]
    for step in steps:
        done = subprocess.run(step, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        if done.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            return _emit({"runtime": None, "reason": "%s failed: %s" % (" ".join(step[:4]), done.stdout[-800:])})
    open(_path(venv, ".complete"), "w").close()
    _log(args.root, "runtime %s installed from bundle %s" % (name, args.id))
    return _emit({"runtime": executable, "installed": True})


def _record(root, event, bundle, runtimes=None):
    """state.json: the links, the runtime each bundle runs on, and the last events."""
    data = _read_json(_path(root, "state.json"), {})
    if runtimes is not None:
        data["runtimes"] = runtimes
    data["current"], data["previous"] = _link(root, "current"), _link(root, "previous")
    entry = {"event": event, "bundle": bundle, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "host": socket.gethostname()}
    data["history"] = (data.get("history", []) + [entry])[-HISTORY:]
    _write_json(_path(root, "state.json"), data)


def swap(args):
    """previous := current, then current := ID; a crash between the two leaves both valid."""
    root, bundle = args.root, args.id
    if not os.path.isdir(_path(root, "bundles", bundle)):
        raise SystemExit("bundles/%s is not on the device" % bundle)
    old = _link(root, "current")
    if old != bundle:
        if old:
            _set_link(root, "previous", old)
        _set_link(root, "current", bundle)
        _fsync_dir(root)
    runtimes = _read_json(_path(root, "state.json"), {}).get("runtimes", {})
    runtimes[bundle] = args.runtime
    _record(root, "deploy", bundle, runtimes)
    _log(root, "current -> %s (previous %s)" % (bundle, old))
    return _emit({"current": bundle, "previous": _link(root, "previous")})


def rollback(args):
    """current <-> previous; or, with --restore, both links set back to what a failed push found."""
    root = args.root
    old = _link(root, "current")
    if args.restore:
        links = dict(zip(("current", "previous"), args.restore))
    else:
        if not _link(root, "previous"):
            raise SystemExit("no previous bundle to roll back to")
        links = {"current": _link(root, "previous"), "previous": old}
    for name in ("current", "previous"):
        if links[name] != "-":
            _set_link(root, name, links[name])
        elif os.path.lexists(_path(root, name)):
            os.remove(_path(root, name))
    _fsync_dir(root)
    _record(root, "rollback", _link(root, "current"))
    _log(root, "rollback: current -> %s (was %s)%s" % (_link(root, "current"), old,
                                                         ": " + args.reason if args.reason else ""))
    return _emit({"current": _link(root, "current"), "previous": _link(root, "previous")})


def gc(args):
    root = args.root
    keep = set(filter(None, [_link(root, "current"), _link(root, "previous")]))
    removed, freed = [], 0
    for bundle in _listdir(_path(root, "bundles")):
        if bundle not in keep:
            freed += _size(_path(root, "bundles", bundle))
            shutil.rmtree(_path(root, "bundles", bundle))
            removed.append("bundles/" + bundle)
    for bundle in _listdir(_path(root, "staging")):
        if bundle not in args.keep:
            freed += _size(_path(root, "staging", bundle))
            shutil.rmtree(_path(root, "staging", bundle))
            removed.append("staging/" + bundle)
    used = set(os.path.basename(os.path.dirname(os.path.dirname(path)))
               for bundle, path in _read_json(_path(root, "state.json"), {}).get("runtimes", {}).items()
               if bundle in keep and path)
    for name in _listdir(_path(root, "runtime")):
        if name not in used:
            freed += _size(_path(root, "runtime", name))
            shutil.rmtree(_path(root, "runtime", name))
            removed.append("runtime/" + name)
    if removed:
        _log(root, "gc: removed %s (%d bytes)" % (", ".join(removed), freed))
    return _emit({"removed": removed, "freed_bytes": freed})


def log(args):
    _log(args.root, args.text)
    return 0


def logs(args):
    try:
        with open(_path(args.root, "deploy.log")) as handle:
            lines = handle.readlines()
    except OSError:
        lines = []
    sys.stdout.write("".join(lines[-args.n:]))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="faq-agent", description="Act on a faq-deploy device root.")
    ops = parser.add_subparsers(dest="op")
    for name, run in (("lock", lock), ("state", state), ("stage", stage), ("commit", commit),
                      ("verify", verify), ("install", install), ("swap", swap), ("rollback", rollback),
                      ("gc", gc), ("log", log), ("logs", logs)):
        op = ops.add_parser(name)
        op.add_argument("root")
        op.set_defaults(run=run)
        if name in ("stage", "commit", "verify", "install", "swap"):
            op.add_argument("id")
        if name == "lock":
            op.add_argument("--owner", required=True)
            op.add_argument("--wait", type=float, default=0.0)
        if name == "swap":
            op.add_argument("--runtime", default=None)
        if name == "rollback":
            op.add_argument("--reason", default="")
            op.add_argument("--restore", nargs=2, metavar=("CURRENT", "PREVIOUS"), help="bundle ids, - for none")
        if name == "gc":
            op.add_argument("--keep", action="append", default=[])
        if name == "log":
            op.add_argument("text")
        if name == "logs":
            op.add_argument("-n", type=int, default=50)
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.error("an operation is required")
    os.makedirs(args.root, exist_ok=True)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
