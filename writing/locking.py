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
from pathlib import Path
from typing import Callable, Iterator

from k3trt.contract.cards import COMPONENTS
from k3trt.contract.errors import ArtifactError
from k3trt.writing.atomic import make_temp_dir
from k3trt.writing.ownership import is_part, mark_part

LOCK_NAME = ".k3trt.lock"
# Temporary names the writers use inside an artifact directory (staging folders, atomic-write temp files: mkstemp's
# `.NAME.` + 8 random characters + `.tmp`). A folder is removed only when it also carries k3trt's part marker
# (written when it is made) or is empty; anything else with such a name is left and reported.
STALE_DIRS = re.compile(r"^\.(staging|refit|calib)-")
STALE_FILES = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
PID_IN_NAME = re.compile(r"^\.staging-.+?-(\d+)-")
SUBFOLDERS = ("engines", "tokenizer", "scheduler", "calibration", *COMPONENTS)


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
    """A fresh staging folder in `root` whose name carries this process id (`.staging-LABEL-PID-xxxx`), marked
    as k3trt's from the start (so the next writer may remove it if this one dies)."""
    return mark_part(make_temp_dir(root, f".staging-{label}-{os.getpid()}-"))


def remove_stale(root: Path, log: Callable[[str], None] | None = None) -> list[str]:
    """Remove staging folders and temp files left by dead writers. Call only while holding the lock."""
    removed, kept = [], []
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
                if not (is_part(entry) or not any(entry.iterdir())):
                    kept.append(str(entry.relative_to(root)))  # not k3trt's marker: not ours to delete
                    continue
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(str(entry.relative_to(root)))
            elif entry.is_file() and STALE_FILES.match(entry.name):
                entry.unlink(missing_ok=True)
                removed.append(str(entry.relative_to(root)))
    if log is not None and removed:
        log(f"removed {len(removed)} leftover(s) of an interrupted run: {', '.join(sorted(removed)[:5])}")
    if log is not None and kept:
        log(f"left {len(kept)} folder(s) k3trt did not mark as its own: {', '.join(sorted(kept)[:5])}")
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
