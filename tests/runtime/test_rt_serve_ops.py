"""The HTTP layer for operators: hostile bodies answered in the envelope on a kept connection, client aborts,
body timeouts, request IDs and the access log, API keys, CORS, OpenAPI, Prometheus metrics parsed by
prometheus_client's own parser, progress streaming and the asynchronous job API."""
import gc
import http.client
import json
import logging
import socket
import time

import pytest
from serve_helpers import running, wait_ready

httpx = pytest.importorskip("httpx", reason="the HTTP tests need httpx (in `dev`)")
pytest.importorskip("fastapi", reason="the HTTP service needs the `serve` extra (in `dev`)")

from k3trt.runtime import Pipeline  # noqa: E402
from k3trt.runtime.serving.http import ImageService, ServeSettings  # noqa: E402

URL = "/v1/images/generations"


@pytest.fixture(scope="module")
def pipe(tiny_artifacts):
    return Pipeline.from_artifacts(tiny_artifacts, "ort")


def settings(tiny_artifacts, **overrides) -> ServeSettings:
    return ServeSettings(str(tiny_artifacts), **{"default_size": "64x64", "default_steps": 2, "warmup": False,
                                                 **overrides})


@pytest.fixture(scope="module")
def served(pipe, tiny_artifacts):
    service = ImageService(settings(tiny_artifacts, body_timeout_s=1.0, max_jobs=3), pipeline=pipe)
    with running(service) as base:
        wait_ready(base)
        yield base, service


def host_port(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").split(":")
    return host, int(port)


@pytest.mark.parametrize("raw, code", [
    (b"[" * 60_000, "json_too_deep"),
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "integer_too_long"),
    (b'{"prompt": "x", "n": [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]}', "json_too_deep"),
    (b'{"prompt": ', "invalid_json"),
    (b"\x89PNG not json", "invalid_json"),
], ids=["60k-brackets", "5000-digit-seed", "nested-field", "truncated", "binary"])
def test_hostile_bodies_are_400_in_the_envelope_and_the_connection_is_kept(served, raw, code):
    base, _ = served
    connection = http.client.HTTPConnection(*host_port(base), timeout=60)
    connection.request("POST", URL, body=raw, headers={"content-type": "application/json"})
    refused = connection.getresponse()
    body = json.loads(refused.read())
    assert refused.status == 400 and body["error"]["code"] == code, body
    assert body["error"]["request_id"] == refused.getheader("x-request-id")
    first_socket = connection.sock
    connection.request("POST", URL, body=json.dumps({"prompt": "still here", "steps": 1}),
                       headers={"content-type": "application/json"})
    served_answer = connection.getresponse()
    assert served_answer.status == 200 and json.loads(served_answer.read())["data"]
    assert connection.sock is first_socket  # the same keep-alive connection answered both
    connection.close()


def test_an_aborted_upload_is_a_499_logged_without_traceback(served, caplog):
    base, _ = served
    caplog.set_level(logging.INFO)
    with socket.create_connection(host_port(base)) as raw:
        raw.sendall(b"POST /v1/images/edits HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    b"content-length: 100000\r\n\r\n{\"prompt\": \"x\", \"image\": \"AAAA")
    line = 'k3trt_requests_total{route="/v1/images/edits",status="499"}'
    end = time.monotonic() + 10
    while line not in httpx.get(f"{base}/metrics").text:
        assert time.monotonic() < end, "the abort was not counted as 499"
        time.sleep(0.05)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.text


def test_a_stalled_body_gets_408_within_the_body_timeout(served):
    base, _ = served
    with socket.create_connection(host_port(base), timeout=30) as raw:
        raw.sendall(b"POST /v1/images/generations HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    b"content-length: 50\r\n\r\n{\"prompt\": ")
        started = time.monotonic()
        answer = b""
        while b'"request_id"' not in answer and (chunk := raw.recv(4096)):  # headers, then the JSON body
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b'"code":"body_timeout"' in answer.replace(b" ", b"")
    assert time.monotonic() - started < 10


def test_request_ids_are_echoed_generated_and_in_the_access_log(served, caplog):
    base, _ = served
    caplog.set_level(logging.INFO, logger="k3trt.access")
    given = httpx.post(f"{base}{URL}", json={"prompt": "x", "steps": 1}, headers={"x-request-id": "trace-42"},
                       timeout=60)
    assert given.status_code == 200 and given.headers["x-request-id"] == "trace-42"
    refused = httpx.post(f"{base}{URL}", json={"prompt": "x", "size": "1x1"})
    generated = refused.headers["x-request-id"]
    assert len(generated) == 32 and refused.json()["error"]["request_id"] == generated
    lines = {r.fields["request_id"]: r.fields for r in caplog.records if r.name == "k3trt.access"}
    assert lines["trace-42"]["status"] == 200 and lines["trace-42"]["images"] == 1
    assert lines["trace-42"]["queue_wait_s"] is not None and lines["trace-42"]["route"] == URL
    assert lines[generated]["status"] == 400 and lines[generated]["method"] == "POST"


def test_api_key_cors_and_openapi(pipe, tiny_artifacts):
    service = ImageService(settings(tiny_artifacts, api_key="s3cret", cors_allow_origins=("https://ui.example",)),
                           pipeline=pipe)
    with running(service) as base:
        wait_ready(base)  # the probes need no key
        missing = httpx.post(f"{base}{URL}", json={"prompt": "x"})
        wrong = httpx.get(f"{base}/v1/models", headers={"authorization": "Bearer nope"})
        assert missing.status_code == wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{base}/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
        preflight = httpx.options(f"{base}{URL}", headers={"origin": "https://ui.example",
                                                            "access-control-request-method": "POST",
                                                            "access-control-request-headers": "authorization"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://ui.example"
        spec = httpx.get(f"{base}/openapi.json", headers={"authorization": "Bearer s3cret"}).json()
        assert httpx.get(f"{base}/docs", headers={"authorization": "Bearer s3cret"}).status_code == 404  # no CDN page
    body = spec["paths"][URL]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "size", "n", "seed", "output_format"} <= set(body["properties"])
    edits = spec["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in edits and "image" in edits["application/json"]["schema"]["required"]


def test_openapi_models_list_only_fields_the_parser_accepts():
    from k3trt.runtime.serving import openapi, schema

    accepted = set(schema.FIELDS + schema.EDIT_FIELDS + schema.OPENAI_IGNORED + schema.OPENAI_MAPPED)
    assert set(openapi.GenerationBody.model_fields) <= accepted
    assert set(openapi.EditBody.model_fields) <= accepted


def test_metrics_parse_with_prometheus_client_and_count_every_outcome(served):
    from prometheus_client.parser import text_string_to_metric_families

    base, _ = served
    assert httpx.post(f"{base}{URL}", json={"prompt": "x", "steps": 1}, timeout=60).status_code == 200
    assert httpx.post(f"{base}{URL}", json={"prompt": "x", "n": 0}).status_code == 400
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)}
    names = {s.name for f in families.values() for s in f.samples}
    assert not [n for n in names if n.endswith("_created")]
    latency = {(s.labels["route"], s.labels["status"]) for s in families["k3trt_request_seconds"].samples
               if s.name.endswith("_count")}
    assert {(URL, "200"), (URL, "400")} <= latency
    [info] = families["k3trt_build_info"].samples
    assert info.value == 1 and info.labels["backend"] == "ort" and len(info.labels["artifact_hash"]) == 16
    assert "unet=fp32" in info.labels["precisions"] and info.labels["version"]
    waits = {s.labels["task"] for s in families["k3trt_queue_wait_seconds"].samples}
    assert "generate" in waits


def test_stream_sends_progress_for_every_step_then_the_image(served):
    base, _ = served
    events = []
    with httpx.stream("POST", f"{base}{URL}", json={"prompt": "x", "steps": 4, "n": 2, "seed": 1, "stream": True},
                      timeout=60) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        for line in answer.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    progress = [(e["image_index"], e["step"]) for e in events if e["type"] == "k3trt.progress"]
    assert sorted(progress) == [(i, s) for i in range(2) for s in range(1, 5)]
    done = [e for e in events if e["type"] == "image_generation.completed"]
    assert [e["seed"] for e in done] == [1, 2] and all(e["b64_json"] and e["size"] == "64x64" for e in done)


def test_the_sdk_reads_the_stream(served):
    openai = pytest.importorskip("openai", reason="the OpenAI SDK tests need `openai` (in `dev`)")
    base, _ = served
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    events = list(client.images.generate(prompt="x", stream=True, extra_body={"steps": 3}))
    assert [e.type for e in events] == ["k3trt.progress"] * 3 + ["image_generation.completed"]
    assert events[-1].b64_json


def test_a_job_can_be_polled_fetched_and_cancelled(served):
    base, service = served
    submitted = httpx.post(f"{base}/v1/jobs/images/generations", json={"prompt": "x", "steps": 3, "seed": 5})
    assert submitted.status_code == 202 and submitted.headers["location"] == f"/v1/jobs/{submitted.json()['id']}"
    job = submitted.json()["id"]
    end = time.monotonic() + 60
    while (status := httpx.get(f"{base}/v1/jobs/{job}").json())["status"] != "succeeded":
        assert time.monotonic() < end and status["status"] in ("queued", "running"), status
        time.sleep(0.05)
    assert status["progress"] == {"step": 3, "steps": 3}
    result = httpx.get(f"{base}/v1/jobs/{job}/result").json()
    assert result["data"][0]["seed"] == 5
    slow = httpx.post(f"{base}/v1/jobs/images/generations", json={"prompt": "x", "steps": 200}).json()["id"]
    cancelled = httpx.delete(f"{base}/v1/jobs/{slow}").json()
    assert cancelled["status"] == "cancelled"
    assert httpx.get(f"{base}/v1/jobs/{slow}/result").json()["error"]["code"] == "job_cancelled"
    end = time.monotonic() + 20
    while service.engine.pending:
        assert time.monotonic() < end, "the cancelled job kept running"
        time.sleep(0.05)
    assert httpx.get(f"{base}/v1/jobs/unknown").status_code == 404


def test_the_job_store_is_bounded(served):
    base, service = served
    ids = [httpx.post(f"{base}/v1/jobs/images/generations", json={"prompt": "x", "steps": 200}).json()["id"]
           for _ in range(3)]
    refused = httpx.post(f"{base}/v1/jobs/images/generations", json={"prompt": "x", "steps": 1})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    for job in ids:
        httpx.delete(f"{base}/v1/jobs/{job}")
    end = time.monotonic() + 20
    while service.engine.pending:
        assert time.monotonic() < end
        time.sleep(0.05)


def test_a_disconnect_cancels_and_logs_no_error(served, caplog):
    base, service = served
    caplog.set_level(logging.INFO)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}{URL}", json={"prompt": "abandoned", "steps": 200}, timeout=0.5)
    end = time.monotonic() + 20
    while service.engine.pending:
        assert time.monotonic() < end
        time.sleep(0.05)
    time.sleep(0.3)
    gc.collect()  # "Future exception was never retrieved" is logged when the future is collected
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_fatal_load_error_fails_liveness_and_refuses_without_retry_after(artifacts_copy):
    (artifacts_copy / "manifest.json").write_text("{not json")
    service = ImageService(settings(artifacts_copy))
    with running(service) as base:
        end = time.monotonic() + 30
        while httpx.get(f"{base}/healthz").status_code == 200:
            assert time.monotonic() < end, "liveness never failed"
            time.sleep(0.05)
        assert httpx.get(f"{base}/healthz").json()["status"] == "failed"
        refused = httpx.post(f"{base}{URL}", json={"prompt": "x"})
        assert refused.status_code == 503 and "retry-after" not in refused.headers
        assert refused.json()["error"]["code"] == "load_failed"


def test_retry_after_never_outlasts_the_keep_alive():
    from k3trt.contract.errors import InvalidArgumentError
    from k3trt.runtime.serving.http import MAX_RETRY_AFTER_S

    service = ImageService(settings("art"))  # nothing loads: only the settings and the latency average count
    service.recent_latency_s = 10_000.0  # a very slow recent request
    assert int(service.retry_after()) == MAX_RETRY_AFTER_S < service.settings.keep_alive_s
    with pytest.raises(InvalidArgumentError, match="keep_alive_s=30"):
        settings("art", keep_alive_s=30)
    with pytest.raises(InvalidArgumentError, match="timeout_s=nan"):
        settings("art", timeout_s=float("nan"))


def test_json_logs_carry_the_access_fields():
    from k3trt.runtime.serving.middleware import JsonFormatter

    record = logging.LogRecord("k3trt.access", logging.INFO, __file__, 1, "POST %s", ("/x",), None)
    record.fields = {"status": 200, "request_id": "abc", "queue_wait_s": 0.5}
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "POST /x" and line["status"] == 200 and line["request_id"] == "abc"
    assert line["level"] == "INFO" and line["logger"] == "k3trt.access"
