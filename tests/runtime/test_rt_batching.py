"""The step-level batching engine: batched results equal each request alone; deadlines, cancellation, queue."""
import threading
import time

import pytest

from k3trt.runtime import Pipeline
from k3trt.runtime.metrics import psnr
from k3trt.runtime.pipeline import make_request
from k3trt.runtime.serving.engine import (BatchingEngine, DeadlineExceededError, EngineConfig, EngineObserver,
                                          NotAcceptingError, QueueFullError)
from k3trt.runtime.stages import GenerationCancelled

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
