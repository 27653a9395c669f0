"""Step-level batching: requests join and leave one shared U-Net call at step boundaries.

The timestep is a per-sample input of the U-Net, so requests at different points of their schedules share a
call, as LLM servers batch tokens of different sequences. One worker thread owns the backend; at every round it
1. admits queued requests while the active ones hold fewer than `max_batch` images, encoding all newly admitted
   prompts in one text-encoder call;
2. retires requests that were cancelled or passed their deadline (so both take effect at a step boundary);
3. runs one U-Net call per group of active requests with the same latent size whose context lengths fit a
   common length (see `stages.context_lengths_fit`: masked copies, exact; zero padding would not be), each
   request with its own timestep, guidance, scheduler state and generator;
4. decodes the requests that finished, in one MoVQ call per latent size, and hands each its images at once.
Image to image and inpainting/outpainting requests carry their task inputs (`tasks.Img2ImgInputs`,
`tasks.InpaintInputs`): their MoVQ encoder call runs at admission (`tasks.start_state`, the function the library
tasks use), img2img states run the base U-Net and share its calls with text-to-image requests of the same latent
size, inpainting states run `unet_inpainting` in calls of their own (groups are per U-Net component and latent
size), and inpainting's paste-back runs after the shared decode (`tasks.finish_images`). Flash (no guidance, its
own sampler) is not served here: `Pipeline.flash`.
Each result equals the same request run alone through `Pipeline.generate` / `img2img` / `inpaint`
(tests/runtime/test_rt_batching.py).
With `batching=False` the same loop runs one request at a time: the baseline the benchmark compares against.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
from typing import Iterable, Sequence

import numpy as np
import torch
from k3trt.contract.cards import guided_batch
from k3trt.contract.errors import InvalidArgumentError, K3TRTError
from k3trt.runtime import tasks
from k3trt.runtime.denoise_loop import (
    DenoiseState,
    GenerationCancelled,
    context_lengths_fit,
    decode_latents,
    encode_prompts,
    run_unet,
)
from k3trt.runtime.pipeline import Pipeline, Request
from k3trt.runtime.seeding import make_generator

log = logging.getLogger("k3trt")


class QueueFullError(K3TRTError):
    """The request queue is full (HTTP 429: retry after a while)."""


class DeadlineExceededError(K3TRTError):
    """The request passed its deadline before it finished (HTTP 504)."""


class NotAcceptingError(K3TRTError):
    """The engine is not running or is shutting down (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 4  # images in one U-Net call (before guidance doubles the rows)
    max_queue: int = 32  # requests waiting for admission; one more is refused with QueueFullError
    batching: bool = True  # False: one request at a time (the unbatched baseline)

    def __post_init__(self):
        for name in ("max_batch", "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgumentError(f"{name}={value!r}", accepted="an integer >= 1",
                                           fix=f"--{name.replace('_', '-')} 4")


class EngineObserver:
    """Hooks for metrics; the default does nothing (the HTTP layer feeds Prometheus from them)."""

    def stage(self, stage: str, seconds: float) -> None: ...

    def unet_call(self, images: int, requests: int) -> None: ...

    def queue_depth(self, depth: int) -> None: ...

    def active(self, count: int) -> None: ...


class Job:
    """One submitted request: wait with `result(timeout)`, stop it with `cancel()` (at the next step)."""

    _ids = itertools.count(1)

    def __init__(self, request: Request, deadline: float | None, task: "tasks.TaskInputs | None" = None):
        self.id, self.request, self.deadline, self.task = next(Job._ids), request, deadline, task
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.submitted = time.monotonic()
        self.started: float | None = None  # admitted to the batch
        self.state: DenoiseState | None = None
        self.on_step = None  # called from the worker thread as on_step(done, total) after each step; keep it O(1)
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def kind(self) -> str:
        """The task: "generate", "img2img" or "inpaint"."""
        return "generate" if self.task is None else self.task.kind

    @property
    def progress(self) -> tuple[int, int]:
        """(steps done, steps in all); (0, steps asked) before admission."""
        if self.state is None:
            return 0, self.request.steps
        return self.state.index, len(self.state.timesteps)

    def _stepped(self) -> None:
        if self.on_step is not None:
            done, total = self.progress
            try:
                self.on_step(done, total)
            except Exception:  # noqa: BLE001 - a listener's bug must not fail the batch
                log.exception("progress listener of request %d failed", self.id)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def images(self) -> int:
        return self.request.latent_shape[0]

    @property
    def queue_wait(self) -> float | None:
        return None if self.started is None else self.started - self.submitted

    def result(self, timeout: float | None = None) -> np.ndarray:
        """Float images (N, H, W, 3) in [0, 1]; raises the request's typed error."""
        return self.future.result(timeout)

    def _finish(self, images: np.ndarray | None = None, error: BaseException | None = None) -> None:
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(images)


class BatchingEngine:
    """A queue and one worker thread around a Pipeline. `submit` is safe from any thread."""

    def __init__(self, pipeline: Pipeline, config: EngineConfig = EngineConfig(),
                 observer: EngineObserver | None = None):
        self.pipeline, self.config, self.observer = pipeline, config, observer or EngineObserver()
        self._unet_limits: dict[str, tuple[int, int]] = {}  # component -> (batch rows, context length) maxima
        self.unet_rows, self.max_context = self.unet_limits("unet")
        self.encoder_rows = pipeline.backend.record("text_encoder").axes.get("batch", (1, 1 << 30))[1]
        self.decoder_rows = pipeline.backend.record("movq_decoder").axes.get("batch", (1, 1 << 30))[1]
        self._queue: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._cond = threading.Condition()
        self._accepting = False
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------------------------- control
    def start(self) -> "BatchingEngine":
        with self._cond:
            if self._worker is None:
                self._accepting = True
                self._worker = threading.Thread(target=self._loop, name="k3trt-batching", daemon=True)
                self._worker.start()
        return self

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop admitting; let queued and running requests finish for up to `grace_s`, then cancel the rest."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
        end = time.monotonic() + grace_s
        while self.pending and time.monotonic() < end:
            time.sleep(0.05)
        with self._cond:
            for job in list(self._queue) + self._active:
                job.cancel()
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=max(5.0, grace_s))
            self._worker = None

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def position(self, job: Job) -> int | None:
        """How many requests wait before `job` (0: next to be admitted); None once admitted or finished."""
        with self._cond:
            for index, queued in enumerate(self._queue):
                if queued is job:
                    return index
        return None

    @property
    def pending(self) -> int:
        return len(self._queue) + len(self._active)

    def unet_limits(self, component: str) -> tuple[int, int]:
        """The most rows and the longest context one call of this U-Net component takes (its profile's axes)."""
        if component not in self._unet_limits:
            axes = self.pipeline.backend.record(component).axes
            self._unet_limits[component] = (axes.get("batch", (1, 1 << 30))[1], axes.get("context", (1, 128))[1])
        return self._unet_limits[component]

    def submit(self, request: Request, *, timeout_s: float | None = None,
               task: "tasks.TaskInputs | None" = None) -> Job:
        """Queue `request` (checked against the artifacts first: shapes, and a task's components); `task`: the
        inputs of image to image or inpainting (`tasks.img2img_inputs`, `tasks.inpaint_inputs`; the request from
        `tasks.task_request`); `timeout_s` sets its deadline."""
        if task is None:
            self.pipeline.check_request(request)
        else:
            tasks.check_task(self.pipeline, request, task)
        job = Job(request, None if timeout_s is None else time.monotonic() + timeout_s, task)
        with self._cond:
            if not self._accepting:
                raise NotAcceptingError("the engine is not accepting requests (stopped or shutting down)",
                                        fix="retry on another replica, or after the restart")
            if len(self._queue) >= self.config.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are already waiting",
                                     accepted=f"at most {self.config.max_queue} queued (--max-queue)",
                                     fix="retry after a few seconds")
            self._queue.append(job)
            self.observer.queue_depth(len(self._queue))
            self._cond.notify_all()
        return job

    def generate(self, prompt, negative_prompt=None, *, timeout_s: float | None = None, **kwargs) -> np.ndarray:
        """`Pipeline.generate`'s arguments through the batching queue; float images (N, H, W, 3)."""
        from k3trt.runtime.pipeline import make_request

        return self.submit(make_request(prompt, negative_prompt, **kwargs), timeout_s=timeout_s).result()

    def img2img(self, prompt: str, image, *, strength: float = tasks.IMG2IMG_STRENGTH,
                negative_prompt: str | None = None, timeout_s: float | None = None, **kwargs) -> np.ndarray:
        """`Pipeline.img2img`'s arguments (seed, steps, guidance, num_images) through the batching queue."""
        inputs = tasks.img2img_inputs(image, strength)
        request = tasks.task_request(inputs, prompt, negative_prompt, **kwargs)
        return self.submit(request, timeout_s=timeout_s, task=inputs).result()

    def inpaint(self, prompt: str, image, mask=None, *, outpaint=None, negative_prompt: str | None = None,
                preserve_unmasked: bool = True, timeout_s: float | None = None, **kwargs) -> np.ndarray:
        """`Pipeline.inpaint`'s arguments through the batching queue (its defaults: 50 steps, guidance 4)."""
        inputs = tasks.inpaint_inputs(image, mask, outpaint, preserve_unmasked=preserve_unmasked)
        kwargs = {"steps": 50, "guidance": 4.0, **kwargs}
        request = tasks.task_request(inputs, prompt, negative_prompt, **kwargs)
        return self.submit(request, timeout_s=timeout_s, task=inputs).result()

    # ------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._active and self._accepting:
                    self._cond.wait()
                if not self._queue and not self._active:
                    return  # stopped and drained
                self._queue = collections.deque(self._retire(list(self._queue)))  # cancelled/overdue while queued
                admitted = self._admit()
            try:
                self._round(admitted)
            except Exception as exc:  # a bug, not a request's error: fail what runs, keep serving
                log.exception("batching round failed")
                for job in admitted + self._active:
                    job._finish(error=exc)
                self._active = []

    def _admit(self) -> list[Job]:
        """Pop queued jobs while the active ones hold fewer than max_batch images (one at a time unbatched)."""
        admitted: list[Job] = []
        images = sum(job.images for job in self._active)
        while self._queue:
            job = self._queue[0]
            busy = self._active or admitted
            if busy and (not self.config.batching or images + job.images > self.config.max_batch):
                break
            self._queue.popleft()
            job.started = time.monotonic()
            admitted.append(job)
            images += job.images
        self.observer.queue_depth(len(self._queue))
        return admitted

    def _round(self, admitted: list[Job]) -> None:
        admitted = self._retire(admitted)
        if admitted:
            self._start(admitted)
        self._active = self._retire(self._active)
        for group in self._unet_groups([job for job in self._active if not job.state.done]):
            self._step(group)
        done = [job for job in self._active if job.future.done() or job.state.done]
        self._active = [job for job in self._active if job not in done]
        self.observer.active(len(self._active) + len(done))
        self._decode([job for job in done if not job.future.done()])
        self.observer.active(len(self._active))

    def _retire(self, jobs: list[Job]) -> list[Job]:
        """Finish cancelled and overdue jobs (at a step boundary); return the rest."""
        now, kept = time.monotonic(), []
        for job in jobs:
            if job.cancelled:
                job._finish(error=GenerationCancelled(f"request {job.id} was cancelled"))
            elif job.deadline is not None and now > job.deadline:
                where = f"after step {job.state.index}/{len(job.state.timesteps)}" if job.state else "in the queue"
                job._finish(error=DeadlineExceededError(
                    f"request {job.id} passed its deadline {where}",
                    fix="raise the timeout, lower steps/size, or retry when the server is less busy"))
            else:
                kept.append(job)
        return kept

    def _timed(self, stage: str, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.observer.stage(stage, time.perf_counter() - start)

    def _start(self, jobs: list[Job]) -> None:
        """Encode the new jobs' prompts in as few text-encoder calls as the batch axis allows; make their states."""
        for chunk in _chunks(jobs, lambda job: len(_texts(job.request)), self.encoder_rows):
            try:
                conds = self._timed("text_encoder", encode_prompts, self.pipeline.backend, self.pipeline.tokenizer,
                                    [job.request for job in chunk])
            except K3TRTError as exc:
                for job in chunk:
                    job._finish(error=exc)
                continue
            for job, cond in zip(chunk, conds):
                try:
                    job.state = self._new_state(job, cond)
                except K3TRTError as exc:
                    job._finish(error=exc)
                    continue
                self._active.append(job)

    def _new_state(self, job: Job, cond) -> DenoiseState:
        """Text to image as `Pipeline.generate`; a task as the library's task (its MoVQ encoder call is here)."""
        if job.task is None:
            return self.pipeline.start(job.request, cond, make_generator(job.request.seed))
        return self._timed("movq_encoder", tasks.start_state, self.pipeline, job.request, cond,
                           tasks.task_generator(job.request), job.task)

    def _unet_groups(self, jobs: list[Job]) -> Iterable[list[Job]]:
        """Jobs of the same U-Net component and latent size, split where the context lengths or the batch axis
        would not fit."""
        by_unet: dict[tuple, list[Job]] = collections.defaultdict(list)
        for job in jobs:
            by_unet[(job.state.component, job.state.latent_size)].append(job)
        for (component, _), group in by_unet.items():
            max_rows, max_context = self.unet_limits(component)
            calls: list[list[Job]] = []
            for job in group:
                for call in calls:
                    lengths = [j.state.cond.length for j in call] + [job.state.cond.length]
                    rows = sum(_rows(j) for j in call) + _rows(job)
                    if rows <= max_rows and context_lengths_fit(lengths, max_context):
                        call.append(job)
                        break
                else:
                    calls.append([job])
            yield from calls

    def _step(self, jobs: list[Job]) -> None:
        states = [job.state for job in jobs]
        try:
            noises = self._timed("unet", run_unet, self.pipeline.backend, states)
            for state, noise in zip(states, noises):
                state.advance(noise)
        except K3TRTError as exc:
            for job in jobs:
                job._finish(error=exc)
            return
        for job in jobs:
            job._stepped()
        self.observer.unet_call(sum(job.images for job in jobs), len(jobs))

    def _decode(self, jobs: list[Job]) -> None:
        by_size: dict[tuple, list[Job]] = collections.defaultdict(list)
        for job in jobs:
            by_size[job.state.latent_size].append(job)
        for group in by_size.values():
            for chunk in _chunks(group, lambda job: job.images, self.decoder_rows):
                try:
                    latents = torch.cat([job.state.latents for job in chunk])
                    images = self._timed("movq_decoder", decode_latents, self.pipeline.backend, latents)
                except K3TRTError as exc:
                    for job in chunk:
                        job._finish(error=exc)
                    continue
                offset = 0
                for job in chunk:
                    mine = images[offset:offset + job.images]
                    job._finish(mine if job.task is None else tasks.finish_images(job.task, mine))
                    offset += job.images


def _texts(request: Request) -> list[str]:
    from k3trt.runtime.denoise_loop import prompt_texts

    return prompt_texts(request)


def _rows(job: Job) -> int:
    return guided_batch(job.images, job.request.guided)


def _chunks(jobs: Sequence[Job], size, limit: int) -> Iterable[list[Job]]:
    """Consecutive chunks whose summed `size(job)` stays within `limit` (a job larger than it goes alone)."""
    chunk, total = [], 0
    for job in jobs:
        if chunk and total + size(job) > limit:
            yield chunk
            chunk, total = [], 0
        chunk.append(job)
        total += size(job)
    if chunk:
        yield chunk
