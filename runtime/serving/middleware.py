"""What every request goes through, as one pure ASGI middleware: its request ID, the API key, the access log line
and the request metrics.

- `X-Request-ID`: the client's (printable ASCII, up to 128 characters) or a new one; echoed on every answer and
  written into error bodies by the routes (`request_id(scope)`).
- `--api-key` (or K3TRT_API_KEY): `Authorization: Bearer KEY`, compared with `hmac.compare_digest` (constant time);
  the probes and /metrics stay open so orchestrators and Prometheus need no secret. A CORS preflight (OPTIONS) is
  answered by the CORS middleware outside this one, before any key is asked for.
- One access log line per request on the `k3trt.access` logger at INFO: method, path, route, status, latency,
  queue wait, images, request ID (`--json-logs`: one JSON object per line).
Pure ASGI rather than Starlette's BaseHTTPMiddleware: that one runs the app in a separate task, which breaks
streaming responses and client-disconnect detection.
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid

from k3trt.runtime.serving.telemetry import route_label

access_log = logging.getLogger("k3trt.access")
log = logging.getLogger("k3trt")
OPEN_PATHS = ("/healthz", "/readyz", "/metrics")  # never behind the API key
UNCOUNTED = OPEN_PATHS  # probes and scrapes are not API traffic in the request metrics
REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def request_id(scope) -> str:
    return scope.get("state", {}).get("request_id", "")


def note(scope, **facts) -> None:
    """Facts a route adds to its access log line (queue_wait, images, task)."""
    scope.setdefault("state", {}).setdefault("access", {}).update(facts)


def error_payload(status: int, message: str, kind: str, code: str | None, scope, param: str | None = None) -> dict:
    """OpenAI's error envelope, plus the request ID (the SDK ignores fields it does not know)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code,
                      "request_id": request_id(scope)}}


class RequestMiddleware:
    def __init__(self, app, *, metrics, api_key: str | None = None):
        self.app, self.metrics, self.api_key = app, metrics, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        rid = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started, answer = time.monotonic(), {"status": 0}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
                await self._send_error(scope, send_with_id, 401, "missing or wrong API key", "invalid_request_error",
                                       "invalid_api_key", [(b"www-authenticate", b"Bearer")])
            else:
                await self.app(scope, receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - answered here, so uvicorn keeps the connection and logs nothing
            if _client_left(exc):
                answer["status"] = answer["status"] or 499
            else:
                log.exception("unexpected error (request %s)", rid)
                if not answer["status"]:
                    await self._send_error(scope, send_with_id, 500, f"internal error ({type(exc).__name__})",
                                           "server_error", "internal_error")
        finally:
            self._account(scope, answer["status"] or 499, time.monotonic() - started)

    def _authorized(self, headers: dict) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())

    async def _send_error(self, scope, send, status: int, message: str, kind: str, code: str,
                          headers: list | None = None) -> None:
        body = json.dumps(error_payload(status, message, kind, code, scope)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *(headers or [])]})
        await send({"type": "http.response.body", "body": body})

    def _account(self, scope, status: int, seconds: float) -> None:
        path, route = scope["path"], route_label(scope["path"])
        if path not in UNCOUNTED:
            self.metrics.answered(route, status, seconds)
        facts = scope.get("state", {}).get("access", {})
        line = {"method": scope["method"], "path": path, "route": route, "status": status,
                "latency_s": round(seconds, 4), "queue_wait_s": facts.get("queue_wait"),
                "images": facts.get("images", 0), "task": facts.get("task"), "request_id": request_id(scope)}
        access_log.info("%s %s %d %.3fs queue=%s images=%d id=%s", line["method"], path, status, seconds,
                        "-" if line["queue_wait_s"] is None else f"{line['queue_wait_s']:.3f}s", line["images"],
                        line["request_id"], extra={"fields": line})


def _client_left(exc: BaseException) -> bool:
    """The client went away mid-request (Starlette's ClientDisconnect, or a send on a closed socket)."""
    from starlette.requests import ClientDisconnect

    return isinstance(exc, (ClientDisconnect, ConnectionError)) or type(exc).__name__ == "ClientDisconnected"


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message, and an access line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(json_logs: bool = False, level: int = logging.INFO) -> None:
    """The k3trt loggers (access lines included) to stderr, as text or JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_logs else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("k3trt")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
