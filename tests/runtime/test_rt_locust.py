"""Locust (headless, loopback, bounded) overloads `k3trt serve` on the tiny preset: no 5xx, no dropped connection,
every 429 carries `Retry-After`, with clients that honour it and clients that do not (slow: about a minute)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parents[2] / "verify" / "load" / "run_locust.py"


@pytest.mark.slow
def test_locust_overload_gives_no_5xx_and_every_429_names_retry_after(tiny_artifacts, tmp_path):
    if importlib.util.find_spec("locust") is None:  # not imported here: Locust monkey-patches the interpreter
        pytest.skip("Locust is not installed (pip install 'kandinsky3-trt[load]')")
    spec = importlib.util.spec_from_file_location("run_locust", RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    out = tmp_path / "locust.json"
    assert runner.main(["--artifacts", str(tiny_artifacts), "--json", str(out), "--seconds", "15"]) == 0
    runs = json.loads(out.read_text())["runs"]
    for name, run in runs.items():
        assert run["server_errors_5xx"] == 0 and run["connection_failures"] == 0, (name, run)
        assert run["statuses"].get("200", 0) > 0 and run["every_429_had_retry_after"], (name, run)
        assert set(run["statuses"]) <= {"200", "429"}, (name, run)
    assert runs["retry_at_once"]["share_429"] > 0  # 8 users against a queue of 2: the overload happened
