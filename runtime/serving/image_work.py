"""One image request in flight: its engine jobs, their progress, the answer body, and how each error is answered.

An `n`-image request runs as `n` one-image engine jobs with seeds `seed, seed+1, ...` (mod 2^64): each image's
`seed` field alone reproduces it (`n=1` with that seed, or `Pipeline.generate(seed=...)`), and the engine still
batches them into shared U-Net calls. The same object serves a plain answer, a server-sent-event stream and an
asynchronous job (jobs.py's `Work` shape).
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import time

from k3trt.contract.errors import ArtifactError, BackendBusyError, K3TRTError
from k3trt.runtime.denoise_loop import GenerationCancelled
from k3trt.runtime.pipeline import to_pil
from k3trt.runtime.serving.engine import DeadlineExceededError, NotAcceptingError, QueueFullError
from k3trt.runtime.serving.jobs import JobLimitError
from k3trt.runtime.serving.openai_options import OutputOptions, encode_image
from k3trt.runtime.serving.schema import FieldError

SEED_SPACE = 2 ** 64


@dataclasses.dataclass(frozen=True)
class Answer:
    """How an error is answered: status, OpenAI error type and code, and whether Retry-After is sent."""
    status: int
    kind: str
    code: str
    retry: bool = False


def answer_for(exc: BaseException, *, failed: bool = False) -> Answer:
    """The HTTP answer for a typed error raised while parsing, submitting or running a request."""
    if isinstance(exc, FieldError):
        return Answer(exc.status, "invalid_request_error", exc.code)
    if isinstance(exc, (QueueFullError, JobLimitError)):
        return Answer(429, "rate_limit_error", "rate_limit_exceeded", retry=True)
    if isinstance(exc, NotAcceptingError):
        return Answer(503, "unavailable", "load_failed" if failed else "shutting_down", retry=not failed)
    if isinstance(exc, ArtifactError):  # a task whose components this deployment's artifacts lack
        return Answer(501, "not_implemented_error", "task_not_exported")
    if isinstance(exc, DeadlineExceededError):
        return Answer(504, "timeout", "deadline_exceeded")
    if isinstance(exc, GenerationCancelled):
        return Answer(503, "unavailable", "cancelled")
    if isinstance(exc, BackendBusyError):
        return Answer(503, "unavailable", "backend_busy", retry=True)
    return Answer(500, "server_error", "internal_error")


class ImageWork:
    """The engine jobs of one request; `result()` awaits their images in order."""

    def __init__(self, engine, jobs: list, options: OutputOptions, task: str):
        self.engine, self.jobs, self.options, self.task = engine, jobs, options, task
        self.futures = [asyncio.wrap_future(job.future) for job in jobs]
        for future in self.futures:  # an abandoned request's error is still retrieved: no "never retrieved" log
            future.add_done_callback(_retrieve)

    @classmethod
    def submit(cls, engine, request, options: OutputOptions, *, timeout_s: float, task_inputs=None) -> "ImageWork":
        """Queue one engine job per image; all or none (a refusal cancels the ones already queued)."""
        jobs = cls.queue(engine, request, timeout_s=timeout_s, task_inputs=task_inputs)
        return cls(engine, jobs, options, "generate" if task_inputs is None else task_inputs.kind)

    @staticmethod
    def queue(engine, request, *, timeout_s: float, task_inputs=None) -> list:
        """The engine jobs of `submit`, any thread (the ImageWork itself is made on the event loop)."""
        jobs = []
        try:
            for index in range(request.num_images):
                single = dataclasses.replace(request, seed=(request.seed + index) % SEED_SPACE, num_images=1)
                jobs.append(engine.submit(single, timeout_s=timeout_s, task=task_inputs))
        except K3TRTError:
            for job in jobs:
                job.cancel()
            raise
        return jobs

    @property
    def seeds(self) -> list[int]:
        return [job.request.seed for job in self.jobs]

    @property
    def size(self) -> str:
        request = self.jobs[0].request
        return f"{request.width}x{request.height}"

    def progress(self) -> tuple[int, int]:
        steps = [job.progress for job in self.jobs]
        return sum(done for done, _ in steps), sum(total for _, total in steps)

    def position(self) -> int | None:
        positions = [p for p in (self.engine.position(job) for job in self.jobs) if p is not None]
        return min(positions) if positions else None

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    def queue_wait(self) -> float | None:
        waits = [job.queue_wait for job in self.jobs if job.queue_wait is not None]
        return max(waits) if waits else None

    async def result(self) -> list:
        """The images (float (H, W, 3) arrays) in seed order; raises the first job's typed error."""
        images = []
        for future in self.futures:
            images.extend(await future)
        return images

    async def items(self, images) -> list[dict]:
        """The OpenAI `data` items, encoded off the event loop."""
        return await asyncio.to_thread(_encode_items, images, self.seeds, self.options)

    def body(self, items: list[dict]) -> dict:
        """OpenAI's ImagesResponse (extra fields: each item's seed)."""
        return {"created": int(time.time()), "data": items, "background": "opaque",
                "output_format": self.options.output_format, "quality": self.options.quality, "size": self.size}


def _encode_items(images, seeds: list[int], options: OutputOptions) -> list[dict]:
    return [{"b64_json": base64.b64encode(encode_image(image, options)).decode(), "seed": seed,
             "revised_prompt": None} for image, seed in zip(to_pil(images), seeds)]


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
