"""Animations as asynchronous jobs: POST /v1/jobs/animations -> 202 and a job of kind "animation" in the generic
job store (jobs.py), polled, fetched and cancelled through the same /v1/jobs/{id} routes as image jobs.

The body takes `Pipeline.animate`'s options (mode, prompt schedule, frames, size, steps, seed, the mode's
schedules) plus `fps` and `output_format` (mp4, webp or gif). Everything is checked before queueing
(`plan_animation`: no model runs) and the frame budget bounds the job's memory: frames x width x height at most
MAX_ANIMATION_PIXELS (animated WebP/GIF and zoom-in hold every frame before encoding).

Each image call of the animation (text to image, image to image, outpainting) runs as one job of the batching
engine (`EngineCalls`), so animation frames share U-Net calls with image requests and the engine's worker stays
the backend's only user; each call equals the library call (engine.py), so the video's frames equal
`Pipeline.animate`'s. Cancel takes effect at the next denoising step of the frame being made.
"""
from __future__ import annotations

import asyncio
import tempfile
import threading
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from k3trt.contract.errors import BackendUnavailableError, InvalidArgumentError, K3TRTError
from k3trt.runtime import tasks
from k3trt.runtime.animation import plan_animation, render_frames
from k3trt.runtime.animation_spec import DEFAULT_FPS
from k3trt.runtime.denoise_loop import GenerationCancelled
from k3trt.runtime.pipeline import to_pil
from k3trt.runtime.request import make_request
from k3trt.runtime.serving.engine import NotAcceptingError
from k3trt.runtime.serving.schema import FieldError, Limits, _size, parse_body
from k3trt.runtime.video import check_encoder, check_fps, encode

MAX_ANIMATION_PIXELS = 64 * 1024 * 1024  # frames x width x height: 64 frames at 1024x1024 (~200 MB of RGB frames)
MAX_BODY_BYTES = 64 * 1024  # schedules of many keys still fit
MEDIA_TYPES = {"mp4": "video/mp4", "webp": "image/webp", "gif": "image/gif"}
OPTIONS = ("mode", "prompt", "negative_prompt", "frames", "seed", "seed_behavior", "steps", "guidance",
           "strength", "zoom", "angle", "translate_x", "translate_y", "color_coherence", "frames_per_key",
           "zoom_margin")
FIELDS = (*OPTIONS, "size", "fps", "output_format")


def parse_animation(body: dict, pipe, limits: Limits) -> tuple[object, int, str]:
    """(the checked AnimationPlan, fps, output format) for a request body; a FieldError naming the first bad field."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise FieldError(unknown[0], f"unknown field {unknown[0]!r}", accepted=", ".join(FIELDS),
                         fix="drop it (an init image is not taken over HTTP)", code="unknown_parameter")
    if not isinstance(body.get("prompt"), str):
        raise FieldError("prompt", f"prompt={body.get('prompt')!r}", accepted='a string or a schedule such as '
                         '"0: a forest; 24: a city"', fix='send "prompt": "a lighthouse"',
                         code="missing_required_parameter" if "prompt" not in body else "invalid_value")
    output_format = _field("output_format", lambda v: _choice(v, MEDIA_TYPES), body.get("output_format", "mp4"))
    fps = _field("fps", check_fps, body.get("fps", DEFAULT_FPS))
    _field("output_format", lambda fmt: check_encoder(fmt.upper()), output_format)
    width, height = _size(body.get("size", limits.default_size), limits)  # the image routes' sizes
    steps = body.get("steps", limits.default_steps)
    if isinstance(steps, int) and steps > limits.max_steps:
        raise FieldError("steps", f"steps={steps}", accepted=f"1..{limits.max_steps}", fix="fewer steps")
    options = {name: body[name] for name in OPTIONS if name in body and name != "prompt"}
    options["steps"] = steps
    frames = options.get("frames")
    if isinstance(frames, int) and not isinstance(frames, bool) and frames * width * height > MAX_ANIMATION_PIXELS:
        raise FieldError("frames", f"{frames} frames of {width}x{height} ({frames * width * height} pixels)",
                         accepted=f"frames x width x height <= {MAX_ANIMATION_PIXELS}",
                         fix=f"at most {MAX_ANIMATION_PIXELS // (width * height)} frames at {width}x{height}, "
                             "or a smaller size")
    plan = _field(None, lambda _: plan_animation(pipe, body["prompt"], width=width, height=height, **options), 0)
    if plan.frames * width * height > MAX_ANIMATION_PIXELS:  # the default frame count
        raise FieldError("frames", f"{plan.frames} frames (the default) of {width}x{height}",
                         accepted=f"frames x width x height <= {MAX_ANIMATION_PIXELS}", fix="send fewer frames")
    return plan, fps, output_format


def _choice(value, accepted) -> str:
    if value not in accepted:
        raise InvalidArgumentError(f"output_format={value!r}", accepted=", ".join(accepted), fix='"mp4"')
    return value


def _field(param: str | None, check, value):
    """`check(value)`, its typed error re-raised as a FieldError naming the field (found in the message when the
    check covers several fields)."""
    try:
        return check(value)
    except FieldError:
        raise
    except (InvalidArgumentError, BackendUnavailableError) as exc:  # a missing encoder: 400 naming the format
        named = param or _named(exc.what)
        raise FieldError(named, exc.what, accepted=exc.accepted, fix=exc.fix) from None


def _named(what: str) -> str | None:
    text = what.lower()
    for name in sorted(FIELDS, key=len, reverse=True):  # translate_x before a bare "x"
        if name in text:
            return name
    return "size" if ("height" in text or "width" in text) else None


class EngineCalls:
    """The Pipeline calls `render_frames` makes (generate, img2img, inpaint), each run as one batching-engine job;
    everything else (the artifacts' checks) is the pipeline's own."""

    def __init__(self, engine, timeout_s: float | None, on_step):
        self.engine, self.timeout_s, self.on_step = engine, timeout_s, on_step
        self.current = None  # the engine job of the frame being made
        self.lock = threading.Lock()
        self.cancelled = False

    def __getattr__(self, name):
        return getattr(self.engine.pipeline, name)

    def generate(self, prompt, negative_prompt=None, *, callback=None, **kwargs):
        return self._run(make_request(prompt, negative_prompt, **kwargs), None)

    def img2img(self, prompt, image, *, strength, negative_prompt=None, callback=None, **kwargs):
        inputs = tasks.img2img_inputs(image, strength, max_side=tasks.max_side(self.engine.pipeline))
        return self._run(tasks.task_request(inputs, prompt, negative_prompt, **kwargs), inputs)

    def inpaint(self, prompt, image, mask=None, *, outpaint=None, negative_prompt=None, callback=None, **kwargs):
        inputs = tasks.inpaint_inputs(image, mask, outpaint, max_side=tasks.max_side(self.engine.pipeline))
        return self._run(tasks.task_request(inputs, prompt, negative_prompt, **kwargs), inputs)

    def _run(self, request, inputs) -> list:
        with self.lock:
            if self.cancelled:
                raise GenerationCancelled("the animation was cancelled")
            self.current = job = self.engine.submit(request, timeout_s=self.timeout_s, task=inputs)
            job.on_step = self.on_step
        return to_pil(job.result())

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            if self.current is not None:
                self.current.cancel()  # the engine retires it at the next step boundary


class AnimationWork:
    """One animation job (jobs.py's Work shape): progress in frames and in the current frame's steps."""

    def __init__(self, engine, plan, fps: int, output_format: str, timeout_s: float | None):
        self.engine, self.plan, self.fps, self.output_format = engine, plan, fps, output_format
        self.frames_done, self.step, self.steps = 0, 0, plan.steps
        self.calls = EngineCalls(engine, timeout_s, self._stepped)
        self.started = False

    def _stepped(self, done: int, total: int) -> None:
        self.step, self.steps = done, total

    def progress(self) -> tuple[int, int]:
        return self.step, self.steps

    def progress_frames(self) -> dict:
        return {"frame": self.frames_done, "frames": self.plan.frames}

    def position(self) -> int | None:
        current = self.calls.current
        if current is not None:  # a frame's call waits in the engine's queue, or runs (None)
            return self.engine.position(current)
        return None if self.started else self.engine.queue_depth

    def cancel(self) -> None:
        self.calls.cancel()

    def render(self) -> bytes:
        """Make the frames (through the engine) and encode them; the video's bytes."""
        self.started = True
        with tempfile.TemporaryDirectory(prefix="k3trt-animation-") as folder:
            path = Path(folder) / f"animation.{self.output_format}"
            encode(self.output_format.upper(), self._in_order(render_frames(self.calls, self.plan)), path, self.fps)
            return path.read_bytes()

    def _in_order(self, made):
        """Frames in video order as they are made (zoom-in makes them backwards: held until their turn)."""
        waiting, following = {}, 0
        for frame in made:
            self.frames_done += 1
            waiting[frame.index] = frame.image
            while following in waiting:
                yield waiting.pop(following)
                following += 1
            if self.calls.cancelled:
                raise GenerationCancelled("the animation was cancelled")


def add_animation_routes(app, images, read_body) -> None:
    """POST /v1/jobs/animations; status, result (the video's bytes) and cancel are the generic job routes.
    `read_body(request, limit, timeout_s)`: http.py's capped, timed body reader."""
    store, service = app.state.jobs, images.service

    async def submit(request: Request):
        try:
            body = parse_body(await read_body(request, MAX_BODY_BYTES, service.settings.body_timeout_s),
                              MAX_BODY_BYTES)
            if service.load_error or not service.ready:
                raise NotAcceptingError("the service is not ready (loading, failed or shutting down)",
                                        fix="retry after Retry-After seconds; see GET /readyz")
            plan, fps, output_format = await asyncio.to_thread(parse_animation, body, service.engine.pipeline,
                                                               service.limits)
        except K3TRTError as exc:
            return images.fail(request, exc)
        work = AnimationWork(service.engine, plan, fps, output_format, service.settings.timeout_s)

        async def finish():
            try:
                video = await asyncio.to_thread(work.render)
            except K3TRTError as exc:
                status, body, _ = images.fail_body(exc, {"state": {"request_id": request.scope["state"]
                                                                   ["request_id"]}})
                return status, body
            return 200, Response(video, media_type=MEDIA_TYPES[output_format])

        try:
            record = store.submit("animation", work, finish)
        except K3TRTError as exc:
            return images.fail(request, exc)
        return JSONResponse(record.describe(), status_code=202, headers={"Location": f"/v1/jobs/{record.id}"})

    app.add_api_route("/v1/jobs/animations", submit, methods=["POST"], status_code=202,
                      summary="submit an animation job (Pipeline.animate's options; the result is the video)")
