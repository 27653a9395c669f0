"""Atomic writes: readers see the old file or the new one, never half of one. The manifest is each stage's commit
point: files are written under content-keyed names first, and `save_manifest` makes them visible at once."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from k3trt.contract.manifest import MANIFEST_NAME, Manifest


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """`write(handle)` into a temporary file in the same folder, fsync, then rename: readers see the old file
    or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_manifest(manifest: Manifest) -> None:
    """The commit point of every stage: the manifest replaced atomically."""
    atomic_write_json(manifest.root / MANIFEST_NAME, manifest.data)
