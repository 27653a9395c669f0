"""Typed errors. Each names the offending value, what is accepted, and the fix."""
from __future__ import annotations


class K3TRTError(Exception):
    """Base of every error this package raises on purpose."""

    def __init__(self, what: str, *, accepted: str | None = None, fix: str | None = None):
        self.what, self.accepted, self.fix = what, accepted, fix
        parts = [what]
        if accepted:
            parts.append(f"accepted: {accepted}")
        if fix:
            parts.append(f"fix: {fix}")
        super().__init__("; ".join(parts))


class InvalidArgumentError(K3TRTError, ValueError):
    """A user-supplied value (CLI flag, API argument) is out of range or malformed."""


class OutputPathError(InvalidArgumentError):
    """An output file or folder cannot be written: wrong kind, not writable, or not this project's to replace."""


class ModelSourceError(K3TRTError):
    """A model folder or preset cannot be used as an export source."""


class ArtifactError(K3TRTError):
    """The artifact directory is missing, incomplete, tampered with or incompatible."""


class ShapeError(K3TRTError, ValueError):
    """A tensor shape falls outside what the artifacts or an engine profile allow."""


class NonFiniteError(K3TRTError, FloatingPointError):
    """A stage produced NaN or Inf."""


class BackendUnavailableError(K3TRTError):
    """A backend's libraries or hardware are missing on this machine."""


class TensorRTVersionError(BackendUnavailableError):
    """The installed TensorRT is outside the range this package supports (pyproject.toml, gpu extra)."""


class BackendRuntimeError(K3TRTError):
    """A backend failed while running a component (a damaged model that still loads, device out of memory)."""


class EngineCompatibilityError(ArtifactError):
    """An engine was built by another TensorRT version or for another GPU."""


class ValidationError(K3TRTError):
    """Numerical validation failed; `failures` lists every component/output that did."""

    def __init__(self, failures: list[str], *, fix: str | None = None):
        self.failures = failures
        super().__init__(
            f"{len(failures)} validation failure(s):\n  " + "\n  ".join(failures), fix=fix
        )


class BackendBusyError(K3TRTError):
    """Every execution slot stayed busy past the wait timeout (a server maps it to 503, retry later)."""
