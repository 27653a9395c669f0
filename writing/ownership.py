"""Who owns an output: a command writes only into a folder that is new, empty, or one k3trt wrote, and
replaces only files k3trt wrote. Nothing here ever deletes a path this project did not create.

A folder k3trt writes carries a marker file (`.k3trt-output.json`: its kind and the writer's version);
folders written before the marker existed are recognised by their own stamp (`manifest.json` for artifacts,
`k3trt_preset.json` for presets). Files are recognised by what k3trt puts in them: images by their EXIF
`Software` tag, JSON reports by a top-level "k3trt" key.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

from k3trt.contract.arguments import check_output_file, check_path, writable_ancestor
from k3trt.contract.errors import OutputPathError
from k3trt.writing.atomic import atomic_write, atomic_write_bytes, atomic_write_json

MARKER = ".k3trt-output.json"
LEGACY_STAMPS = {"artifacts": "manifest.json", "preset": "k3trt_preset.json"}
EXIF_SOFTWARE = 0x0131
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@functools.lru_cache(maxsize=1)
def package_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("kandinsky3-trt")
    except md.PackageNotFoundError:
        return "0+unknown"


def writer_tag() -> str:
    return f"k3trt {package_version()}"


# ----------------------------------------------------------------------------------------- folders
def owner_kind(folder: Path) -> str | None:
    """The kind of output k3trt wrote into `folder` ("artifacts", "preset", "demo", ...), or None."""
    marker = folder / MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text())
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("kind"), str):
            return data["kind"]
    for kind, stamp in LEGACY_STAMPS.items():
        if (folder / stamp).is_file():
            return kind
    return None


def mark(folder: Path, kind: str) -> None:
    atomic_write_json(folder / MARKER, {"kind": kind, "written_by": writer_tag()})


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _is_empty(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return next(entries, None) is None


def check_output_dir(value: Any, kind: str, *, name: str = "--out", replace: bool = False, force: bool = False,
                     inputs: Iterable[Any] = ()) -> Path:
    """Check, without writing anything, that a command making a `kind` may write the folder `value`.

    Accepted: a path that does not exist yet (under a writable folder), an empty folder, or a folder k3trt
    wrote as the same kind. `replace=True` (the command replaces the folder's content, e.g. `preset`) also
    needs `force` when that folder already holds something. The folder may neither be nor contain nor lie
    inside any of `inputs` (the model folder a command reads)."""
    path = check_path(name, value)
    resolved = path.resolve()
    for source in inputs:
        if source is not None and _overlap(resolved, Path(source).resolve()):
            raise OutputPathError(f"{name} {str(path)!r} overlaps the input folder {str(source)!r}",
                                  accepted="an output folder outside the input", fix="write to a separate "
                                  f"folder, e.g. {name} {resolved.name}-{kind}")
    if not path.exists():
        if path.is_symlink():
            raise OutputPathError(f"{name} {str(path)!r} is a dangling symbolic link", fix="choose another folder")
        writable_ancestor(path, name)
        return path
    if not path.is_dir():
        raise OutputPathError(f"{name} {str(path)!r} is a file, not a folder", fix="choose a folder path")
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputPathError(f"{name} {str(path)!r} is not writable", fix="choose a folder you may write to")
    if _is_empty(path):
        return path
    found = owner_kind(path)
    if found == kind:
        if replace and not force:
            raise OutputPathError(f"{name} {str(path)!r} already holds a k3trt {kind}",
                                  fix="pass --force to replace it, or choose another folder")
        return path
    if found is not None:
        raise OutputPathError(f"{name} {str(path)!r} holds a k3trt {found}, not a {kind}",
                              fix="choose another folder")
    raise OutputPathError(
        f"{name} {str(path)!r} is not empty and was not written by k3trt",
        accepted=f"a new or empty folder, or one k3trt wrote (it holds {MARKER})",
        fix="choose a new folder; k3trt never writes into or deletes a folder it did not create")


def claim_output_dir(value: Any, kind: str, **options) -> Path:
    """`check_output_dir`, then create the folder if needed and mark it as k3trt's."""
    path = check_output_dir(value, kind, **options)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).is_file():
        mark(path, kind)
    return path


def staging_sibling(out: Path, label: str = "staging") -> Path:
    """A fresh hidden folder next to `out` (same file system, so the final move is a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{label}-{os.getpid()}-"))


def install_dir(staging: Path, out: Path, kind: str) -> Path:
    """Move the finished folder `staging` to `out`, which `check_output_dir` accepted: missing, empty, or a
    `kind` k3trt wrote. The old content is moved aside first and removed only after the new one is in place."""
    mark(staging, kind)
    if not out.exists() or (out.is_dir() and _is_empty(out)):
        os.replace(staging, out)  # a rename onto an empty folder replaces it
        return out
    if owner_kind(out) != kind:  # re-checked at the last moment: never remove what is not ours
        raise OutputPathError(f"{str(out)!r} changed while k3trt was writing: it no longer holds a k3trt {kind}",
                              fix="choose a new folder")
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-{os.getpid()}-"))
    os.replace(out, old / "content")
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------- files
def is_own_image(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            software = image.getexif().get(EXIF_SOFTWARE, "")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return False
    return isinstance(software, str) and software.startswith("k3trt")


def is_own_json(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "k3trt" in data


def save_image(image, path: Path) -> Path:
    """Write a PIL image atomically, tagged as k3trt's (so a later run may replace it)."""
    from PIL import Image


    exif = Image.Exif()
    exif[EXIF_SOFTWARE] = writer_tag()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    atomic_write(path, lambda handle: image.save(handle, format=fmt, exif=exif))
    return path


def save_json(obj: dict, path: Path) -> Path:
    """Write a JSON report atomically with a top-level "k3trt" key (its writer), so a later run may replace it."""

    payload = {"k3trt": writer_tag(), **obj}
    atomic_write_bytes(path, (json.dumps(payload, indent=2, default=float) + "\n").encode())
    return path


def check_output_image(value: Any, name: str = "--out") -> Path:
    return check_output_file(name, value, IMAGE_SUFFIXES, owned=is_own_image)


def check_output_json(value: Any, name: str = "--json") -> Path:
    return check_output_file(name, value, (".json",), owned=is_own_json)
