"""`k3trt serve`'s HTTP layer on a real uvicorn server (loopback, in a thread) over the tiny artifacts."""
import base64
import contextlib
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the HTTP service needs the `serve` extra (in `dev`)")
httpx = pytest.importorskip("httpx", reason="the HTTP tests need httpx (in `dev`)")

from k3trt.runtime import Pipeline  # noqa: E402
from k3trt.runtime.metrics import psnr  # noqa: E402
from k3trt.runtime.serving.http import ImageService, ServeSettings, create_app  # noqa: E402

URL = "/v1/images/generations"


@contextlib.contextmanager
def running(service: ImageService):
    """uvicorn on an ephemeral loopback port in a thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_ready(base: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while httpx.get(f"{base}/readyz").status_code != 200:
        assert time.monotonic() < end, "the service never became ready"
        time.sleep(0.05)


def decode_png(item: dict) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))), dtype=np.float32) / 255.0


@pytest.fixture(scope="module")
def pipe(tiny_artifacts):
    return Pipeline.from_artifacts(tiny_artifacts, "ort")


@pytest.fixture(scope="module")
def server(pipe, tiny_artifacts):
    settings = ServeSettings(str(tiny_artifacts), default_size="64x64", default_steps=2, max_batch=4, max_queue=4)
    service = ImageService(settings, pipeline=pipe)
    with running(service) as base:
        wait_ready(base)
        yield base, service


def test_concurrent_requests_return_the_images_generate_gives_alone(server, pipe):
    base, _ = server
    bodies = [{"prompt": "a red fox", "seed": 1, "size": "64x64", "steps": 3},
              {"prompt": "a ship at sea", "seed": 2, "size": "128x64", "steps": 3, "guidance": 1.0},
              {"prompt": "a lighthouse", "negative_prompt": "blurry", "seed": 3, "size": "64x64", "steps": 2, "n": 2},
              {"prompt": "кот на окне", "seed": 4, "size": "128x64", "steps": 3}]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: httpx.post(f"{base}{URL}", json=b, timeout=120), bodies))
    for body, answer in zip(bodies, answers):
        assert answer.status_code == 200, answer.text
        payload = answer.json()
        assert isinstance(payload["created"], int) and len(payload["data"]) == body.get("n", 1)
        width, height = map(int, body["size"].split("x"))
        expected = pipe.generate(body["prompt"], body.get("negative_prompt"), seed=body["seed"],
                                 steps=body["steps"], guidance=body.get("guidance", 3.0), height=height, width=width,
                                 num_images=body.get("n", 1))
        for item, image in zip(payload["data"], expected):
            assert psnr(np.asarray(image, dtype=np.float32) / 255.0, decode_png(item)) >= 60.0


BAD = [
    ({}, 422, "prompt", "prompt is missing"),
    ({"prompt": "  "}, 422, "prompt", "non-empty string"),
    ({"prompt": "x", "size": "64"}, 422, "size", '"WxH"'),
    ({"prompt": "x", "size": "100x64"}, 422, "size", "multiples of 64"),
    ({"prompt": "x", "size": "4096x4096"}, 422, "size", "64..2048"),
    ({"prompt": "x", "n": 0}, 422, "n", "1..4"),
    ({"prompt": "x", "steps": 1000}, 422, "steps", "1..200"),
    ({"prompt": "x", "seed": "7"}, 422, "seed", "an integer"),
    ({"prompt": "x", "seed": 1.5}, 422, "seed", "an integer"),
    ({"prompt": "x", "guidance": True}, 422, "guidance", "finite number"),
    ({"prompt": "x", "response_format": "url"}, 422, "response_format", "b64_json"),
    ({"prompt": "x", "style": "vivid"}, 422, "style", "unknown field"),
    ({"prompt": ["a", "b"]}, 422, "prompt", "non-empty string"),
]


@pytest.mark.parametrize("body, status, param, message", BAD, ids=[b[2] + "-" + b[3][:12] for b in BAD])
def test_bad_input_is_a_json_4xx_naming_the_field(server, body, status, param, message):
    base, _ = server
    answer = httpx.post(f"{base}{URL}", json=body)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["param"] == param and message in error["message"]
    assert "accepted" in error["message"] and "fix" in error["message"] and "Traceback" not in answer.text


@pytest.mark.parametrize("raw, status, message", [
    (b'{"prompt": "x", "guidance": NaN}', 422, "guidance=nan"),
    (b'{"prompt": ', 400, "not valid JSON"),
    (b'["a red fox"]', 400, "JSON list"),
    (b'{"prompt": "' + b"a" * 70_000 + b'"}', 413, "at most 65536 bytes"),
], ids=["nan", "truncated", "list", "too-large"])
def test_malformed_bodies_are_json_4xx_and_the_server_keeps_serving(server, raw, status, message):
    base, _ = server
    answer = httpx.post(f"{base}{URL}", content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == status and message in answer.json()["error"]["message"]
    ok = httpx.post(f"{base}{URL}", json={"prompt": "still here", "steps": 1}, timeout=60)
    assert ok.status_code == 200


def test_health_and_metrics_count_what_was_served(server):
    base, _ = server
    assert httpx.get(f"{base}/healthz").json() == {"status": "alive"}
    before = _metric(httpx.get(f"{base}/metrics").text, 'k3trt_requests_total{status="200"}')
    assert httpx.post(f"{base}{URL}", json={"prompt": "counted", "steps": 1}, timeout=60).status_code == 200
    text = httpx.get(f"{base}/metrics").text
    assert _metric(text, 'k3trt_requests_total{status="200"}') == before + 1
    for name in ("k3trt_request_seconds_bucket", "k3trt_queue_wait_seconds_count", "k3trt_queue_depth",
                 "k3trt_unet_batch_images_count", 'k3trt_stage_seconds_count{stage="unet"}',
                 "process_resident_memory_bytes"):
        assert name in text


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_overload_gives_429_with_retry_after_and_no_5xx(pipe, tiny_artifacts):
    settings = ServeSettings(str(tiny_artifacts), default_size="64x64", max_batch=1, max_queue=1, warmup=False)
    with running(ImageService(settings, pipeline=pipe)) as base:
        wait_ready(base)
        body = {"prompt": "busy", "steps": 6}
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: httpx.post(f"{base}{URL}", json={**body, "seed": i}, timeout=120),
                                    range(6)))
    statuses = sorted(a.status_code for a in answers)
    assert 429 in statuses and 200 in statuses and max(statuses) < 500, statuses
    refused = next(a for a in answers if a.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["type"] == "rate_limit_error"


def test_deadline_gives_504_and_a_disconnect_cancels(pipe, tiny_artifacts):
    settings = ServeSettings(str(tiny_artifacts), default_size="64x64", timeout_s=0.5, warmup=False)
    service = ImageService(settings, pipeline=pipe)
    with running(service) as base:
        wait_ready(base)
        late = httpx.post(f"{base}{URL}", json={"prompt": "slow", "steps": 200}, timeout=120)
        assert late.status_code == 504 and "deadline" in late.json()["error"]["message"]
    settings = ServeSettings(str(tiny_artifacts), default_size="64x64", warmup=False)
    service = ImageService(settings, pipeline=pipe)
    with running(service) as base:
        wait_ready(base)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}{URL}", json={"prompt": "abandoned", "steps": 200}, timeout=1.0)
        end = time.monotonic() + 20
        while service.engine.pending and time.monotonic() < end:
            time.sleep(0.05)
        assert service.engine.pending == 0  # cancelled at a step boundary, long before 200 steps
        assert 'k3trt_requests_total{status="499"} 1.0' in httpx.get(f"{base}/metrics").text


def test_not_ready_answers_503(pipe, tiny_artifacts):
    gate = threading.Event()

    class SlowService(ImageService):
        def load(self):
            gate.wait(30)
            super().load()

    service = SlowService(ServeSettings(str(tiny_artifacts), warmup=False), pipeline=pipe)
    with running(service) as base:
        assert httpx.get(f"{base}/healthz").status_code == 200
        not_ready = httpx.get(f"{base}/readyz")
        assert not_ready.status_code == 503 and "loading" in not_ready.json()["error"]["message"]
        refused = httpx.post(f"{base}{URL}", json={"prompt": "too early"})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        gate.set()
        wait_ready(base)
