"""The asynchronous job routes: long work without a long-held connection (a proxy's 60 s read timeout).

POST /v1/jobs/images/generations and /v1/jobs/images/edits take the same bodies as the synchronous routes and
answer 202 with the job (`id`, `status`, `queue_position`, `progress`); GET /v1/jobs/{id} polls it; GET
/v1/jobs/{id}/result answers the ImagesResponse once it succeeded (409 `job_not_finished` + Retry-After before,
the job's own error after a failure); DELETE /v1/jobs/{id} cancels it (at the next step boundary). Unknown or
expired ids are 404. The store (jobs.py) is bounded by --max-jobs and --job-ttl.
"""
from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from k3trt.contract.errors import K3TRTError
from k3trt.runtime.serving.middleware import error_payload
from k3trt.runtime.serving.schema import FieldError


def add_job_routes(app, images) -> None:
    store = app.state.jobs

    async def submit(request: Request, route: str):
        work = await images.admit(request, route)
        if not hasattr(work, "jobs"):
            return work  # the refusal
        if work.options.stream:
            work.cancel()
            return images.fail(request, _field("stream", "stream=true on a job route", "omit stream: poll the job "
                                               "(GET /v1/jobs/ID) for its progress"))

        async def finish():
            try:
                items = await work.items(await work.result())
            except K3TRTError as exc:
                status, body, _ = images.fail_body(exc, {"state": {"request_id": request.scope["state"]
                                                                   ["request_id"]}})
                return status, body
            images.service.metrics.images.labels(work.task).inc(len(items))
            return 200, work.body(items)

        try:
            record = store.submit(route, work, finish)
        except K3TRTError as exc:
            return images.fail(request, exc)
        return JSONResponse(record.describe(), status_code=202, headers={"Location": f"/v1/jobs/{record.id}",
                                                                         **images.headers(work)})

    async def generations(request: Request):
        return await submit(request, "generations")

    async def edits(request: Request):
        return await submit(request, "edits")

    async def status(job_id: str, request: Request):
        record = store.get(job_id)
        if record is None:
            return _missing(job_id, request)
        described = record.describe()
        if record.status == "failed":
            described["error"] = record.result["error"]
        return described

    async def result(job_id: str, request: Request):
        record = store.get(job_id)
        if record is None:
            return _missing(job_id, request)
        if record.status == "cancelled":
            return JSONResponse(error_payload(409, f"job {job_id} was cancelled", "invalid_request_error",
                                              "job_cancelled", request.scope), status_code=409)
        if record.finished_at is None:
            return JSONResponse(error_payload(409, f"job {job_id} is {record.describe()['status']}",
                                              "invalid_request_error", "job_not_finished", request.scope),
                                status_code=409, headers={"Retry-After": "1"})
        return JSONResponse(record.result, status_code=record.error_status or 200)

    async def cancel(job_id: str, request: Request):
        record = store.cancel(job_id)
        return _missing(job_id, request) if record is None else record.describe()

    app.add_api_route("/v1/jobs/images/generations", generations, methods=["POST"], status_code=202,
                      summary="submit a text-to-image job (same body as /v1/images/generations)")
    app.add_api_route("/v1/jobs/images/edits", edits, methods=["POST"], status_code=202,
                      summary="submit an edit job (same body as /v1/images/edits)")
    app.add_api_route("/v1/jobs/{job_id}", status, methods=["GET"], summary="a job's status, queue position, progress")
    app.add_api_route("/v1/jobs/{job_id}/result", result, methods=["GET"], summary="a finished job's images")
    app.add_api_route("/v1/jobs/{job_id}", cancel, methods=["DELETE"], summary="cancel a job")


def _missing(job_id: str, request: Request):
    return JSONResponse(error_payload(404, f"no job {job_id!r} (never submitted, or expired after --job-ttl)",
                                      "invalid_request_error", "job_not_found", request.scope), status_code=404)


def _field(param: str, what: str, fix: str):
    return FieldError(param, what, accepted="a request without stream", fix=fix)
