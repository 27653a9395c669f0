"""The TensorRT stand-in's runtime contract: plans, profiles, binding rules, numerics, graphs, compatibility.

Each test exercises a rule the stand-in takes from TensorRT's documentation (cited where it is implemented,
tests/trt_sim/tensorrt/_runtime.py), on a one-MatMul ONNX built through the stand-in's own builder."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

pytestmark = [pytest.mark.trt_sim, pytest.mark.usefixtures("trt_sim")]

WEIGHT = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


@pytest.fixture(scope="module")
def matmul_onnx(tmp_path_factory):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [numpy_helper.from_array(WEIGHT, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path_factory.mktemp("sim") / "mm.onnx"
    onnx.save(model, path)
    return path


def build(trt, path, *, flags=(), profile=((1, 4), (2, 4), (4, 4)), logger=None):
    logger = logger or trt.Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path))
    config = builder.create_builder_config()
    shapes = builder.create_optimization_profile()
    shapes.set_shape("x", *profile)
    assert config.add_optimization_profile(shapes) == 0
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    return builder.build_serialized_network(network, config)


def aligned(shape, dtype=torch.float32):
    """A host tensor at a 256-byte aligned address (cudaMalloc gives 256-byte aligned device memory)."""
    from tensorrt import _sim

    return _sim.host_buffer(shape, dtype)


def bound_context(trt, plan, batch=2, logger=None):
    engine = trt.Runtime(logger or trt.Logger()).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    x, y = aligned((batch, 4)), aligned((batch, 3))
    x.copy_(torch.randn(batch, 4))
    assert context.set_input_shape("x", (batch, 4))
    assert context.set_tensor_address("x", x.data_ptr()) and context.set_tensor_address("y", y.data_ptr())
    return engine, context, x, y


def test_an_engine_computes_its_onnx_on_the_bound_memory(trt_sim, matmul_onnx):
    engine, context, x, y = bound_context(trt_sim, build(trt_sim, matmul_onnx))
    assert [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)] == ["x", "y"]
    assert engine.get_tensor_mode("x") == trt_sim.TensorIOMode.INPUT and engine.get_tensor_dtype("y") == \
        trt_sim.float32
    assert tuple(context.get_tensor_shape("y")) == (2, 3)
    assert context.execute_async_v3(0)
    assert torch.allclose(y, x @ torch.from_numpy(WEIGHT), atol=1e-6)


def test_set_input_shape_is_false_outside_the_profile(trt_sim, matmul_onnx):
    logger = trt_sim.Logger()
    engine = trt_sim.Runtime(logger).deserialize_cuda_engine(build(trt_sim, matmul_onnx))
    context = engine.create_execution_context()
    assert [tuple(s) for s in engine.get_tensor_profile_shape("x", 0)] == [(1, 4), (2, 4), (4, 4)]
    assert not context.set_input_shape("x", (5, 4))  # above max
    assert not context.set_input_shape("x", (2, 5))  # a static dimension differs
    assert not context.set_input_shape("y", (2, 3))  # not an input
    assert context.set_input_shape("x", (4, 4))
    assert "profile allows" in logger._messages[0][1]


def test_execute_refuses_unbound_and_misaligned_tensors(trt_sim, matmul_onnx):
    logger = trt_sim.Logger()
    engine = trt_sim.Runtime(logger).deserialize_cuda_engine(build(trt_sim, matmul_onnx))
    context = engine.create_execution_context()
    x, y = aligned((2, 4)), aligned((2, 3))
    assert not context.execute_async_v3(0)  # no input shape
    assert context.set_input_shape("x", (2, 4)) and context.set_tensor_address("x", x.data_ptr())
    assert not context.execute_async_v3(0)  # output unbound
    assert not context.set_tensor_address("y", y.data_ptr() + 4)  # not 256-byte aligned
    assert not context.execute_async_v3(0)
    assert context.set_tensor_address("y", y.data_ptr()) and context.execute_async_v3(0)
    assert any("256-byte" in message for _, message in logger._messages)


def test_user_managed_contexts_need_device_memory(trt_sim, matmul_onnx):
    engine = trt_sim.Runtime(trt_sim.Logger()).deserialize_cuda_engine(build(trt_sim, matmul_onnx))
    context = engine.create_execution_context(trt_sim.ExecutionContextAllocationStrategy.USER_MANAGED)
    x, y, scratch = aligned((2, 4)), aligned((2, 3)), aligned((engine.device_memory_size_v2,), torch.uint8)
    context.set_input_shape("x", (2, 4))
    context.set_tensor_address("x", x.data_ptr())
    context.set_tensor_address("y", y.data_ptr())
    assert not context.execute_async_v3(0)
    context.set_device_memory(scratch.data_ptr(), engine.device_memory_size_v2)
    assert context.execute_async_v3(0)


def test_a_captured_graph_replays_the_captured_bindings(trt_sim, matmul_onnx):
    """A CUDA graph replays the launch it recorded: re-binding the context afterwards does not change it."""
    _, context, x, y = bound_context(trt_sim, build(trt_sim, matmul_onnx))
    with trt_sim._sim.capture(stream_handle=7):
        assert not context.execute_async_v3(7)  # no uncaptured enqueue since the shape was set
    assert context.execute_async_v3(0)
    y.zero_()
    with trt_sim._sim.capture(stream_handle=7) as graph:
        assert context.execute_async_v3(7)
    assert not y.abs().sum()  # capture records, it does not run
    other = aligned((2, 3))
    context.set_tensor_address("y", other.data_ptr())  # what a stale graph would not see
    graph.replay()
    assert torch.allclose(y, x @ torch.from_numpy(WEIGHT), atol=1e-6) and not other.abs().sum()


def test_plans_are_bound_to_the_version_and_gpu_that_built_them(trt_sim, matmul_onnx):
    plan = build(trt_sim, matmul_onnx)
    logger = trt_sim.Logger()
    trt_sim._sim.set_device("NVIDIA H100", (9, 0))
    assert trt_sim.Runtime(logger).deserialize_cuda_engine(plan) is None
    assert "incompatible device" in logger._messages[-1][1]
    trt_sim._sim.reset()
    trt_sim._sim.impersonate("10.0.1")
    assert trt_sim.Runtime(logger).deserialize_cuda_engine(plan) is None
    assert "not compatible with this version" in logger._messages[-1][1]
    assert trt_sim.Runtime(logger).deserialize_cuda_engine(b"not a plan") is None


def test_a_serialized_engine_round_trips(trt_sim, matmul_onnx):
    engine, *_ = bound_context(trt_sim, build(trt_sim, matmul_onnx))
    again, context, x, y = bound_context(trt_sim, engine.serialize())
    assert context.execute_async_v3(0) and torch.allclose(y, x @ torch.from_numpy(WEIGHT), atol=1e-6)


def test_a_too_old_driver_gives_null_builder_and_runtime(trt_sim):
    trt_sim._sim.set_driver_ok(False)
    for factory in (trt_sim.Builder, trt_sim.Runtime):
        with pytest.raises(TypeError, match="factory function returned nullptr"):
            factory(trt_sim.Logger())


def test_weight_streaming_needs_the_build_flag(trt_sim, matmul_onnx):
    plain = trt_sim.Runtime(trt_sim.Logger()).deserialize_cuda_engine(build(trt_sim, matmul_onnx))
    streamed = trt_sim.Runtime(trt_sim.Logger()).deserialize_cuda_engine(
        build(trt_sim, matmul_onnx, flags=["WEIGHT_STREAMING"]))
    assert plain.streamable_weights_size == 0 and streamed.streamable_weights_size == WEIGHT.nbytes
    streamed.weight_streaming_budget_v2 = 16
    assert streamed.weight_streaming_budget_v2 == 16


def test_a_graph_replayed_after_its_context_changed_shape_is_garbage(trt_sim, matmul_onnx):
    """One context, graph A captured at batch 2, then an enqueue at batch 3: replaying A meets batch-3 state."""
    engine, context, x, y = bound_context(trt_sim, build(trt_sim, matmul_onnx))
    assert context.execute_async_v3(0)
    with trt_sim._sim.capture(stream_handle=7) as graph:
        assert context.execute_async_v3(7)
    x3, y3 = aligned((3, 4)), aligned((3, 3))
    assert context.set_input_shape("x", (3, 4)) and context.set_tensor_address("x", x3.data_ptr())
    assert context.set_tensor_address("y", y3.data_ptr()) and context.execute_async_v3(0)
    graph.replay()
    assert torch.isnan(y).all()


def test_polygraphy_loaders_round_trip_an_engine_through_a_file(trt_sim, matmul_onnx, tmp_path):
    """Polygraphy's own loaders, unchanged, against the stand-in: build, save, load from the path, run."""
    from polygraphy.backend.trt import (CreateConfig, EngineBytesFromNetwork, EngineFromBytes, EngineFromPath,
                                        NetworkFromOnnxPath, Profile, SaveEngine)

    profile = Profile().add("x", min=(1, 4), opt=(2, 4), max=(4, 4))
    built = EngineFromBytes(EngineBytesFromNetwork(NetworkFromOnnxPath(str(matmul_onnx), strongly_typed=True),
                                                   config=CreateConfig(profiles=[profile], tf32=True)))
    SaveEngine(built, str(tmp_path / "mm.plan"))()
    engine = EngineFromPath(str(tmp_path / "mm.plan"))()
    x = torch.randn(3, 4)
    y = trt_sim._sim.run(engine, {"x": x})["y"]
    assert torch.allclose(y, x @ torch.from_numpy(WEIGHT), atol=1e-6)
    assert "TF32" in trt_sim._sim.state().builds[-1]["flags"]


def test_polygraphy_refuses_weak_typing_flags_on_tensorrt_11(trt_sim, matmul_onnx):
    """TensorRT 11 removed BuilderFlag.FP16: Polygraphy's CreateConfig(fp16=True) fails there, not silently."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException

    network = NetworkFromOnnxPath(str(matmul_onnx))
    with pytest.raises(PolygraphyException, match="fp16"):
        EngineBytesFromNetwork(network, config=CreateConfig(fp16=True))()
    trt_sim._sim.impersonate("10.0.1")
    assert EngineBytesFromNetwork(network, config=CreateConfig(fp16=True))() is not None
