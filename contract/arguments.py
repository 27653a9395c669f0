"""Validators for every value a user hands the CLI, the Python API or a server: checked before any work starts.

Each returns the normalised value or raises InvalidArgumentError / OutputPathError naming the value, what is
accepted and the fix. They import nothing heavy, so a server can call them per request.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from k3trt.contract.errors import InvalidArgumentError, OutputPathError

MAX_SEED = 2**64 - 1  # seeds are unsigned 64-bit; see k3trt.runtime.seeding for what each seed means
MAX_PROMPT_CHARS = 16_384  # Kandinsky 3 reads 128 tokens; anything this long is a mistake, not a prompt
MAX_PROMPTS = 64  # prompts per request; the artifacts' batch range bounds prompts x images further
MAX_IMAGES = 64
MAX_STEPS = 1000  # the scheduler's training timesteps
MAX_REPEATS = 1000
MAX_NAME_BYTES = 255  # NAME_MAX and PATH_MAX of Linux file systems: longer paths fail with ENAMETOOLONG
MAX_PATH_BYTES = 4095


def available_cores() -> int:
    """Cores this process may run on (affinity mask, cgroup-restricted containers included)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------- numbers
def check_int(name: str, value: Any, lo: int, hi: int, fix: str | None = None) -> int:
    """An integer (not a bool, not a float) in lo..hi inclusive."""
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InvalidArgumentError(f"{name}={value!r}", accepted=f"an integer in {lo}..{hi}",
                                   fix=fix or f"pass an integer between {lo} and {hi}")
    return int(value)


def check_float(name: str, value: Any, lo: float, hi: float, fix: str | None = None) -> float:
    """A finite real number in lo..hi inclusive."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not lo <= value <= hi:
        raise InvalidArgumentError(f"{name}={value!r}", accepted=f"a finite number in {lo:g}..{hi:g}",
                                   fix=fix or f"pass a number between {lo:g} and {hi:g}")
    return float(value)


def check_seed(value: Any, name: str = "seed") -> int:
    return check_int(name, value, 0, MAX_SEED, "e.g. --seed 0; every seed in 0..2^64-1 gives its own noise")


def check_threads(value: Any, name: str = "threads") -> int | None:
    """None (all available cores) or 1..available cores: more threads than cores only oversubscribes."""
    if value is None:
        return None
    cores = available_cores()
    return check_int(name, value, 1, cores, f"leave it out to use all {cores} core(s), or pass fewer")


# ----------------------------------------------------------------------------------------- text
def check_text(name: str, value: Any, *, max_chars: int = MAX_PROMPT_CHARS, allow_empty: bool = True) -> str:
    """A str of valid Unicode (no lone surrogates, no NUL) and bounded length."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{name} {_short(value)} is a {type(value).__name__}", accepted="a str",
                                   fix="pass the text as a Python str")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(
            f"{name} {_short(value)} is not valid Unicode (a lone surrogate at index {exc.start}; the command line "
            "held bytes that are not UTF-8?)", accepted="text that encodes as UTF-8",
            fix="pass the prompt as UTF-8 (check the terminal's or the file's encoding)") from None
    if "\x00" in value:
        raise InvalidArgumentError(f"{name} {_short(value)} contains a NUL character", accepted="text without NUL",
                                   fix="remove the NUL character")
    if len(value) > max_chars:
        raise InvalidArgumentError(f"{name} has {len(value)} characters", accepted=f"at most {max_chars}",
                                   fix="Kandinsky 3 reads only the first 128 tokens: shorten it")
    if not allow_empty and not value.strip():
        raise InvalidArgumentError(f"{name} is empty", accepted="non-empty text", fix="say what to draw")
    return value


def check_texts(name: str, value: Any, *, max_items: int = MAX_PROMPTS) -> list[str]:
    """A str or a non-empty list/tuple of str, each checked by `check_text`."""
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None:
        raise InvalidArgumentError(f"{name} {_short(value)} is not a string or a list of strings",
                                   accepted="str or list[str]", fix='e.g. "a red fox" or ["a red fox", "a cat"]')
    if not items:
        raise InvalidArgumentError(f"the {name} list is empty", accepted="at least one prompt",
                                   fix="pass at least one prompt")
    if len(items) > max_items:
        raise InvalidArgumentError(f"{len(items)} {name}s", accepted=f"1..{max_items} per request",
                                   fix="split the work into several requests")
    return [check_text(f"{name}[{i}]" if len(items) > 1 else name, item) for i, item in enumerate(items)]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


# ----------------------------------------------------------------------------------------- choices
def check_choice(name: str, value: Any, accepted: Iterable[str], fix: str | None = None) -> str:
    accepted = list(accepted)
    if not isinstance(value, str) or value not in accepted:
        raise InvalidArgumentError(f"{name}={_short(value)}", accepted=", ".join(accepted),
                                   fix=fix or f"e.g. {accepted[0] if accepted else '(none)'}")
    return value


def parse_list(name: str, text: Any, accepted: Sequence[str]) -> list[str]:
    """A comma list like "unet,movq_decoder": non-empty, known names, no duplicates."""
    if not isinstance(text, str):
        raise InvalidArgumentError(f"{name}={_short(text)}", accepted=f"a comma list of {', '.join(accepted)}",
                                   fix=f"e.g. {','.join(accepted)}")
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise InvalidArgumentError(f"{name}={text!r} names nothing", accepted=f"a comma list of {', '.join(accepted)}",
                                   fix=f"e.g. {name} {accepted[0]}, or leave it out for all")
    for item in items:
        check_choice(name, item, accepted)
    if len(set(items)) != len(items):
        raise InvalidArgumentError(f"{name}={text!r} repeats a name", accepted="each name once",
                                   fix="name each one once")
    return items


def check_options(what: str, given: Mapping[str, Any], accepted: Iterable[str]) -> None:
    """Keyword options: a typo is a typed error listing the real names, not a TypeError deep inside."""
    accepted = sorted(accepted)
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise InvalidArgumentError(f"unknown option(s) {', '.join(unknown)} for {what}",
                                   accepted=", ".join(accepted) or "(none)", fix="check the spelling")


# ----------------------------------------------------------------------------------------- paths
def check_path(name: str, value: Any) -> Path:
    """A str or os.PathLike naming a path (not None, not bytes, not empty, no NUL)."""
    if isinstance(value, Path):
        text = str(value)
    elif isinstance(value, str) or (isinstance(value, os.PathLike) and isinstance(os.fspath(value), str)):
        text = os.fspath(value)
    else:
        raise InvalidArgumentError(f"{name}={_short(value)} is not a path", accepted="a str or pathlib.Path",
                                   fix="pass the folder or file as a str or pathlib.Path")
    if not text or "\x00" in text:
        raise InvalidArgumentError(f"{name}={text!r} is not a usable path", accepted="a non-empty path without NUL",
                                   fix="pass a real path")
    try:
        encoded = os.fsencode(text)  # lone surrogates outside surrogateescape's range cannot become a file name
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"{name}={text!r} cannot be a file name on this system",
                                   accepted="a path that encodes as UTF-8", fix="pass the path as UTF-8 text") from None
    if len(encoded) > MAX_PATH_BYTES or any(len(os.fsencode(part)) > MAX_NAME_BYTES for part in Path(text).parts):
        raise InvalidArgumentError(f"{name} {_short(text)} is too long for a path",
                                   accepted=f"names of at most {MAX_NAME_BYTES} bytes, {MAX_PATH_BYTES} in all",
                                   fix="choose a shorter path")
    return Path(text)


def check_input_dir(name: str, value: Any, what: str, fix: str) -> Path:
    """An existing folder; a file or a missing path is reported as what it is."""
    path = check_path(name, value)
    if path.is_dir():
        return path
    state = "is a file, not a folder" if path.exists() else "does not exist"
    raise InvalidArgumentError(f"{what} {str(path)!r} {state}", fix=fix)


def writable_ancestor(path: Path, name: str) -> Path:
    """The nearest existing ancestor of `path`; it must be a writable folder (a file there is named)."""
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise OutputPathError(f"{name} {str(path)!r} cannot be created: {str(parent)!r} is a file",
                                      fix="choose a path under a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputPathError(f"{name} {str(path)!r} cannot be written: {str(parent)!r} is not writable",
                                      fix="choose a folder you may write to")
            return parent
    raise OutputPathError(f"{name} {str(path)!r} has no existing ancestor folder", fix="choose another path")


def check_output_file(name: str, value: Any, suffixes: Sequence[str], *, owned=None) -> Path:
    """A file the command may create or replace: a known extension, a parent that is (or can become) a
    writable folder, not a folder itself, and, if it exists, a file this project wrote (`owned(path)`)."""
    path = check_path(name, value)
    if path.is_dir():
        raise OutputPathError(f"{name} {str(path)!r} is a folder", accepted="a file path",
                              fix=f"e.g. {str(path / ('out' + suffixes[0]))!r}")
    if path.suffix.lower() not in suffixes:
        raise OutputPathError(f"{name} {str(path)!r} has the extension {path.suffix or '(none)'!r}",
                              accepted=", ".join(suffixes), fix=f"e.g. {path.with_suffix(suffixes[0]).name}")
    writable_ancestor(path, name)
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_file():
            raise OutputPathError(f"{name} {str(path)!r} exists and is not a regular file",
                                  fix="choose another path")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise OutputPathError(f"{name} {str(path)!r} cannot be replaced: its folder is not writable",
                                  fix="choose a folder you may write to")
        if owned is not None and not owned(path):
            raise OutputPathError(f"{name} {str(path)!r} exists and was not written by k3trt",
                                  accepted="a new path, or a file k3trt wrote earlier",
                                  fix="choose another path (k3trt never overwrites files it did not write)")
    return path


def parse_resolution(text: Any, name: str = "--resolution") -> tuple[int, int]:
    """'WxH' in pixels -> (width, height)."""
    parts = text.lower().split("x") if isinstance(text, str) else []
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InvalidArgumentError(f"{name} {text!r}", accepted="WIDTHxHEIGHT in pixels",
                                   fix=f"e.g. {name} 1024x1024")
    width, height = (int(p) for p in parts)
    check_int(f"{name} width", width, 1, 1 << 16)
    check_int(f"{name} height", height, 1, 1 << 16)
    return width, height
