"""`k3trt serve` as a process: serves, the load test drives it, SIGTERM finishes the running request, exit 0."""
import signal
import threading
import time

import pytest
from serve_helpers import serve_process

httpx = pytest.importorskip("httpx", reason="the HTTP tests need httpx (in `dev`)")
pytest.importorskip("fastapi", reason="the HTTP service needs the `serve` extra (in `dev`)")

from k3trt.cli.main import main  # noqa: E402
from k3trt.contract.errors import InvalidArgumentError  # noqa: E402
from k3trt.verify.loadtest import check_loopback, run_loadtest  # noqa: E402


def test_serve_loadtest_and_graceful_sigterm(tiny_artifacts):
    # ONNX Runtime pinned: this tests draining on SIGTERM; under `auto` OpenVINO would first compile the new prompt's
    # context length (docs/performance.md), which on a loaded test machine can outlast the 30 s admission wait
    with serve_process(tiny_artifacts, "--backend", "ort", "--default-resolution", "64x64", "--default-steps", "2",
                       "--threads", "1", "--grace", "60") as (base, server):
        report = run_loadtest(base, requests=6, concurrency=3, warmup=1, body={"prompt": "a fox", "steps": 1},
                              log=lambda *_: None)
        assert report["statuses"] == {"200": 6} and report["answered"] == 6
        assert report["rss_before_mib"] > 0 and report["p99_s"] >= report["p50_s"] > 0

        answer = {}
        slow = threading.Thread(target=lambda: answer.update(r=httpx.post(
            f"{base}/v1/images/generations", json={"prompt": "finish me", "steps": 40}, timeout=120)))
        slow.start()
        deadline = time.monotonic() + 30
        while "k3trt_active_requests 1.0" not in httpx.get(f"{base}/metrics").text:  # admitted, denoising
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        slow.join(120)
        assert answer["r"].status_code == 200  # admitted before SIGTERM: finished, not dropped
        assert server.wait(60) == 0
    assert "stopped" in server.stdout.read()


def test_serve_refuses_bad_artifacts_before_starting(tmp_path, capsys):
    assert main(["serve", "--artifacts", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_loadtest_stays_on_loopback():
    assert check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    with pytest.raises(InvalidArgumentError, match="not a loopback address"):
        check_loopback("http://example.com:8000")


def test_sigterm_drains_then_answers_what_is_left_with_json_503_and_no_traceback(tiny_artifacts):
    """--drain: readiness 503 with the socket open; past --grace the running request gets the JSON 503."""
    with serve_process(tiny_artifacts, "--backend", "ort", "--default-resolution", "64x64", "--threads", "1",
                       "--drain", "2", "--grace", "1") as (base, server):  # ort: as the test above
        end = time.monotonic() + 120
        while _status(f"{base}/readyz") != 200:
            assert time.monotonic() < end and server.poll() is None, "never ready"
            time.sleep(0.1)
        answer = {}
        # 256x256 x 200 steps: still running past --drain + --grace on a fast machine
        slow = threading.Thread(target=lambda: answer.update(r=httpx.post(
            f"{base}/v1/images/generations", json={"prompt": "too long", "steps": 200, "size": "256x256"}, timeout=120)))
        slow.start()
        while "k3trt_active_requests 1.0" not in httpx.get(f"{base}/metrics").text:
            assert time.monotonic() < end
            time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        draining = httpx.get(f"{base}/readyz")  # the socket is still open during --drain
        assert draining.status_code == 503 and "draining" in draining.json()["error"]["message"]
        refused = httpx.post(f"{base}/v1/images/generations", json={"prompt": "late"})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        slow.join(120)
        assert answer["r"].status_code == 503, answer["r"].text
        assert answer["r"].json()["error"]["code"] == "shutting_down"
        assert server.wait(60) == 0
    log = server.stdout.read()
    assert "Traceback" not in log and "ERROR" not in log, log


def _status(url: str) -> int:
    try:
        return httpx.get(url).status_code
    except httpx.TransportError:
        return 0


@pytest.mark.parametrize("options, message", [
    (["--timeout", "nan"], "not a positive finite float"),
    (["--default-steps", "500"], "--default-steps 500"),
    (["--default-resolution", "100x100"], "--default-resolution 100x100"),
    (["--default-resolution", "8192x8192"], "--default-resolution 8192x8192"),
    (["--keep-alive", "5"], "--keep-alive"),
], ids=["nan", "steps", "multiple", "too-large", "keep-alive"])
def test_serve_refuses_defaults_its_requests_would_refuse(tiny_artifacts, capsys, options, message):
    """Checked at start-up against the request limits (from the artifacts), before anything loads."""
    argv = ["serve", "--artifacts", str(tiny_artifacts), *options]
    if options[0] == "--timeout":  # argparse's own type check
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    else:
        assert main(argv) == 2
    assert message in capsys.readouterr().err
