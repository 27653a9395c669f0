"""Shared pieces of the fuzzing suite (issue 11): Hypothesis profiles, a hang watchdog, file snapshots, and
the sentinel that marks "validation passed, real work would start here".

Profiles (pick with K3TRT_FUZZ_PROFILE; the default run always uses `fast` budgets):
  fast  - what the default test run does: a few dozen examples per target, derandomized (reproducible)
  long  - the `slow` run: 2,000 examples per target (5 targets: 10,000 generated inputs)
  soak  - 10,000 examples per target, for a night
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from pathlib import Path

from hypothesis import HealthCheck, settings

COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                    HealthCheck.data_too_large, HealthCheck.filter_too_much],
              print_blob=True)
settings.register_profile("fast", max_examples=30, derandomize=True, **COMMON)
settings.register_profile("long", max_examples=2000, **COMMON)
settings.register_profile("soak", max_examples=10_000, **COMMON)
FAST = settings.get_profile("fast")
LONG = settings.get_profile(os.environ.get("K3TRT_FUZZ_PROFILE", "long"))
HANG_SECONDS = 60  # one example; the slowest legitimate one (an ORT session of the tiny U-Net) takes ~1 s


class ReachedWork(BaseException):
    """Raised by stubs where a command would start real work (load a model, export): every check passed.
    A BaseException, so the CLI's error boundary does not turn it into an exit code."""


class Hang(BaseException):
    pass


@contextlib.contextmanager
def watchdog(seconds: int = HANG_SECONDS):
    """Fail an example that runs longer than `seconds` (a hang), instead of stalling the suite."""
    def expire(signum, frame):
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file and folder under `root` except those under `skip` -> content hash (folders: "dir")."""
    out = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        out[str(path.relative_to(root))] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def only_typed_errors(call) -> str:
    """Run `call`; 'ok', 'work' (every check passed, a stub stopped real work) or the project error's name.
    Any other exception fails the property; a hang fails through the watchdog."""
    from k3trt.contract.errors import K3TRTError

    with watchdog():
        try:
            call()
        except ReachedWork:
            return "work"
        except K3TRTError as exc:
            assert exc.what and str(exc), type(exc)
            return type(exc).__name__
    return "ok"
