"""`stream: true`: server-sent events with the progress of every denoising step, then each finished image.

Events, in OpenAI's shape where OpenAI has one (the SDK's `Stream[ImageGenStreamEvent]` parses them):
- `k3trt.progress` (this service's own): {"type", "image_index", "step", "steps", "created_at"} after every step
  of every image;
- `image_generation.completed` / `image_edit.completed`: {"type", "b64_json", "seed", "size", "quality",
  "background", "output_format", "created_at", "usage"}, one per image;
- `error`: {"type": "error", "error": {OpenAI's error object}} if the request fails after the stream began (the
  SDK raises it as an APIError).
Partial previews (`partial_images`) are not produced; the request's `X-K3TRT-Ignored-Fields` header says so.
A client that closes the stream cancels the request at the next step boundary.
"""
from __future__ import annotations

import asyncio
import json
import time

from k3trt.contract.errors import K3TRTError

USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
         "total_tokens": 0}  # OpenAI counts tokens; this service does not bill: zeros keep the SDK's type whole


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def event_stream(work, route: str, fail_body):
    """The events of `work` (an ImageWork) as SSE text; `fail_body(exc, scope)` builds an error's body."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    for job in work.jobs:  # wakes the stream; the steps themselves are read from each job's progress
        job.on_step = lambda done, total: loop.call_soon_threadsafe(wake.set)
    waiting = asyncio.ensure_future(work.result())
    reported = [0] * len(work.jobs)  # steps already sent per image: none is skipped, whenever the stream started
    try:
        while True:
            for index, job in enumerate(work.jobs):
                done, total = job.progress
                for step in range(reported[index] + 1, done + 1):
                    yield sse("k3trt.progress", {"type": "k3trt.progress", "image_index": index, "step": step,
                                                 "steps": total, "created_at": int(time.time())})
                reported[index] = max(reported[index], done)
            if waiting.done():
                break
            woken = asyncio.ensure_future(wake.wait())
            await asyncio.wait({woken, waiting}, return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
            wake.clear()
        try:
            images = waiting.result()
        except K3TRTError as exc:
            _, body, _ = fail_body(exc, {})
            yield sse("error", {"type": "error", **body})
            return
        kind = "image_generation" if route == "generations" else "image_edit"
        for item in await work.items(images):
            yield sse(f"{kind}.completed", {"type": f"{kind}.completed", **item, "size": work.size,
                                            "quality": work.options.quality, "background": "opaque",
                                            "output_format": work.options.output_format,
                                            "created_at": int(time.time()), "usage": USAGE})
    finally:
        if not waiting.done():  # the client went away: stop the work at the next step boundary
            work.cancel()
            waiting.cancel()
