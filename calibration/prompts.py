"""Calibration and held-out prompts: loading, deterministic selection, and the guarantee that they never mix.

Prompt files are UTF-8, one prompt per line; blank lines and lines starting with `#` are skipped. The shipped
held-out set is for quality measurement only: a calibration set that shares a prompt with it is refused, so
quality numbers are never measured on data the ranges were fitted to.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from k3trt.contract.errors import InvalidArgumentError

PROMPT_DIR = Path(__file__).with_name("prompts")
CALIBRATION_FILE = PROMPT_DIR / "calibration_prompts.txt"
HELDOUT_FILE = PROMPT_DIR / "heldout_prompts.txt"


@dataclasses.dataclass(frozen=True)
class PromptSet:
    name: str  # "calibration" or "heldout": part of cache keys and reports
    prompts: tuple[str, ...]
    source: str  # file the prompts came from

    def __len__(self) -> int:
        return len(self.prompts)

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()


def read_prompt_file(path: str | Path) -> tuple[str, ...]:
    """Prompts of a UTF-8 file; a missing, unreadable or empty file is a typed error naming it."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"prompt file {str(path)!r} does not exist",
                                   accepted="a UTF-8 text file with one prompt per line",
                                   fix="pass --prompts FILE with an existing file, or omit it for the shipped set")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"prompt file {str(path)!r} is not UTF-8 ({exc.reason} at byte {exc.start})",
                                   accepted="UTF-8 text", fix="re-save the file as UTF-8") from None
    prompts = tuple(line.strip() for line in text.splitlines())
    prompts = tuple(p for p in prompts if p and not p.startswith("#"))
    if not prompts:
        raise InvalidArgumentError(f"prompt file {str(path)!r} has no prompts",
                                   accepted="at least one non-blank line that does not start with '#'",
                                   fix="add prompts, one per line")
    return prompts


def select(prompts: tuple[str, ...], count: int | None, flag: str = "--num-prompts") -> tuple[str, ...]:
    """The first `count` distinct prompts, in file order: deterministic, and a prefix of any larger selection,
    so growing --num-prompts reuses every cached trajectory. The shipped file interleaves languages and
    subjects, so a prefix is a mixed sample."""
    unique = tuple(dict.fromkeys(prompts))
    if count is None:
        return unique
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= len(unique):
        raise InvalidArgumentError(f"{flag} {count!r}", accepted=f"an integer in 1..{len(unique)} "
                                   f"(the number of distinct prompts available)",
                                   fix=f"lower {flag}" + (" or pass a longer --prompts FILE" if flag ==
                                                          "--num-prompts" else ""))
    return unique[:count]


def heldout_prompts(count: int | None = None) -> PromptSet:
    return PromptSet("heldout", select(read_prompt_file(HELDOUT_FILE), count, "--heldout-prompts"),
                     str(HELDOUT_FILE))


def calibration_prompts(path: str | Path | None = None, count: int | None = None,
                        heldout: PromptSet | None = None) -> PromptSet:
    """The calibration set (shipped file or `path`), checked to be disjoint from the held-out set."""
    source = Path(path) if path is not None else CALIBRATION_FILE
    chosen = PromptSet("calibration", select(read_prompt_file(source), count), str(source))
    assert_disjoint(chosen, heldout or heldout_prompts())
    return chosen


def assert_disjoint(calibration: PromptSet, heldout: PromptSet) -> None:
    """Held-out prompts measure quality; calibrating on them would grade the ranges on their own data."""
    def norm(text: str) -> str:
        return " ".join(text.casefold().split())

    shared = sorted({norm(p) for p in calibration.prompts} & {norm(p) for p in heldout.prompts})
    if shared:
        raise InvalidArgumentError(
            f"{len(shared)} calibration prompt(s) from {calibration.source!r} are in the held-out set "
            f"{heldout.source!r}, e.g. {shared[0]!r}",
            accepted="calibration prompts disjoint from the held-out prompts",
            fix="remove those lines from the calibration file")
