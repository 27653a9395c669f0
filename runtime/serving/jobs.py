"""Asynchronous jobs: submit -> id, poll (status, queue position, progress), fetch the result, cancel.

Generic on purpose: a job is anything with the `Work` shape (progress, queue position, cancel, and an awaitable
result), so other long work (animation, say) can run as a job next to image requests. The store is bounded in
number (`max_jobs`: a submit past it is refused with 429 unless finished jobs can be dropped) and in age
(`ttl_s`: a finished job's result is kept this long after it finished, then forgotten: 404).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Any, Awaitable, Callable, Protocol

from k3trt.contract.errors import K3TRTError

TERMINAL = ("succeeded", "failed", "cancelled")
log = logging.getLogger("k3trt")


class Work(Protocol):
    def progress(self) -> tuple[int, int]: ...  # (steps done, steps in all)

    def position(self) -> int | None: ...  # requests queued before it; None once running

    def cancel(self) -> None: ...


class JobLimitError(K3TRTError):
    """Every job slot holds an unfinished job (HTTP 429)."""


@dataclasses.dataclass
class JobRecord:
    id: str
    kind: str
    work: Any
    created: float = dataclasses.field(default_factory=time.time)
    status: str = "queued"  # queued | running | succeeded | failed | cancelled
    finished_at: float | None = None  # monotonic
    result: Any = None  # the answer body on success, the error body on failure
    error_status: int | None = None
    task: asyncio.Task | None = None

    def describe(self) -> dict:
        done, total = self.work.progress()
        status = self.status
        if status == "queued" and self.work.position() is None:
            status = "running"
        return {"id": self.id, "object": "k3trt.job", "kind": self.kind, "status": status,
                "created": int(self.created), "queue_position": self.work.position() if status == "queued" else None,
                "progress": {"step": done, "steps": total}, "result_url": f"/v1/jobs/{self.id}/result"}


class JobStore:
    def __init__(self, max_jobs: int = 64, ttl_s: float = 600.0, on_change: Callable[[dict], None] | None = None):
        self.max_jobs, self.ttl_s, self.on_change = max_jobs, ttl_s, on_change
        self._jobs: dict[str, JobRecord] = {}

    def submit(self, kind: str, work, finish: Callable[[], Awaitable[tuple[int, Any]]]):
        """Hold `work` as a new job; `finish()` awaits its result as (HTTP status, body)."""
        self._expire()
        if len(self._jobs) >= self.max_jobs:
            work.cancel()
            raise JobLimitError(f"{len(self._jobs)} jobs are unfinished or awaiting fetch",
                                accepted=f"at most {self.max_jobs} (--max-jobs)",
                                fix="fetch or cancel finished jobs (DELETE /v1/jobs/ID), or retry later")
        record = JobRecord(uuid.uuid4().hex, kind, work)
        self._jobs[record.id] = record
        record.task = asyncio.get_running_loop().create_task(self._run(record, finish))
        self._count()
        return record

    async def _run(self, record: JobRecord, finish) -> None:
        try:
            status, body = await finish()
        except Exception as exc:  # noqa: BLE001 - a bug: the job fails with it instead of an unretrieved task error
            log.exception("job %s failed", record.id)
            status, body = 500, {"error": {"message": f"internal error ({type(exc).__name__})",
                                           "type": "server_error", "param": None, "code": "internal_error"}}
        if record.status != "cancelled":
            record.status = "succeeded" if status == 200 else "failed"
        record.result, record.error_status = body, None if status == 200 else status
        record.finished_at = time.monotonic()
        self._count()

    def get(self, job_id: str) -> JobRecord | None:
        self._expire()
        return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> JobRecord | None:
        record = self.get(job_id)
        if record is not None and record.status not in TERMINAL:
            record.status = "cancelled"
            record.work.cancel()  # the engine stops it at the next step boundary
            self._count()
        return record

    def cancel_all(self) -> None:
        for job_id in list(self._jobs):
            self.cancel(job_id)

    def _expire(self) -> None:
        now = time.monotonic()
        for job_id, record in list(self._jobs.items()):
            if record.finished_at is not None and now - record.finished_at > self.ttl_s:
                del self._jobs[job_id]
        if len(self._jobs) >= self.max_jobs:  # full: drop the oldest finished first
            finished = sorted((r for r in self._jobs.values() if r.finished_at is not None),
                              key=lambda r: r.finished_at)
            for record in finished[:len(self._jobs) - self.max_jobs + 1]:
                del self._jobs[record.id]

    def _count(self) -> None:
        if self.on_change is not None:
            counts = dict.fromkeys(("queued", *TERMINAL), 0)
            for record in self._jobs.values():
                counts[record.status] = counts.get(record.status, 0) + 1
            self.on_change(counts)
