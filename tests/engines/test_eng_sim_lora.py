"""LoRA on a refittable TensorRT engine through the stand-in: only the adapter's weights are refit by name, the
engine then computes what ONNX Runtime computes with the same initializers replaced, and refitting the base
values back gives the base engine's output bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from k3trt.verify.lora_training import train_peft_lora

pytestmark = [pytest.mark.trt_sim, pytest.mark.usefixtures("trt_sim")]
SHAPES = {"sample": (2, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 6, 64),
          "encoder_attention_mask": (2, 6)}
LORA_ATOL = 1e-4  # engine (stand-in: ONNX Runtime inside) vs our ONNX Runtime session, fp32 on one graph


def aligned(shape, alignment=256):
    """A host tensor at a 256-byte aligned address (the stand-in's binding rule, as cudaMalloc'd memory)."""
    count = int(np.prod(shape))
    raw = torch.zeros(count + alignment)
    skip = (-raw.data_ptr() % alignment) // raw.element_size()
    return raw[skip:skip + count].view(shape)


def _refittable_engine(trt, onnx_path):
    logger = trt.Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(onnx_path))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, shape in SHAPES.items():
        profile.set_shape(name, shape, shape, shape)
    config.add_optimization_profile(profile)
    config.set_flag(trt.BuilderFlag.REFIT)
    return trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(network, config))


def _run(engine, feeds):
    context = engine.create_execution_context()
    bound = {}
    for name, value in feeds.items():
        bound[name] = aligned(value.shape)
        bound[name].copy_(torch.from_numpy(value))
        assert context.set_input_shape(name, value.shape) and context.set_tensor_address(name, bound[name].data_ptr())
    out = aligned(tuple(context.get_tensor_shape("noise_pred")))
    assert context.set_tensor_address("noise_pred", out.data_ptr()) and context.execute_async_v3(0)
    return out.numpy().copy()


def test_lora_refit_by_name_matches_onnx_runtime_and_restores_the_base(trt_sim, tiny_artifacts, tiny_model_dir,
                                                                       tmp_path):
    from k3trt.contract.manifest import Manifest
    from k3trt.runtime.backends.ort import OrtBackend
    from k3trt.runtime.backends.trt_refit import refit_named
    from k3trt.runtime.lora import load_loras, read_initializers, weight_overrides

    train_peft_lora(tiny_model_dir, tmp_path / "adapter", steps=3)
    manifest = Manifest.load(tiny_artifacts)
    graph = manifest.onnx("unet").graph.path
    overrides = weight_overrides(manifest, {"unet": graph}, load_loras(str(tmp_path / "adapter")))
    gen = np.random.default_rng(0)
    feeds = {n: gen.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    feeds["encoder_attention_mask"] = np.ones(SHAPES["encoder_attention_mask"], np.float32)
    feeds["timestep"] = np.array([10.0, 500.0], np.float32)

    engine = _refittable_engine(trt_sim, manifest.path(graph))
    base_out = _run(engine, feeds)
    base = lambda names: read_initializers(manifest, graph, list(names))  # noqa: E731
    assert refit_named(trt_sim, engine, overrides["unet"], base, "unet-fp32", trt_sim.Logger()) == \
        len(overrides["unet"])  # the adapter's weights only (a MatMul's weight has no partner to re-send)
    lora_out = _run(engine, feeds)
    ort = OrtBackend(manifest, "fp32")
    ort.set_weights(overrides)
    expected = ort.run("unet", {k: torch.from_numpy(v) for k, v in feeds.items()})["noise_pred"].numpy()
    assert np.abs(lora_out - expected).max() <= LORA_ATOL and np.abs(lora_out - base_out).max() > 100 * LORA_ATOL
    refit_named(trt_sim, engine, base(overrides["unet"]), base, "unet-fp32", trt_sim.Logger())
    assert np.array_equal(_run(engine, feeds), base_out)


def test_k3trt_refit_sets_only_the_changed_weight_by_name(trt_sim, artifacts_copy, tiny_model_dir, tmp_path):
    """`k3trt refit` from a one-weight fine-tune: one weight set by name (no export), and the refit engine
    computes what ONNX Runtime computes with that initializer replaced."""
    import shutil

    from safetensors.torch import load_file, save_file

    from k3trt.contract.manifest import Manifest
    from k3trt.engines.build import build_engines
    from k3trt.engines.plan import BuildFlags, make_plan
    from k3trt.engines.refit import changed_weights, refit_artifacts
    from k3trt.export.sources import open_model_dir
    from k3trt.runtime.backends.ort import OrtBackend

    manifest = Manifest.load(artifacts_copy)
    build_engines(make_plan(manifest, components="unet", precision="fp32", resolutions=["64x64"], batch="1",
                            flags=BuildFlags(refittable=True)), manifest, log=lambda *_: None)
    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_model_dir, tuned)
    file = next((tuned / "unet").glob("*.safetensors"))
    tensors = load_file(str(file))
    tensors["down_blocks.1.attentions.0.attention.to_v.weight"] *= 1.5
    save_file(tensors, str(file), metadata={"format": "pt"})

    assert refit_artifacts(str(artifacts_copy), str(tuned), components=["unet"], log=lambda *_: None) == ["unet-fp32"]
    manifest = Manifest.load(artifacts_copy)
    entry = manifest.data["engines"]["unet-fp32"]
    assert entry["refit"]["how"] == "by_name" and entry["refit"]["weights"] == 1
    engine = trt_sim.Runtime(trt_sim.Logger()).deserialize_cuda_engine(manifest.path(entry["file"]["path"]).read_bytes())
    gen = np.random.default_rng(1)
    feeds = {n: gen.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    feeds["encoder_attention_mask"] = np.ones(SHAPES["encoder_attention_mask"], np.float32)
    feeds["timestep"] = np.array([10.0, 500.0], np.float32)
    ort = OrtBackend(manifest, "fp32")
    ort.set_weights({"unet": changed_weights(manifest, "unet", "fp32", open_model_dir(tuned))[0]})
    expected = ort.run("unet", {k: torch.from_numpy(v) for k, v in feeds.items()})["noise_pred"].numpy()
    assert np.abs(_run(engine, feeds) - expected).max() <= LORA_ATOL
