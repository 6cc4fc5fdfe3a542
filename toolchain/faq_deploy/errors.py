"""User-facing failures: a one-line cause, the next step, and a documented exit code.

The CLI has one handler for these (faq_deploy.cli); anything else is a bug and keeps its
traceback. Exit codes are listed in docs/commands.md and must stay stable for scripts.
"""

from __future__ import annotations


class FaqDeployError(Exception):
    """Base of every error a user can cause or fix."""

    exit_code = 1

    def __init__(self, cause: str, hint: str = "") -> None:
        super().__init__(cause)
        self.cause = cause
        self.hint = hint


class ModelNotFound(FaqDeployError):
    """Bad model: --model names no local folder, GGUF file or reachable hub id."""

    exit_code = 3


class UnsupportedArchitecture(FaqDeployError):
    """Unsupported architecture: not in the architecture registry."""

    exit_code = 4


class InvalidQuantConfig(FaqDeployError):
    """Bad quantization settings: bits, group size or method out of range."""

    exit_code = 5


class RegistryUnreachable(FaqDeployError):
    """Registry unreachable: a cached artifact is missing and cannot be downloaded."""

    exit_code = 6


class IntegrityError(FaqDeployError):
    """Corrupted file: its bytes do not match the sha256 it must have."""

    exit_code = 7


class TextError(FaqDeployError):
    """Bad text: a corpus that does not exist or holds too few tokens."""

    exit_code = 8


class CheckpointError(FaqDeployError):
    """Bad checkpoint: a quantized checkpoint that is incomplete or cannot be written."""

    exit_code = 9


class TargetError(FaqDeployError):
    """Bad target: an unknown board name or a build the board cannot run."""

    exit_code = 10


class ExportError(FaqDeployError):
    """Export failed: the ONNX exporter failed or its graph does not match the quantized model."""

    exit_code = 11


class BundleInvalid(FaqDeployError):
    """Bad bundle: missing, altered or unlisted files, paths outside it, or a wrong schema."""

    exit_code = 12


class HostKeyError(FaqDeployError):
    """Host key refused: the device's SSH host key is unknown, changed or revoked."""

    exit_code = 13


class ConnectionFailed(FaqDeployError):
    """Link failed: the device could not be reached, or the link dropped or stalled mid-way."""

    exit_code = 14


class AuthenticationFailed(FaqDeployError):
    """Authentication failed: no key from the agent or the identity files was accepted."""

    exit_code = 15


class DeviceMismatch(FaqDeployError):
    """Wrong device: its architecture, CPU, JetPack, Python or memory cannot run the bundle."""

    exit_code = 16


class DiskFull(FaqDeployError):
    """Not enough disk on the device, found before the upload or during it."""

    exit_code = 17


class TransferFailed(FaqDeployError):
    """Transfer failed: files kept arriving damaged, or a device command failed."""

    exit_code = 18


class SelfTestFailed(FaqDeployError):
    """Self-test failed: the bundle did not run on the device; `current` was not changed."""

    exit_code = 19


class HealthCheckFailed(FaqDeployError):
    """Health check failed after the switch: the device was rolled back to the previous bundle."""

    exit_code = 20


class DeviceBusy(FaqDeployError):
    """Device busy: another push held the device's lock for longer than --lock-wait."""

    exit_code = 21


class FleetFailed(FaqDeployError):
    """Several hosts failed, for different reasons: see the per-host table."""

    exit_code = 22


class EmulationError(FaqDeployError):
    """Emulation failed: this machine cannot emulate the target's CPU, or the bundle failed under emulation."""

    exit_code = 23


EXIT_CODES: dict[int, str] = {
    0: "Success.",
    1: "Internal error: a bug; rerun with FAQ_DEPLOY_DEBUG=1 and report the traceback.",
    2: "Usage error: unknown option or missing argument.",
    **{cls.exit_code: cls.__doc__.strip().splitlines()[0] for cls in FaqDeployError.__subclasses__()},
}
