"""Atomic writes: readers see the old file or the new one, never half of one. The manifest is each stage's commit
point: files are written under content-keyed names first, and `save_manifest` makes them visible at once."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from k3trt.contract.errors import DiskFullError
from k3trt.contract.manifest import MANIFEST_NAME, Manifest


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (`/proc/self/status`, kernel >= 4.7);
    elsewhere set and restored at once (os.umask has no read-only form)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode `open()` (0o666) or `mkdir` (0o777) gives a new path under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """`tempfile.mkdtemp` in `parent`, with the mode `mkdir` would give (mkdtemp's is 0700 whatever the umask):
    a staging folder renamed into place becomes a folder other accounts may read where the umask allows."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, umask_mode(directory=True))
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """`write(handle)` into a temporary file in the same folder, fsync, then rename: readers see the old file
    or the new one, never half of one. The file gets the mode `open()` would give (mkstemp's is 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    written = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), umask_mode())
            try:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                written = _position(handle)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(path, exc, needed=written) from exc
        raise


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _position(handle: BinaryIO) -> int:
    try:
        return handle.tell()
    except (OSError, ValueError):
        return 0


def disk_full_error(path: str | os.PathLike, exc: OSError | None = None, *,
                    needed: int | None = None) -> DiskFullError:
    """The typed error for a write that ran out of space: the path, what it needed and what the disk has free."""
    path = Path(path)
    folder = next((p for p in (path, *path.parents) if p.is_dir()), Path("."))
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    need = f"at least {needed / 1e6:.1f} MB" if needed else "more space"
    reason = "quota exceeded" if exc is not None and exc.errno == getattr(errno, "EDQUOT", None) else "disk full"
    return DiskFullError(f"writing {str(path)!r} failed: {reason} (needs {need}; {free} on {str(folder)!r})",
                         fix="free space on that file system (or write elsewhere) and run the command again; "
                             "nothing written before was replaced")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_manifest(manifest: Manifest) -> None:
    """The commit point of every stage: the manifest replaced atomically."""
    atomic_write_json(manifest.root / MANIFEST_NAME, manifest.data)
