"""Key-frame schedules for animations, parsed strictly before any work (Deforum's notation, numbers only).

A schedule maps frame numbers to values: `"0: 1.02; 24: 1.0"` (Deforum's `"0:(1.02), 24:(1.0)"` is read too).
Numbers are interpolated linearly between keys and held after the last one (Deforum's default 'Linear' in-betweens,
`get_inbetweens`); prompts hold until the next key (Deforum's forward fill). A plain value (`1.02`, `"a forest"`) is a
one-key schedule. Every schedule starts at frame 0 and names no frame past the last, so nothing is silently ignored.
Deforum's math expressions (`0:(1+0.002*sin(t))`, evaluated by numexpr) are refused: give numbers at key frames.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

from k3trt.contract.arguments import MAX_SEED, check_seed, check_text
from k3trt.contract.errors import InvalidArgumentError

_KEY = re.compile(r"\s*(\d+)\s*:\s*(.*?)\s*", re.S)
_STARTS_WITH_KEY = re.compile(r"\s*\d+\s*:")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
SEED_BEHAVIORS = ("iter", "fixed")  # Deforum's seed_behavior: 'iter' (its default) adds 1 per frame


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Sorted (frame, value) keys; `at(frame)` interpolates numbers linearly, holds text."""
    name: str
    keys: tuple[tuple[int, Any], ...]

    def at(self, frame: int) -> Any:
        before = [(k, v) for k, v in self.keys if k <= frame]
        k0, v0 = before[-1]
        after = [(k, v) for k, v in self.keys if k > frame]
        if not after or isinstance(v0, str):
            return v0
        k1, v1 = after[0]
        return v0 + (v1 - v0) * (frame - k0) / (k1 - k0)

    def to_json(self) -> list:
        return [[k, v] for k, v in self.keys]


def _error(name: str, what: str, fix: str, accepted: str | None = None) -> InvalidArgumentError:
    return InvalidArgumentError(f"{name} {what}", accepted=accepted or "key frames 'FRAME: VALUE; FRAME: VALUE' from "
                                "frame 0, e.g. '0: 1.02; 24: 1.0', or one value", fix=fix)


def _entries(name: str, value: Any, separators: str) -> list[tuple[int, str]]:
    """'0: a; 24: b' -> [(0, 'a'), (24, 'b')], or a mapping's items; keys unique, from 0, ascending order kept."""
    if isinstance(value, Mapping):
        items = list(value.items())
        for key, _ in items:
            if not isinstance(key, int) or isinstance(key, bool) or key < 0:
                raise _error(name, f"has the key {key!r}", "use frame numbers 0, 1, 2, ... as keys")
        return sorted(items)
    parts = [p for p in re.split(f"[{separators}]", value) if p.strip()]
    if not parts:
        raise _error(name, f"{value!r} is empty", f"e.g. {name} '0: ...'")
    items = []
    for part in parts:
        match = _KEY.fullmatch(part)
        if not match:
            raise _error(name, f"entry {part.strip()!r} is not 'FRAME: VALUE'", f"write it as e.g. '0: {part.strip()}'")
        items.append((int(match[1]), match[2]))
    return sorted(items, key=lambda item: item[0])


def _check_keys(name: str, items: list, frames: int, also: str = "") -> None:
    keys = [k for k, _ in items]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise _error(name, f"names frame {repeated[0]} twice", "give each key frame once")
    if keys[0] != 0:
        raise _error(name, f"starts at frame {keys[0]}", f"add a key at frame 0, e.g. '0: ...; {keys[0]}: ...'{also}")
    if keys[-1] >= frames:
        raise _error(name, f"has a key at frame {keys[-1]} but the animation has {frames} frames (0..{frames - 1})",
                     f"raise --frames above {keys[-1]} or drop that key{also}")


def _number(name: str, frame: int, text: Any, lo: float, hi: float) -> float:
    if isinstance(text, str):
        body = text.strip()
        if body.startswith("(") and body.endswith(")"):  # Deforum writes values in parentheses
            body = body[1:-1].strip()
        if not _NUMBER.fullmatch(body):
            raise _error(name, f"value {text!r} at frame {frame} is not a number (math expressions such as Deforum's "
                         "'1+0.002*sin(t)' are not supported)", "give a number at each key frame; values in between "
                         "are interpolated linearly")
        text = float(body)
    if not isinstance(text, (int, float)) or isinstance(text, bool) or not math.isfinite(text) or not lo <= text <= hi:
        raise _error(name, f"value {text!r} at frame {frame}", f"use a value between {lo:g} and {hi:g}",
                     accepted=f"finite numbers in {lo:g}..{hi:g}")
    return float(text)


def parse_numbers(name: str, value: Any, frames: int, lo: float, hi: float) -> Schedule:
    """A number, a 'FRAME: NUMBER; ...' string (',' separates too) or a {frame: number} mapping."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = {0: value}
    elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = {0: value.strip()}
    elif not isinstance(value, (str, Mapping)):
        raise _error(name, f"{value!r} is a {type(value).__name__}", f"e.g. {name} '0: 1.0'")
    items = _entries(name, value, ",;")
    _check_keys(name, items, frames)
    return Schedule(name, tuple((k, _number(name, k, v, lo, hi)) for k, v in items))


def parse_prompts(name: str, value: Any, frames: int) -> Schedule:
    """A prompt, a '0: a forest; 24: a city' string (';' separates: prompts may hold commas) or a mapping."""
    if isinstance(value, str) and not _STARTS_WITH_KEY.match(value):
        value = {0: value}  # a plain prompt; one that starts with 'NUMBER:' is read as a schedule
    elif not isinstance(value, (str, Mapping)):
        raise _error(name, f"{value!r} is a {type(value).__name__}", f"e.g. {name} '0: a forest; 24: a city'")
    items = _entries(name, value, ";")
    plain = f" (a prompt that starts with 'NUMBER:' is read as a schedule: write '0: {value}' to use it as one " \
            "prompt)" if isinstance(value, str) and len(items) == 1 else ""
    _check_keys(name, items, frames, plain)
    return Schedule(name, tuple((k, check_text(f"{name} at frame {k}", v, allow_empty=False)) for k, v in items))


def parse_seeds(name: str, value: Any, frames: int, behavior: str = "iter") -> Schedule:
    """An integer seed, a '0: 5; 24: 100' string or a mapping. With 'iter' frame f gets the seed of the last key k
    at or before it plus (f - k), as Deforum's default; with 'fixed' the key's seed."""
    if behavior not in SEED_BEHAVIORS:
        raise InvalidArgumentError(f"seed behavior {behavior!r}", accepted=", ".join(SEED_BEHAVIORS),
                                   fix="iter: a new seed each frame (Deforum's default); fixed: the key's seed")
    if isinstance(value, int) and not isinstance(value, bool):
        value = {0: value}
    elif isinstance(value, str) and value.strip().isdigit():
        value = {0: int(value.strip())}
    elif not isinstance(value, (str, Mapping)):
        raise _error(name, f"{value!r} is a {type(value).__name__}", f"e.g. {name} 0 or {name} '0: 5; 24: 100'")
    items = _entries(name, value, ",;")
    _check_keys(name, items, frames)
    keys = []
    for i, (frame, seed) in enumerate(items):
        if isinstance(seed, str):
            if not seed.strip().isdigit():
                raise _error(name, f"value {seed!r} at frame {frame} is not a seed", "give an integer 0..2^64-1")
            seed = int(seed)
        check_seed(seed, f"{name} at frame {frame}")
        last = (items[i + 1][0] if i + 1 < len(items) else frames) - 1
        if behavior == "iter" and seed + (last - frame) > MAX_SEED:
            raise _error(name, f"value {seed} at frame {frame} counts past 2^64-1 by frame {last}",
                         f"use a seed at most {MAX_SEED - (last - frame)}, or the fixed seed behavior")
        keys.append((frame, seed))
    return Schedule(name, tuple(keys))


def seed_at(schedule: Schedule, frame: int, behavior: str) -> int:
    key = max(k for k, _ in schedule.keys if k <= frame)
    base = dict(schedule.keys)[key]
    return base + (frame - key) if behavior == "iter" else base
