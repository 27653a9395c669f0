"""Thread safety: concurrent `generate` equals each request alone; sessions open once; stats and pools bounded."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from k3trt.runtime import Pipeline
from k3trt.runtime.backends.base import StageTimings
from k3trt.runtime.backends.pool import ResourcePool
from k3trt.contract.errors import BackendBusyError
from k3trt.contract.tensor_metrics import psnr

REQUESTS = [dict(prompt="a red fox", seed=1, height=64, width=64),
            dict(prompt="a ship at sea", seed=2, height=64, width=128, guidance=1.0),
            dict(prompt="a lighthouse", negative_prompt="blurry", seed=3, height=64, width=64),
            dict(prompt=["a cat", "a dog"], seed=4, height=128, width=64)]


def test_concurrent_generate_equals_each_request_alone(tiny_artifacts):
    pipe = Pipeline.from_artifacts(tiny_artifacts, "ort", threads=1)
    alone = [pipe.generate(**r, steps=2, output_type="np") for r in REQUESTS]
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(lambda r: pipe.generate(**r, steps=2, output_type="np"), REQUESTS * 2))
    for i, images in enumerate(together):
        expected = alone[i % len(REQUESTS)]
        assert images.shape == expected.shape
        assert psnr(expected, images) >= 60.0  # identical in practice: same kernels, per-request state only


def test_sessions_open_once_under_concurrent_first_calls(tiny_artifacts):
    from k3trt.runtime.backends.ort import OrtBackend
    from k3trt.contract.manifest import Manifest

    backend = OrtBackend(Manifest.load(tiny_artifacts), threads=1)
    opened, real = [], backend._open

    def slow_open(component):
        opened.append(component)
        time.sleep(0.2)  # widen the race window
        return real(component)

    backend._open = slow_open
    with ThreadPoolExecutor(4) as pool:
        sessions = list(pool.map(lambda _: backend.session("movq_decoder"), range(4)))
    assert opened == ["movq_decoder"]
    assert all(s is sessions[0] for s in sessions)


def test_stage_timings_stay_bounded():
    timings = StageTimings(window=16)
    for i in range(1000):
        timings.record("unet", 0.001)
    assert len(timings["unet"]) == 16 and timings.calls["unet"] == 1000
    assert timings.seconds["unet"] == pytest.approx(1.0)
    assert sum(timings["unet"]) == pytest.approx(0.016)


def test_pool_creates_at_most_size_and_serves_every_caller():
    created, busy, peak, lock = [], [0], [0], threading.Lock()

    def work(pool):
        with pool.slot() as item:
            with lock:
                busy[0] += 1
                peak[0] = max(peak[0], busy[0])
            time.sleep(0.01)
            with lock:
                busy[0] -= 1
            return item

    pool = ResourcePool(lambda: created.append(object()) or created[-1], 2, timeout=5.0)
    with ThreadPoolExecutor(8) as executor:
        used = list(executor.map(lambda _: work(pool), range(40)))
    assert len(created) == 2 and peak[0] <= 2
    assert {id(u) for u in used} <= {id(c) for c in created}


def test_pool_wait_times_out_with_a_typed_error():
    pool = ResourcePool(object, 1, timeout=0.05, name="unet execution context")
    held = pool.acquire()
    start = time.perf_counter()
    with pytest.raises(BackendBusyError, match="all 1 unet execution context slot"):
        pool.acquire()
    assert time.perf_counter() - start < 2.0
    pool.release(held)
    assert pool.acquire() is held


def test_pool_failed_creation_frees_its_reservation():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of device memory")
        return object()

    pool = ResourcePool(flaky, 1, timeout=0.05)
    with pytest.raises(RuntimeError):
        pool.acquire()
    assert pool.acquire() is not None and pool.created == 1
