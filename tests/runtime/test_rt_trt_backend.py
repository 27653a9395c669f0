"""The TensorRT backend on the stand-in (tests/trt_sim) and a host-simulated device (host_device.py): CUDA graphs,
thread-local capture, device placement, checked bindings, one shared activation block, weight streaming."""
from __future__ import annotations

import threading

import pytest
import torch

from k3trt.contract.manifest import Manifest
from k3trt.contract.errors import InvalidArgumentError, ShapeError

from host_device import CaptureViolation, HostDevice, host_devices
from trt_helpers import PROMPTS, build_tiny_engines, unet_feeds

pytestmark = pytest.mark.trt_sim


@pytest.fixture(scope="module")
def sim(trt_sim_module):
    with host_devices():
        yield trt_sim_module


@pytest.fixture(scope="module")
def built(sim, tiny_artifacts, tmp_path_factory):
    return build_tiny_engines(tiny_artifacts, tmp_path_factory.mktemp("trt-backend") / "art")


def _backend(root, **options):
    from k3trt.runtime.backends.trt import TrtBackend

    return TrtBackend(Manifest.load(root), "fp32", **options)


# ----------------------------------------------------------------------------------------- CUDA graphs
def test_cuda_graphs_give_direct_results_over_three_prompt_lengths(built):
    from k3trt.runtime.pipeline import Pipeline

    images = {}
    for graphs in (False, True):
        pipe = Pipeline(Manifest.load(built), _backend(built, cuda_graphs=graphs, max_contexts=1))
        # each prompt length is its own U-Net shape; the first prompt comes back after the others were captured
        images[graphs] = [pipe.generate(p, steps=2, seed=7, output_type="np") for p in PROMPTS + PROMPTS[:1]]
        if graphs:
            (lane,) = pipe.backend._lanes.drain()
            assert len(lane.graphs["unet-fp32"]) == 3  # three shapes captured, each replayed
        pipe.close()
    for direct, replayed in zip(images[False], images[True]):
        assert torch.equal(torch.from_numpy(direct), torch.from_numpy(replayed))
    assert not torch.equal(torch.from_numpy(images[False][0]), torch.from_numpy(images[False][1]))


def test_host_device_refuses_other_threads_during_a_global_capture(sim):
    """The simulation the next test relies on: global mode breaks a concurrent allocation, thread-local does not."""
    device = HostDevice(0)
    for mode, fails in (("global", True), ("thread_local", False)):
        errors = []
        with device.capture(device.new_graph(), device.new_stream(), mode):
            worker = threading.Thread(target=lambda: errors.append(_try(lambda: device.empty(8, torch.float32))))
            worker.start()
            worker.join()
        assert isinstance(errors[0], CaptureViolation) is fails


def _try(fn):
    try:
        fn()
    except Exception as exc:  # the test inspects what the other thread met
        return exc
    return None


def test_capture_leaves_other_threads_working(built):
    """While one call captures a graph, another thread's first call (it allocates) goes through."""
    graphs, direct = _backend(built, cuda_graphs=True), _backend(built)
    met = []

    def other_thread(_device):
        HostDevice.on_capture = None  # once
        worker = threading.Thread(target=lambda: met.append(_try(lambda: direct.run("unet", unet_feeds()))))
        worker.start()
        worker.join()

    HostDevice.on_capture = other_thread
    try:
        graphs.run("unet", unet_feeds())
    finally:
        HostDevice.on_capture = None
    assert met == [None]


# ----------------------------------------------------------------------------------------- device and bindings
def test_engines_and_contexts_are_made_on_the_configured_device(built, sim, monkeypatch):
    seen = []
    for cls, method in ((sim.ICudaEngine, "create_execution_context"), (sim.Runtime, "deserialize_cuda_engine")):
        original = getattr(cls, method)

        def spy(self, *args, _original=original, _method=method):
            seen.append((_method, HostDevice.current_index()))
            return _original(self, *args)

        monkeypatch.setattr(cls, method, spy)
    backend = _backend(built, device=1)
    backend.run("unet", unet_feeds())
    assert {m for m, _ in seen} == {"create_execution_context", "deserialize_cuda_engine"}
    assert {index for _, index in seen} == {1}


def test_a_shape_tensorrt_refuses_is_a_typed_error(built, monkeypatch):
    """The engine's profile is checked first; if TensorRT still refuses a shape, the error names it."""
    import k3trt.runtime.backends.trt as trt_backend

    monkeypatch.setattr(trt_backend, "check_feeds_in_profile", lambda *args: None)  # as if the pre-check missed it
    backend = _backend(built)
    with pytest.raises(ShapeError, match=r"refused shape \(1, 4, 8, 8\) for input 'sample' of engine 'unet-fp32'"
                                         r".*profile: static \(2, 4, 8, 8\)"):
        backend.run("unet", unet_feeds(batch=1))


class _MisalignedDevice(HostDevice):
    """An allocator that hands out memory 64 bytes off TensorRT's 256-byte alignment."""

    def empty(self, numel, dtype):
        size = torch.empty((), dtype=dtype).element_size()
        return super().empty(int(numel) + 64 // size, dtype)[64 // size:]


def test_an_address_tensorrt_refuses_is_a_typed_error(built):
    from k3trt.contract.errors import BackendRuntimeError

    backend = _backend(built, device_api=_MisalignedDevice(0))
    with pytest.raises(BackendRuntimeError, match=r"refused the address 0x[0-9a-f]+ of tensor 'sample' "
                                                  r"\(2, 4, 8, 8\) for engine 'unet-fp32'"):
        backend.run("unet", unet_feeds())


def test_unaligned_feeds_are_copied_to_aligned_buffers(built):
    backend = _backend(built)
    feeds = unet_feeds()
    storage = torch.zeros(feeds["sample"].numel() + 1)
    shifted = storage[1:].view(feeds["sample"].shape)  # 4 bytes off any 256-byte boundary
    shifted.copy_(feeds["sample"])
    assert shifted.data_ptr() % 256
    want = backend.run("unet", feeds)["noise_pred"]
    assert torch.equal(backend.run("unet", {**feeds, "sample": shifted})["noise_pred"], want)


# ----------------------------------------------------------------------------------------- memory
def test_one_activation_block_per_lane_shared_by_all_engines(built, sim, monkeypatch):
    from k3trt.runtime.pipeline import Pipeline

    strategies = []
    original = sim.ICudaEngine.create_execution_context
    monkeypatch.setattr(sim.ICudaEngine, "create_execution_context",
                        lambda self, *args: strategies.append(args) or original(self, *args))
    backend = _backend(built, max_contexts=1)

    Pipeline(Manifest.load(built), backend).generate(PROMPTS[0], steps=1, output_type="np")
    (lane,) = backend._lanes.drain()
    needs = {name: eng.memory_bytes for name, eng in ((e.name, e) for e in backend._engines.values())}
    assert len(needs) == 3 and sum(needs.values()) > max(needs.values())
    assert lane.memory.numel() == max(needs.values())
    assert {c.device_memory for c in lane.contexts.values()} == {lane.memory.data_ptr()}
    assert strategies == [(sim.ExecutionContextAllocationStrategy.USER_MANAGED,)] * 3  # no memory of their own


def test_tensorrt_10_0_names(sim, tiny_artifacts, tmp_path):
    """10.0 has device_memory_size and the device_memory property (no _v2 / set_device_memory): still one block."""
    sim._sim.impersonate("10.0.1")
    try:
        root = build_tiny_engines(tiny_artifacts, tmp_path / "art", components="movq_decoder")
        backend = _backend(root)
        out = backend.run("movq_decoder", {"latents": torch.randn(1, 4, 8, 8)})["image"]
        (lane,) = backend._lanes.drain()
        (context,) = lane.contexts.values()
        assert torch.isfinite(out).all() and context.device_memory == lane.memory.data_ptr()
    finally:
        sim._sim.impersonate("11.4.0.106")


def test_renamed_members_exist_where_the_backend_looks_for_them():
    from k3trt.engines.api_surface import NEWEST, OLDEST, load_surface
    from k3trt.runtime.backends.trt import RENAMED

    old, new = load_surface(OLDEST)["members"], load_surface(NEWEST)["members"]
    for current, legacy in RENAMED.values():
        assert current in new["ICudaEngine"] and current not in old["ICudaEngine"]
        assert legacy in old["ICudaEngine"] and legacy not in new["ICudaEngine"]
    assert "set_device_memory" in new["IExecutionContext"] and "device_memory" in old["IExecutionContext"]
    for members in (old, new):
        assert "USER_MANAGED" in members["ExecutionContextAllocationStrategy"]


# ----------------------------------------------------------------------------------------- weight streaming
@pytest.fixture(scope="module")
def streamed(sim, tiny_artifacts, tmp_path_factory):
    """The text encoder built with TensorRT's WEIGHT_STREAMING flag (the build command has no option for it yet)."""
    import k3trt.engines.build as build

    original = build._config

    def with_streaming(*args):
        make = original(*args)

        def create(builder, network):
            config = make(builder, network)
            config.set_flag(sim.BuilderFlag.WEIGHT_STREAMING)
            return config
        return create

    build._config = with_streaming
    try:
        return build_tiny_engines(tiny_artifacts, tmp_path_factory.mktemp("streamed") / "art",
                                  components="text_encoder")
    finally:
        build._config = original


def test_weight_streaming_budget_for_the_text_encoder(streamed, built):
    feeds = {"input_ids": torch.randint(0, 300, (1, 128), dtype=torch.int32),
             "attention_mask": torch.ones(1, 128, dtype=torch.int32)}
    resident = _backend(streamed)
    want = resident.run("text_encoder", feeds)["last_hidden_state"]
    total = resident.engine("text_encoder").engine.streamable_weights_size
    backend = _backend(streamed, weight_streaming={"text_encoder": total // 2})
    got = backend.run("text_encoder", feeds)["last_hidden_state"]
    assert backend.engine("text_encoder").engine.weight_streaming_budget_v2 == total // 2
    assert torch.equal(got, want)
    with pytest.raises(InvalidArgumentError, match=f"accepted: 1..{total} bytes"):
        _backend(streamed, weight_streaming={"text_encoder": total + 1}).run("text_encoder", feeds)
    with pytest.raises(InvalidArgumentError, match="built without it"):
        _backend(built, weight_streaming={"text_encoder": 1 << 20}).run("text_encoder", feeds)
    with pytest.raises(InvalidArgumentError, match="weight_streaming="):
        _backend(built, weight_streaming={"text_encoder": 0})
