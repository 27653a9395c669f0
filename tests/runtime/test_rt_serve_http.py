"""`k3trt serve`'s HTTP layer on a real uvicorn server (loopback, in a thread) over the tiny artifacts."""
import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the HTTP service needs the `serve` extra (in `dev`)")
httpx = pytest.importorskip("httpx", reason="the HTTP tests need httpx (in `dev`)")

from k3trt.runtime import Pipeline  # noqa: E402
from k3trt.contract.tensor_metrics import psnr  # noqa: E402
from k3trt.runtime.serving.http import ImageService, ServeSettings  # noqa: E402
from serve_helpers import running, wait_ready  # noqa: E402

URL = "/v1/images/generations"


def decode_png(item: dict) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))), dtype=np.float32) / 255.0


@pytest.fixture(scope="module")
def pipe(tiny_artifacts):
    return Pipeline.from_artifacts(tiny_artifacts, "ort")


@pytest.fixture(scope="module")
def server(pipe, tiny_artifacts):
    # a queue for every image the concurrent test sends at once (5: one request has n=2), so that a slow machine,
    # which admits none of them before the last arrives, does not turn correct answers into 429s
    settings = ServeSettings(str(tiny_artifacts), default_size="64x64", default_steps=2, max_batch=4, max_queue=8)
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
        assert [item["seed"] for item in payload["data"]] == [body["seed"] + i for i in range(body.get("n", 1))]
        for item in payload["data"]:  # each image's own seed alone reproduces it
            [image] = pipe.generate(body["prompt"], body.get("negative_prompt"), seed=item["seed"],
                                    steps=body["steps"], guidance=body.get("guidance", 3.0), height=height,
                                    width=width)
            assert psnr(np.asarray(image, dtype=np.float32) / 255.0, decode_png(item)) >= 60.0


BAD = [  # OpenAI answers invalid parameters with 400 (the SDK's BadRequestError) and a string code
    ({}, 400, "prompt", "prompt is missing"),
    ({"prompt": None}, 400, "prompt", "prompt is missing"),
    ({"prompt": "x", "size": "64"}, 400, "size", '"WxH"'),
    ({"prompt": "x", "size": "100x64"}, 400, "size", "multiples of 64"),
    ({"prompt": "x", "size": "4096x4096"}, 400, "size", "64..2048"),
    ({"prompt": "x", "n": 0}, 400, "n", "1..4"),
    ({"prompt": "x", "steps": 1000}, 400, "steps", "1..200"),
    ({"prompt": "x", "seed": "7"}, 400, "seed", "an integer"),
    ({"prompt": "x", "seed": 1.5}, 400, "seed", "an integer"),
    ({"prompt": "x", "seed": 2 ** 64}, 400, "seed", "0..18446744073709551615"),
    ({"prompt": "x", "guidance": True}, 400, "guidance", "finite number"),
    ({"prompt": "x", "response_format": "url"}, 400, "response_format", "b64_json"),
    ({"prompt": "x", "sed": 1}, 400, "sed", "unknown field"),
    ({"prompt": "x", "quality": "ultra"}, 400, "quality", '"low"'),
    ({"prompt": "x", "output_format": "gif"}, 400, "output_format", '"png"'),
    ({"prompt": "x", "output_compression": 101}, 400, "output_compression", "0..100"),
    ({"prompt": "x", "background": "transparent"}, 400, "background", "opaque"),
    ({"prompt": ["a", "b"]}, 400, "prompt", "a string"),
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
    (b'{"prompt": "x", "guidance": NaN}', 400, "guidance=nan"),
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
    served = 'k3trt_requests_total{route="/v1/images/generations",status="200"}'
    before = _metric(httpx.get(f"{base}/metrics").text, served)
    assert httpx.post(f"{base}{URL}", json={"prompt": "counted", "steps": 1}, timeout=60).status_code == 200
    text = httpx.get(f"{base}/metrics").text
    assert _metric(text, served) == before + 1
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
        assert 'k3trt_requests_total{route="/v1/images/generations",status="499"} 1.0' in \
            httpx.get(f"{base}/metrics").text


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


# ----------------------------------------------------------------------------------------- /v1/images/edits
EDITS = "/v1/images/edits"


def b64_image(array, fmt: str = "PNG") -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def png_claiming(width: int, height: int) -> str:
    """A PNG whose header claims width x height pixels and holds none (what a decompression bomb looks like)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def picture():
    from k3trt.verify.task_demo import demo_image

    return demo_image()  # 64 x 128


@pytest.fixture(scope="module")
def mask():
    from k3trt.verify.task_demo import demo_mask

    return demo_mask()  # 64 x 128, 255 = repaint


def test_edits_return_the_images_the_library_calls_give(server, pipe, picture, mask):
    """Image to image, inpainting (data-URL image) and outpainting, sent at once, batched by the engine."""
    base, _ = server
    bodies = [{"prompt": "a fox", "image": b64_image(picture), "strength": 0.6, "steps": 4, "seed": 3, "n": 2},
              {"prompt": "a fox", "image": "data:image/png;base64," + b64_image(picture), "mask": b64_image(mask),
               "steps": 3, "seed": 4},
              {"prompt": "a fox", "image": b64_image(picture), "outpaint": "left=64", "steps": 3, "seed": 5,
               "guidance": 2.0, "negative_prompt": "blurry"}]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: httpx.post(f"{base}{EDITS}", json=b, timeout=120), bodies))
    expected = [pipe.img2img("a fox", picture, strength=0.6, steps=4, seed=3) +  # guidance 3; image i: seed 3 + i
                pipe.img2img("a fox", picture, strength=0.6, steps=4, seed=4),
                pipe.inpaint("a fox", picture, mask, steps=3, seed=4),  # guidance 4: the inpainting default
                pipe.inpaint("a fox", picture, outpaint="left=64", steps=3, seed=5, guidance=2.0,
                             negative_prompt="blurry")]
    for answer, images in zip(answers, expected):
        assert answer.status_code == 200, answer.text
        data = answer.json()["data"]
        assert len(data) == len(images)
        for item, image in zip(data, images):
            ours = decode_png(item)
            assert ours.shape == np.asarray(image).shape
            assert psnr(np.asarray(image, dtype=np.float32) / 255.0, ours) >= 60.0
    outpainted = decode_png(answers[2].json()["data"][0])
    np.testing.assert_array_equal(outpainted[:, 64:], picture / np.float32(255.0))  # the input, pasted back


def _edit(picture, **fields):
    return {"prompt": "x", "image": b64_image(picture), **fields}


BAD_EDITS = [
    (lambda p, m: {"prompt": "x"}, 400, "image", "image is missing"),
    (lambda p, m: _edit(p, image="not base64!"), 400, "image", "not a base64 image"),
    (lambda p, m: _edit(p, image=base64.b64encode(b"hello").decode()), 400, "image", "not a base64 image"),
    (lambda p, m: _edit(p, image=b64_image(p, "GIF")), 400, "image", "a GIF image"),
    (lambda p, m: _edit(p, image=b64_image(p[:60])), 400, "image", "multiples of 64"),
    (lambda p, m: _edit(p, image=png_claiming(4096, 64)), 400, "image", "image is 4096x64 px"),
    (lambda p, m: _edit(p, image=png_claiming(100_000, 100_000)), 400, "image", "far too large"),
    (lambda p, m: _edit(p, image=png_claiming(8192, 8192)), 400, "image", "image is 8192x8192 px"),
    (lambda p, m: _edit(p, mask=b64_image(m[:, :64])), 400, "mask", "mask is 64x64 px but the image is 128x64"),
    (lambda p, m: _edit(p, mask=b64_image(np.full((64, 128), 128, np.uint8))), 400, "mask", "grey"),
    (lambda p, m: _edit(p, mask="%%%"), 400, "mask", "not a base64 image"),
    (lambda p, m: _edit(p, strength=1.5), 400, "strength", "(0, 1]"),
    (lambda p, m: _edit(p, strength="high"), 400, "strength", "(0, 1]"),
    (lambda p, m: _edit(p, strength=0.05, steps=4), 400, "strength", "= 0 steps"),
    (lambda p, m: _edit(p, mask=b64_image(m), strength=0.5), 400, "strength", "image to image only"),
    (lambda p, m: _edit(p, mask=b64_image(m), outpaint="left=64"), 400, "outpaint", "both mask and outpaint"),
    (lambda p, m: _edit(p, outpaint="right=100"), 400, "outpaint", "not a multiple of 64"),
    (lambda p, m: _edit(p, outpaint=128), 400, "outpaint", "SIDE=PIXELS"),
    (lambda p, m: _edit(p, outpaint="left=4096"), 400, "outpaint", "image to 4224x64"),
    (lambda p, m: _edit(p, size="64x64", strength=0.5), 400, "size", "size=\"64x64\" for a 128x64 output"),
    (lambda p, m: _edit(p, n=9), 400, "n", "1..4"),
    (lambda p, m: {"image": b64_image(p)}, 400, "prompt", "prompt is missing"),
]


@pytest.mark.parametrize("make, status, param, message", BAD_EDITS,
                         ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD_EDITS)])
def test_bad_edits_are_a_400_naming_the_field_before_any_work(server, picture, mask, make, status, param, message):
    base, _ = server
    calls = _metric(httpx.get(f"{base}/metrics").text, "k3trt_unet_batch_images_count")
    answer = httpx.post(f"{base}{EDITS}", json=make(picture, mask), timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert "accepted" in error["message"] and "fix" in error["message"]
    assert _metric(httpx.get(f"{base}/metrics").text, "k3trt_unet_batch_images_count") == calls  # nothing ran


def test_the_edits_body_cap_is_enforced_while_streaming():
    """`_read_capped` stops reading one chunk past the cap (no content-length to refuse on), and refuses a
    declared length over it without reading at all; the edits cap is its own, larger constant."""
    import asyncio

    from k3trt.runtime.serving.http import _read_capped
    from k3trt.runtime.serving.schema import MAX_BODY_BYTES, MAX_EDIT_BODY_BYTES, BodyError, parse_body

    class Streamed:
        def __init__(self, headers):
            self.headers, self.read = headers, 0

        async def stream(self):
            for _ in range(64):  # 64 MiB offered
                self.read += 1
                yield b"x" * (1 << 20)

    chunked = Streamed({})
    raw = asyncio.run(_read_capped(chunked, MAX_EDIT_BODY_BYTES))
    assert chunked.read == MAX_EDIT_BODY_BYTES // (1 << 20) + 1 and len(raw) == chunked.read << 20
    with pytest.raises(BodyError, match=f"at most {MAX_EDIT_BODY_BYTES} bytes") as refused:
        parse_body(raw, MAX_EDIT_BODY_BYTES)
    assert refused.value.status == 413
    declared = Streamed({"content-length": str(MAX_EDIT_BODY_BYTES + 1)})
    with pytest.raises(BodyError, match="413|at most") as refused:
        asyncio.run(_read_capped(declared, MAX_EDIT_BODY_BYTES))
    assert refused.value.status == 413 and declared.read == 0
    assert MAX_EDIT_BODY_BYTES == 16 * 1024 * 1024 > MAX_BODY_BYTES


def test_an_edit_larger_than_the_generations_cap_is_served(server):
    from k3trt.runtime.serving.schema import MAX_BODY_BYTES

    base, _ = server
    noise = np.random.default_rng(0).integers(0, 256, (128, 256, 3), dtype=np.uint8)  # barely compressible
    body = {"prompt": "x", "image": b64_image(noise), "strength": 1.0, "steps": 1, "seed": 1}
    assert len(str(body)) > MAX_BODY_BYTES
    answer = httpx.post(f"{base}{EDITS}", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert decode_png(answer.json()["data"][0]).shape == (128, 256, 3)
    too_big = httpx.post(f"{base}{URL}", content=b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}',
                         headers={"content-type": "application/json"})
    assert too_big.status_code == 413 and f"at most {MAX_BODY_BYTES} bytes" in too_big.text


def test_an_edit_the_artifacts_were_not_exported_for_is_a_501(artifacts_copy, picture, mask):
    import json

    manifest = json.loads((artifacts_copy / "manifest.json").read_text())
    del manifest["onnx"]["unet_inpainting"]
    (artifacts_copy / "manifest.json").write_text(json.dumps(manifest))
    settings = ServeSettings(str(artifacts_copy), default_size="64x64", warmup=False)
    with running(ImageService(settings, pipeline=Pipeline.from_artifacts(artifacts_copy, "ort"))) as base:
        wait_ready(base)
        answer = httpx.post(f"{base}{EDITS}", json=_edit(picture, mask=b64_image(mask)), timeout=60)
        assert answer.status_code == 501, answer.text
        assert "not exported for inpaint: unet_inpainting missing" in answer.json()["error"]["message"]
        assert "--components unet_inpainting" in answer.json()["error"]["message"]
        served = httpx.post(f"{base}{EDITS}", json=_edit(picture, steps=2, strength=0.5), timeout=60)
        assert served.status_code == 200, served.text  # image to image needs only the base U-Net
