"""Animation as a job (POST /v1/jobs/animations) on the tiny preset (ONNX Runtime, fp32): progress in frames,
the fetched MP4 is the bytes `Pipeline.animate`'s frames encode to (same frames, same encoder settings) and decodes
to the frames and size asked for; cancel stops it at a step boundary; bad input is a 400 naming the field before
anything is queued."""
import time

import numpy as np
import pytest
from animation_helpers import decode_mp4
from serve_helpers import running, wait_ready

httpx = pytest.importorskip("httpx", reason="the HTTP tests need httpx (in `dev`)")
pytest.importorskip("fastapi", reason="the HTTP service needs the `serve` extra (in `dev`)")
pytest.importorskip("imageio_ffmpeg", reason="MP4 needs the `video` extra (imageio-ffmpeg)")

from k3trt.runtime import Pipeline  # noqa: E402
from k3trt.runtime.serving.animation_jobs import MAX_ANIMATION_PIXELS  # noqa: E402
from k3trt.runtime.serving.http import ImageService, ServeSettings  # noqa: E402
from k3trt.runtime.video import encode  # noqa: E402

URL = "/v1/jobs/animations"
DEFORUM = {"mode": "deforum", "prompt": "0: a red fox; 2: a snowy forest", "frames": 4, "size": "64x64",
           "steps": 8, "strength": 0.5, "zoom": "0: 1.1; 3: 1.0", "angle": 5, "seed": "0: 7; 2: 40", "fps": 6}


@pytest.fixture(scope="module")
def pipe(tiny_artifacts):
    return Pipeline.from_artifacts(tiny_artifacts, "ort")


@pytest.fixture(scope="module")
def served(pipe, tiny_artifacts):
    settings = ServeSettings(str(tiny_artifacts), default_size="64x64", default_steps=2, warmup=False, max_jobs=4)
    service = ImageService(settings, pipeline=pipe)
    with running(service) as base:
        wait_ready(base)
        yield base, service


def _poll(base: str, job: str, timeout: float = 240.0) -> list[dict]:
    seen, end = [], time.monotonic() + timeout
    while (status := httpx.get(f"{base}/v1/jobs/{job}").json())["status"] not in ("succeeded", "failed"):
        seen.append(status["progress"])
        assert time.monotonic() < end, status
        time.sleep(0.01)
    assert status["status"] == "succeeded", status
    return seen + [status["progress"]]


def test_an_animation_job_reports_frames_and_returns_the_library_s_video(served, pipe, tmp_path):
    base, _ = served
    submitted = httpx.post(base + URL, json=DEFORUM)
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert job["kind"] == "animation" and submitted.headers["location"] == f"/v1/jobs/{job['id']}"
    progress = _poll(base, job["id"])
    frames = [p["frame"] for p in progress]
    assert frames == sorted(frames) and frames[-1] == 4 and len(set(frames)) >= 2, progress
    fetched = httpx.get(f"{base}/v1/jobs/{job['id']}/result")
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "video/mp4"
    (tmp_path / "served.mp4").write_bytes(fetched.content)
    meta, decoded = decode_mp4(tmp_path / "served.mp4")
    assert len(decoded) == 4 and decoded[0].shape == (64, 64, 3)
    options = {k: v for k, v in DEFORUM.items() if k not in ("prompt", "size", "fps")}
    library = pipe.animate(DEFORUM["prompt"], width=64, height=64, **options)
    encode("MP4", library, tmp_path / "library.mp4", DEFORUM["fps"])
    _, expected = decode_mp4(tmp_path / "library.mp4")
    assert all(np.array_equal(a, b) for a, b in zip(decoded, expected))
    assert fetched.content == (tmp_path / "library.mp4").read_bytes()  # same frames bit for bit -> same bytes


def test_an_animation_job_as_gif_has_the_frames(served, pipe):
    base, _ = served
    body = {**DEFORUM, "prompt": "a red fox", "frames": 2, "zoom": 1.05, "seed": 3, "output_format": "gif"}
    submitted = httpx.post(base + URL, json=body)
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()["id"]
    _poll(base, job)
    fetched = httpx.get(f"{base}/v1/jobs/{job}/result")
    assert fetched.headers["content-type"] == "image/gif" and fetched.content.startswith(b"GIF8")
    import io

    from PIL import Image

    with Image.open(io.BytesIO(fetched.content)) as gif:
        assert gif.n_frames == 2 and gif.size == (64, 64)


def test_cancel_stops_an_animation_at_a_step(served):
    base, service = served
    job = httpx.post(base + URL, json={**DEFORUM, "frames": 20, "steps": 200}).json()["id"]
    end = time.monotonic() + 60
    while httpx.get(f"{base}/v1/jobs/{job}").json()["progress"]["step"] == 0:
        assert time.monotonic() < end, "the animation never started"
        time.sleep(0.01)
    cancelled = httpx.delete(f"{base}/v1/jobs/{job}").json()
    assert cancelled["status"] == "cancelled" and cancelled["progress"]["frame"] < 20
    end = time.monotonic() + 30
    while service.engine.pending:
        assert time.monotonic() < end, "the cancelled animation kept running"
        time.sleep(0.05)
    time.sleep(0.3)
    assert service.engine.pending == 0, "a frame was queued after the cancel"
    assert httpx.get(f"{base}/v1/jobs/{job}/result").json()["error"]["code"] == "job_cancelled"


@pytest.mark.parametrize("change, param", [
    ({"frames": 0}, "frames"),
    ({"frames": MAX_ANIMATION_PIXELS // (64 * 64) + 1}, "frames"),
    ({"mode": "spin"}, "mode"),
    ({"output_format": "avi"}, "output_format"),
    ({"fps": 0}, "fps"),
    ({"size": "65x64"}, "size"),
    ({"strength": "0: 0.5; 2: 1.5"}, "strength"),
    ({"init_image": "/etc/passwd"}, "init_image"),
    ({"prompt": None}, "prompt"),
    ({"frames_per_key": 2}, "frames_per_key"),  # a zoom option with mode deforum
], ids=["no-frames", "over-budget", "mode", "format", "fps", "size", "strength", "init-image", "prompt", "other-mode"])
def test_bad_animation_bodies_are_400_naming_the_field_before_queueing(served, change, param):
    base, service = served
    before = _jobs_held(base)
    refused = httpx.post(base + URL, json={**DEFORUM, **change})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert service.engine.pending == 0
    assert _jobs_held(base) == before  # no job was made


def _jobs_held(base: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)}
    return sum(sample.value for sample in families["k3trt_jobs"].samples) if "k3trt_jobs" in families else 0.0


def test_a_zoom_in_job_reorders_its_frames_as_the_library_does(served, pipe, tmp_path):
    """zoom-in makes its frames last-first: the job holds them until their turn; the video is the library's."""
    base, _ = served
    body = {"mode": "zoom-in", "prompt": "a lighthouse", "frames": 3, "frames_per_key": 2, "size": "192x192",
            "steps": 2, "seed": 11, "fps": 4}
    submitted = httpx.post(base + URL, json=body)
    assert submitted.status_code == 202, submitted.text
    _poll(base, submitted.json()["id"])
    fetched = httpx.get(f"{base}/v1/jobs/{submitted.json()['id']}/result")
    library = pipe.animate("a lighthouse", mode="zoom-in", frames=3, frames_per_key=2, width=192, height=192,
                           steps=2, seed=11)
    encode("MP4", library, tmp_path / "library.mp4", 4)
    assert fetched.headers["content-type"] == "video/mp4"
    assert fetched.content == (tmp_path / "library.mp4").read_bytes()
