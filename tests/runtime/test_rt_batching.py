"""The step-level batching engine: batched results equal each request alone; deadlines, cancellation, queue."""
import threading
import time

import numpy as np
import pytest

from k3trt.runtime import Pipeline
from k3trt.contract.tensor_metrics import psnr
from k3trt.runtime.pipeline import make_request
from k3trt.runtime.serving.engine import (BatchingEngine, DeadlineExceededError, EngineConfig, EngineObserver,
                                          NotAcceptingError, QueueFullError)
from k3trt.runtime.denoise_loop import GenerationCancelled

BATCHED_PSNR_DB = 60.0  # the bound; measured 120-136 dB (batched GEMMs round differently, nothing more)

REQUESTS = [dict(prompt="a red fox", seed=1, height=64, width=64, steps=4),
            dict(prompt="a ship at sea", seed=2, height=64, width=128, guidance=1.0, steps=3),
            dict(prompt="a lighthouse", negative_prompt="blurry", seed=3, height=64, width=64, steps=5),
            dict(prompt=["a cat", "a dog"], seed=4, height=64, width=64, steps=4),
            dict(prompt="a fox", seed=5, height=64, width=128, steps=4)]


class Recorder(EngineObserver):
    def __init__(self):
        self.calls, self.on_call = [], None

    def unet_call(self, images, requests):
        self.calls.append((images, requests))
        if self.on_call:
            self.on_call(len(self.calls))


@pytest.fixture(scope="module")
def pipe(tiny_artifacts):
    return Pipeline.from_artifacts(tiny_artifacts, "ort")


@pytest.fixture(scope="module")
def alone(pipe):
    return [pipe.generate(**r, output_type="np") for r in REQUESTS]


def test_batched_requests_equal_each_request_alone(pipe, alone):
    recorder = Recorder()
    engine = BatchingEngine(pipe, EngineConfig(max_batch=8), recorder).start()
    try:
        jobs = [engine.submit(make_request(**r)) for r in REQUESTS]  # queued together: admitted in one round
        for job, expected in zip(jobs, alone):
            images = job.result(120)
            assert images.shape == expected.shape
            assert psnr(expected, images) >= BATCHED_PSNR_DB
    finally:
        engine.stop()
    assert max(requests for _, requests in recorder.calls) >= 3  # several requests really shared U-Net calls
    # 20 request-steps in all, in fewer calls than unbatched (two sizes, different step counts)
    assert len(recorder.calls) < sum(r["steps"] for r in REQUESTS)


def test_unbatched_engine_runs_one_request_per_call(pipe, alone):
    recorder = Recorder()
    engine = BatchingEngine(pipe, EngineConfig(batching=False), recorder).start()
    try:
        jobs = [engine.submit(make_request(**r)) for r in REQUESTS[:2]]
        for job, expected in zip(jobs, alone):
            assert psnr(expected, job.result(120)) >= BATCHED_PSNR_DB
    finally:
        engine.stop()
    assert {requests for _, requests in recorder.calls} == {1}


def test_deadline_and_cancel_take_effect_at_a_step_boundary(pipe, alone):
    recorder = Recorder()
    engine = BatchingEngine(pipe, EngineConfig(max_batch=8), recorder).start()
    try:
        survivor = engine.submit(make_request(**REQUESTS[0]))
        overdue = engine.submit(make_request("a slow one", seed=7, steps=40, height=64, width=64), timeout_s=0.5)
        cancelled = engine.submit(make_request("a cancelled one", seed=8, steps=40, height=64, width=64))
        # Each step is held 50 ms so that the 40-step request outlives its 0.5 s deadline on an idle machine too.
        recorder.on_call = lambda n: (cancelled.cancel() if n == 1 else None, time.sleep(0.05))
        with pytest.raises(DeadlineExceededError, match="passed its deadline after step"):
            overdue.result(120)
        with pytest.raises(GenerationCancelled, match="cancelled"):
            cancelled.result(120)
        assert cancelled.state.index < 40 and overdue.state.index < 40
        assert psnr(alone[0], survivor.result(120)) >= BATCHED_PSNR_DB  # the others in the batch are unharmed
    finally:
        engine.stop()


def test_full_queue_and_stopped_engine_refuse_with_typed_errors(pipe):
    release = threading.Event()
    engine = BatchingEngine(pipe, EngineConfig(max_batch=1, max_queue=1))
    with pytest.raises(NotAcceptingError, match="not accepting"):
        engine.submit(make_request("a cat", steps=1, height=64, width=64))
    recorder = Recorder()
    recorder.on_call = lambda n: release.wait(30)  # hold the worker inside the first request
    engine.observer = recorder
    engine.start()
    try:
        first = engine.submit(make_request("a cat", steps=2, height=64, width=64))
        while engine.queue_depth:  # the worker admitted it
            threading.Event().wait(0.01)
        engine.submit(make_request("a dog", steps=1, height=64, width=64))  # fills the queue
        with pytest.raises(QueueFullError, match="at most 1 queued") as info:
            engine.submit(make_request("a cow", steps=1, height=64, width=64))
        assert "retry" in str(info.value)
    finally:
        release.set()
        engine.stop()
    assert first.result(60).shape == (1, 64, 64, 3)
    with pytest.raises(NotAcceptingError):
        engine.submit(make_request("a cat", steps=1, height=64, width=64))


# ----------------------------------------------------------------------------------------- image tasks
@pytest.fixture(scope="module")
def picture():
    from k3trt.verify.task_demo import demo_image

    return demo_image()  # 64 x 128


IMG2IMG = dict(prompt="a fox in the snow", strength=0.6, steps=5, guidance=3.0, seed=11, num_images=2)
INPAINT = dict(prompt="a fox in the snow", steps=4, guidance=4.0, seed=12)


def test_image_tasks_through_the_engine_equal_the_library_calls(pipe, picture):
    """One img2img, one inpainting and one outpainting job queued together with a text-to-image job of the
    img2img's size: img2img shares the base U-Net's calls with text to image, inpainting runs its own U-Net."""
    from k3trt.verify.task_demo import demo_mask
    from k3trt.runtime import tasks

    t2i = dict(prompt="a fox in the snow", seed=6, height=64, width=128, steps=4)  # same context length
    expected = [pipe.img2img(image=picture, output_type="np", **IMG2IMG),
                pipe.inpaint(image=picture, mask=demo_mask(), output_type="np", **INPAINT),
                pipe.inpaint(image=picture, outpaint="left=64", output_type="np", **INPAINT),
                pipe.generate(**t2i, output_type="np")]
    recorder = Recorder()
    engine = BatchingEngine(pipe, EngineConfig(max_batch=8), recorder).start()
    try:
        img2img = tasks.img2img_inputs(picture, IMG2IMG["strength"])
        inpaint = tasks.inpaint_inputs(picture, demo_mask())
        outpaint = tasks.inpaint_inputs(picture, outpaint="left=64")
        common = {k: v for k, v in IMG2IMG.items() if k not in ("prompt", "strength")}
        with engine._cond:  # the worker admits all four in one round (the condition's lock is re-entrant)
            jobs = [engine.submit(tasks.task_request(img2img, IMG2IMG["prompt"], **common), task=img2img),
                    *(engine.submit(tasks.task_request(inputs, INPAINT["prompt"], steps=4, guidance=4.0, seed=12),
                                    task=inputs) for inputs in (inpaint, outpaint)),
                    engine.submit(make_request(**t2i))]
        for job, want in zip(jobs, expected):
            got = job.result(120)
            assert got.shape == want.shape
            db = psnr(want, got)
            print(f"{job.task.kind if job.task else 'text2img'} through the engine vs alone: {db:.1f} dB")
            assert db >= BATCHED_PSNR_DB
    finally:
        engine.stop()
    # img2img runs int(5 * 0.6) = 3 steps of the base U-Net, the text-to-image job 4 at the same latent size:
    # the first 3 are shared calls of 2 requests (3 images). Inpainting (64 x 128) and outpainting (64 x 192)
    # run 4 steps each in calls of their own.
    assert recorder.calls.count((3, 2)) == 3
    assert len(recorder.calls) == 3 + 1 + 4 + 4


def test_an_image_task_alone_in_the_engine_is_bit_exact(pipe, picture):
    from k3trt.runtime import tasks

    engine = BatchingEngine(pipe, EngineConfig(max_batch=4)).start()
    try:
        got = engine.img2img(image=picture, **IMG2IMG)
        kept = engine.inpaint(image=picture, outpaint="top=64", **INPAINT)
    finally:
        engine.stop()
    np.testing.assert_array_equal(got, pipe.img2img(image=picture, output_type="np", **IMG2IMG))
    np.testing.assert_array_equal(kept, pipe.inpaint(image=picture, outpaint="top=64", output_type="np", **INPAINT))
    np.testing.assert_allclose(kept[0, 64:], picture / 255.0, atol=1e-6)  # pasted back after the shared decode
    assert tasks.ENGINE_TASKS == ("img2img", "inpaint")


def test_a_task_the_artifacts_lack_is_refused_at_submit(artifacts_copy, picture):
    import json

    from k3trt.runtime import tasks
    from k3trt.contract.errors import ArtifactError, InvalidArgumentError

    manifest = json.loads((artifacts_copy / "manifest.json").read_text())
    del manifest["onnx"]["unet_inpainting"]
    (artifacts_copy / "manifest.json").write_text(json.dumps(manifest))
    engine = BatchingEngine(Pipeline.from_artifacts(artifacts_copy, "ort")).start()
    try:
        inputs = tasks.inpaint_inputs(picture, outpaint="left=64")
        with pytest.raises(ArtifactError, match="not exported for inpaint: unet_inpainting missing"):
            engine.submit(tasks.task_request(inputs, "a fox", steps=2), task=inputs)
        img2img = tasks.img2img_inputs(picture, 0.5)
        with pytest.raises(InvalidArgumentError, match="int\\(2 x 0.3\\) = 0 steps"):
            engine.submit(tasks.task_request(img2img, "a fox", steps=2), task=tasks.img2img_inputs(picture, 0.3))
        with pytest.raises(InvalidArgumentError, match="a 64x64 request for a 128x64 image"):
            engine.submit(make_request("a fox", height=64, width=64), task=img2img)
        with pytest.raises(InvalidArgumentError, match="does not run Flash"):
            engine.submit(make_request("a fox", height=64, width=64), task="flash")
        assert engine.queue_depth == 0 and engine.pending == 0  # nothing was queued
    finally:
        engine.stop()
