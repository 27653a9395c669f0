"""One writer per artifact directory, and no litter from writers that died.

Every command that writes an artifact directory (export, calibrate, build, refit) holds an exclusive
`flock` on `ART/.k3trt.lock` while it writes; a second command fails at once with a typed error instead of
interleaving files. The kernel drops the lock when its process dies, so whoever takes the lock next knows
that temporary folders and files left in the directory belong to a dead writer and removes them.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from k3trt.contract.errors import ArtifactError

LOCK_NAME = ".k3trt.lock"
# Temporary names the writers use inside an artifact directory (staging folders, atomic-write temp files).
STALE_DIRS = re.compile(r"^\.(staging|refit|calib)-")
STALE_FILES = re.compile(r"^\..+\.tmp$")
PID_IN_NAME = re.compile(r"^\.staging-.+?-(\d+)-")
SUBFOLDERS = ("engines", "tokenizer", "scheduler", "calibration", "unet", "text_encoder", "movq_decoder")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_dir(root: Path, label: str) -> Path:
    """A fresh staging folder in `root` whose name carries this process id (`.staging-LABEL-PID-xxxx`)."""
    return Path(tempfile.mkdtemp(dir=root, prefix=f".staging-{label}-{os.getpid()}-"))


def remove_stale(root: Path, log: Callable[[str], None] | None = None) -> list[str]:
    """Remove staging folders and temp files left by dead writers. Call only while holding the lock."""
    removed = []
    for folder in (root, *(root / name for name in SUBFOLDERS)):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.is_symlink():
                continue
            if entry.is_dir() and STALE_DIRS.match(entry.name):
                match = PID_IN_NAME.match(entry.name)
                if match and _pid_alive(int(match.group(1))):
                    continue  # the lock says it is dead, but its pid lives (reused?): leave it
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(str(entry.relative_to(root)))
            elif entry.is_file() and STALE_FILES.match(entry.name):
                entry.unlink(missing_ok=True)
                removed.append(str(entry.relative_to(root)))
    if removed and log is not None:
        log(f"removed {len(removed)} leftover(s) of an interrupted run: {', '.join(sorted(removed)[:5])}")
    return removed


@contextlib.contextmanager
def artifact_lock(root: str | os.PathLike, log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the directory's write lock (an empty lock file, created once and never rewritten, so a failed
    run leaves the directory byte-identical), then clean dead writers' litter."""
    import fcntl

    root = Path(root)
    handle = open(root / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArtifactError(f"{str(root)!r} is being written by another k3trt command",
                                fix="wait for it to finish; two commands never write one artifact directory "
                                    "at once") from None
        remove_stale(root, log)
        yield root
    finally:
        handle.close()  # closing drops the flock
