"""The CLI's one error boundary.

A project error (K3TRTError: bad input, damaged artifacts, a missing backend) prints its typed message and
exits 2. Anything else is a bug: a two-line message with the path of the saved traceback, exit 1. Progress
bars end their line first, so the message starts on a line of its own.
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

from k3trt.contract.errors import K3TRTError

EXIT_PROJECT_ERROR = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130


def end_progress_lines() -> None:
    """Close every open tqdm bar (leave=False bars erase themselves) and end a half-written stderr line."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is not None:
        for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
            try:
                bar.close()
            except Exception:  # a bar that cannot close must not hide the real error
                pass
    sys.stderr.flush()


def traceback_folder() -> Path:
    base = os.environ.get("K3TRT_CACHE") or Path.home() / ".cache" / "k3trt"
    return Path(base) / "errors"


def save_traceback(exc: BaseException) -> Path | None:
    """Write the traceback to a file in the k3trt cache (else the temp folder); None if neither is writable."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for folder in (traceback_folder(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"k3trt-traceback-{stamp}-{os.getpid()}.txt"
            path.write_text(f"k3trt {' '.join(sys.argv[1:])!r}\n{text}", encoding="utf-8", errors="replace")
            return path
        except OSError:
            continue
    return None


def run_guarded(command: Callable[[], int | None]) -> int:
    try:
        return int(command() or 0)
    except K3TRTError as exc:
        end_progress_lines()
        print(f"error [{type(exc).__name__}]: {exc}", file=sys.stderr)
        return EXIT_PROJECT_ERROR
    except KeyboardInterrupt:
        end_progress_lines()
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: keep the details, show a short message
        end_progress_lines()
        path = save_traceback(exc)
        where = f"the traceback is in {path}" if path else "the traceback could not be saved"
        print(f"internal error [{type(exc).__name__}]: {str(exc)[:300]}\n{where}; please report it with the "
              "command you ran", file=sys.stderr)
        return EXIT_BUG
