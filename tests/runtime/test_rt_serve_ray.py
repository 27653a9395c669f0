"""Ray Serve scale-out: 2 local replicas behind Ray's proxy serve the same API and the same images (slow)."""
import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_helpers import free_port, serve_process

pytest.importorskip("fastapi", reason="the HTTP service needs the `serve` extra (in `dev`)")

from k3trt.runtime.serving.http import ServeSettings  # noqa: E402
from k3trt.runtime.serving.ray_app import deployment_options  # noqa: E402


def test_deployment_options_expose_replicas_and_autoscaling():
    settings = ServeSettings("art", max_batch=4, max_queue=8)
    fixed = deployment_options(settings, 2, None)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0} and fixed["max_ongoing_requests"] == 12
    scaled = deployment_options(ServeSettings("art", backend="trt"), 1, 4)
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4}
    assert scaled["ray_actor_options"]["num_gpus"] == 1 and "num_replicas" not in scaled
    from k3trt.contract.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="--max-replicas 1 < --replicas 2"):
        deployment_options(settings, 2, 1)


@pytest.mark.slow
def test_two_replicas_spread_requests_and_match_the_single_process_service(tiny_artifacts):
    ray = pytest.importorskip("ray", reason="needs the `ray` extra")
    from ray import serve
    httpx = pytest.importorskip("httpx")
    from PIL import Image

    from k3trt.runtime import Pipeline
    from k3trt.contract.tensor_metrics import psnr
    from k3trt.runtime.serving.ray_app import build_application

    settings = ServeSettings(str(tiny_artifacts), default_size="64x64", default_steps=2, max_batch=2,
                             backend_options=(("threads", 1),))
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(settings, replicas=2), name="k3trt", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
        bodies = [{"prompt": f"a red fox number {i}", "seed": i, "steps": 2} for i in range(12)]
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda b: httpx.post(f"{base}/v1/images/generations", json=b, timeout=300),
                                    bodies))
        assert [a.status_code for a in answers] == [200] * len(bodies)
        replicas = {a.headers["x-k3trt-replica"] for a in answers}
        assert len(replicas) == 2, replicas  # Ray spread the requests over both replicas
        bad = httpx.post(f"{base}/v1/images/generations", json={"prompt": "x", "n": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"  # OpenAI: 400, not 422
    finally:
        serve.shutdown()
        ray.shutdown()
    pipe = Pipeline.from_artifacts(tiny_artifacts, "ort")
    for body, answer in zip(bodies[:4], answers):
        image = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
        expected = pipe.generate(body["prompt"], seed=body["seed"], steps=2, height=64, width=64)[0]
        assert psnr(np.asarray(expected, np.float32) / 255, np.asarray(image, np.float32) / 255) >= 60.0


@pytest.mark.slow
def test_serve_ray_cli_serves_and_exits_0_on_sigterm(tiny_artifacts):
    """`k3trt serve --ray`: ready, answers, and SIGTERM ends it with exit 0 (Ray installs aborting handlers)."""
    import signal
    import time

    pytest.importorskip("ray", reason="needs the `ray` extra")
    httpx = pytest.importorskip("httpx")
    with serve_process(tiny_artifacts, "--ray", "--replicas", "1", "--max-replicas", "2", "--default-resolution",
                       "64x64", "--default-steps", "1", "--threads", "1") as (base, server):
        end = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end and server.poll() is None, "never became ready"
            time.sleep(1)
        answer = httpx.post(f"{base}/v1/images/generations", json={"prompt": "a fox"}, timeout=120)
        assert answer.status_code == 200
        server.send_signal(signal.SIGTERM)
        assert server.wait(120) == 0
    assert "1..2 replicas" in server.stdout.read()


def _requests_total(text: str) -> float:
    """k3trt_requests_total summed over its label sets, read with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text) if family.name == "k3trt_requests"
               for s in family.samples if s.name == "k3trt_requests_total")


@pytest.mark.slow
def test_each_replica_has_its_own_monotonic_metrics(tiny_artifacts):
    """Two replicas, `--replica-metrics-port`: each replica's counters, scraped 6 times on its own port between
    bursts of requests, never go down, both replicas served, and together they count every request sent
    (the shared /metrics answers from whichever replica Ray picks: that is what jumps)."""
    ray = pytest.importorskip("ray", reason="needs the `ray` extra")
    from ray import serve
    httpx = pytest.importorskip("httpx")

    from k3trt.runtime.serving.ray_app import build_application

    settings = ServeSettings(str(tiny_artifacts), default_size="64x64", default_steps=1, max_batch=2,
                             backend_options=(("threads", 1),))
    port, metrics_base = free_port(), free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(settings, replicas=2, metrics_port=metrics_base), name="k3trt",
                  route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
        scrapes: dict[int, list[float]] = {metrics_base: [], metrics_base + 1: []}
        sent = 0
        for burst in range(6):
            with ThreadPoolExecutor(4) as pool:
                codes = list(pool.map(lambda i: httpx.post(f"{base}/v1/images/generations", timeout=300, json={
                    "prompt": f"a fox {burst}-{i}", "seed": i, "steps": 1}).status_code, range(4)))
            assert codes == [200] * 4
            sent += 4
            for replica_port, seen in scrapes.items():
                seen.append(_requests_total(httpx.get(f"http://127.0.0.1:{replica_port}/metrics", timeout=30).text))
    finally:
        serve.shutdown()
        ray.shutdown()
    for replica_port, seen in scrapes.items():
        assert seen == sorted(seen), (replica_port, seen)  # monotonic over the 6 scrapes
        assert seen[-1] > 0, (replica_port, seen)  # this replica served requests
    assert sum(seen[-1] for seen in scrapes.values()) == sent
