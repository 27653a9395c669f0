"""The misuse set (k3trt.verify.misuse) replayed end to end: every case refused with a typed error (or handled),
no traceback, no internal error, each within its time and memory bound, and no user file changed or deleted
(slow: about 40 fresh processes and a server)."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_the_misuse_set_gives_typed_refusals_within_bounds_and_loses_nothing(tmp_path):
    from k3trt.verify.misuse import main

    rc = main(["--work", str(tmp_path / "work"), "--json", str(tmp_path / "misuse.json")])
    summary = json.loads((tmp_path / "misuse.json").read_text())["summary"]
    assert summary["failed"] == [] and summary["outside_bounds"] == [], summary
    assert summary["tracebacks"] == 0 and summary["internal_errors"] == 0
    assert summary["changed_or_deleted_user_files"] == []
    assert rc == 0
