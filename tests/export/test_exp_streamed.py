"""Bounded-memory U-Net export: random fp16 weights written shard by shard, a weightless trace, weights streamed
into external data; validated against the fp32 computation from the same fp16 weights."""
import json
import os
import resource
import shutil
import time

import numpy as np
import pytest
import torch

from k3trt.export.components import SPECS
from k3trt.export.low_memory_trace import _config_json as streamed_config_json
from k3trt.export.low_memory_trace import (export_streamed, export_unet_streamed, fp32_compute, load_fp16_unet,
                                   onnx_runtime_output, reference_output, streamed_reference_output,
                                   write_random_unet, write_random_weights)


def _rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs(context_dim: int, dims: dict) -> dict:
    spec = SPECS["unet"]
    return spec.make_inputs(dims, {"context_dim": context_dim}, torch.Generator().manual_seed(1))


def test_streamed_export_of_a_sharded_fp16_unet_matches_its_fp32_computation(tiny_model_dir, tmp_path):
    config = json.loads((tiny_model_dir / "unet" / "config.json").read_text())
    folder = write_random_unet(tmp_path / "model", config, shard_bytes=200_000, log=lambda *_: None)
    shards = sorted(folder.glob("*.fp16-*-of-*.safetensors"))
    assert len(shards) > 3 and (folder / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    result = export_unet_streamed(tmp_path / "model", tmp_path / "onnx")
    params = sum(p.numel() for p in load_fp16_unet(tmp_path / "model").parameters())
    assert params * 4 <= result["data_bytes"] < params * 4 * 1.1  # every weight, in fp32 (+ page alignment)
    inputs = _inputs(config["encoder_hid_dim"], SPECS["unet"].validate[1])
    ours = onnx_runtime_output(result["graph"], inputs)
    reference = reference_output(tmp_path / "model", inputs)
    assert np.isfinite(ours).all() and _rel_l2(ours, reference) < 1e-4


def test_fp32_compute_equals_the_fp32_model(tiny_model_dir):
    from diffusers import Kandinsky3UNet

    fp32 = Kandinsky3UNet.from_pretrained(str(tiny_model_dir / "unet")).eval()
    half = Kandinsky3UNet.from_pretrained(str(tiny_model_dir / "unet")).eval().half()
    fp32.load_state_dict({k: v.float() for k, v in half.state_dict().items()})  # the same fp16-rounded weights
    inputs = _inputs(64, SPECS["unet"].validate[0])
    wrap = SPECS["unet"].wrapper
    with torch.no_grad(), fp32_compute(half):
        got = wrap(half)(*inputs.values())
    with torch.no_grad():
        want = wrap(fp32)(*inputs.values())
    assert torch.equal(got, want)
    assert all(p.dtype == torch.float16 for p in half.parameters())  # restored after the call


def _tiny_t5_config() -> dict:
    from k3trt.export.presets import PRESETS

    return dict(PRESETS["tiny"].t5, vocab_size=384)


def test_streamed_text_encoder_export_matches_the_layer_streamed_fp32_reference(tmp_path):
    """T5 (tied embedding, relative position bias): fp16 shards -> weightless trace -> streamed fp32 data; the
    reference reads one layer's weights from the shards at a time and equals the loaded model's output."""
    from transformers import T5EncoderModel

    config = _tiny_t5_config()
    folder = write_random_weights(tmp_path / "model", "text_encoder", config, shard_bytes=50_000,
                                  log=lambda *_: None)
    assert len(sorted(folder.glob("model.fp16-*-of-*.safetensors"))) > 3
    result = export_streamed(tmp_path / "model", tmp_path / "onnx", component="text_encoder")
    spec = SPECS["text_encoder"]
    inputs = spec.make_inputs(spec.validate[1], {"vocab_size": 384, "hidden": config["d_model"]},
                              torch.Generator().manual_seed(1))
    streamed = streamed_reference_output(tmp_path / "model", inputs, component="text_encoder")
    loaded = T5EncoderModel.from_pretrained(str(folder), variant="fp16", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        direct = spec.wrapper(loaded)(*(inputs[n] for n in spec.input_names)).numpy()
    np.testing.assert_allclose(streamed, direct, rtol=1e-5, atol=1e-6)
    ours = onnx_runtime_output(result["graph"], inputs)
    assert np.isfinite(ours).all() and _rel_l2(ours, streamed) < 1e-4
    import onnx

    graph = onnx.load(str(result["graph"]), load_external_data=False).graph
    stored = {i.name for i in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "Transpose" and n.input[0] in stored]  # folded
    assert sum(n.op_type == "MatMul" and n.input[1] in stored for n in graph.node) >= 7 * config["num_layers"]


def test_streamed_export_refuses_before_writing_when_the_disk_is_too_small(tmp_path, monkeypatch):
    import shutil

    from k3trt.contract.errors import InvalidArgumentError

    write_random_weights(tmp_path / "model", "text_encoder", _tiny_t5_config(), log=lambda *_: None)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(InvalidArgumentError, match="GB free"):
        export_streamed(tmp_path / "model", tmp_path / "onnx", component="text_encoder")
    assert not (tmp_path / "onnx").exists()


def _free_gb() -> float:
    with open("/proc/meminfo") as handle:
        info = {line.split(":")[0]: int(line.split()[1]) for line in handle}
    return info["MemAvailable"] / 1024**2


@pytest.mark.slow
def test_full_size_unet_export_in_bounded_memory(tmp_path_factory):
    """The real 3.06 B configuration: ~6 GB of fp16 weights, ~12 GB of ONNX external data; peak RSS stays far
    below the fp32 weights. Run by hand: K3TRT_FULL_DIR=/big/disk pytest -m slow -k full_size -s"""
    from k3trt.export.presets import PRESETS

    root = os.environ.get("K3TRT_FULL_DIR")
    if _free_gb() < 16:
        pytest.skip(f"needs >= 16 GB of available memory, {_free_gb():.1f} GB available")
    base = tmp_path_factory.mktemp("full") if root is None else __import__("pathlib").Path(root)
    if shutil.disk_usage(base).free < 25e9:
        pytest.skip(f"needs 25 GB of free disk under {base}")
    config = dict(in_channels=4, **PRESETS["full"].unet)
    start = time.perf_counter()
    if not (base / "model" / "unet" / "config.json").is_file():
        write_random_unet(base / "model", config)
    result = export_unet_streamed(base / "model", base / "onnx")
    seconds = time.perf_counter() - start
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"full U-Net: export {seconds:.0f} s, peak RSS {rss_gb:.2f} GB, graph {result['graph_bytes'] / 1e6:.1f} MB, "
          f"data {result['data_bytes'] / 1e9:.2f} GB")
    assert rss_gb < 4.0  # the fp32 weights alone are 12.2 GB
    assert result["data_bytes"] > 3.0e9 * 4


@pytest.mark.slow
def test_full_size_text_encoder_export_in_bounded_memory(tmp_path_factory):
    """FLAN-UL2's 8.6 B encoder: ~17 GB of fp16 weights, ~35 GB of ONNX external data; peak RSS stays far below
    either. Run by hand: K3TRT_FULL_DIR=/big/disk pytest -m slow -k full_size_text -s"""
    from k3trt.export.presets import PRESETS

    root = os.environ.get("K3TRT_FULL_DIR")
    base = tmp_path_factory.mktemp("full-t5") if root is None else __import__("pathlib").Path(root)
    model_written = (base / "model" / "text_encoder" / "config.json").is_file()
    if shutil.disk_usage(base).free < (38e9 if model_written else 56e9):
        pytest.skip(f"needs 56 GB of free disk under {base} (17 GB weights + 35 GB ONNX data)")
    config = dict(PRESETS["full"].t5, vocab_size=PRESETS["full"].vocab_size)
    start = time.perf_counter()
    if not model_written:
        write_random_weights(base / "model", "text_encoder", config)
    written = time.perf_counter()
    result = export_streamed(base / "model", base / "onnx", component="text_encoder")
    seconds = time.perf_counter() - written
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"full text encoder: weights written in {written - start:.0f} s, export {seconds:.0f} s, peak RSS "
          f"{rss_gb:.2f} GB, graph {result['graph_bytes'] / 1e6:.1f} MB, data {result['data_bytes'] / 1e9:.2f} GB")
    assert rss_gb < 4.0  # the fp32 weights alone are ~35 GB
    assert result["data_bytes"] > 8.5e9 * 4


@pytest.mark.slow
@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_full_size_weightless_trace_and_cleanup(component, tmp_path):
    """The full-size graph alone (config only, no weights): the weightless trace and the regular export's cleanup
    that `export_streamed` applies before streaming the weights. Run by hand:
    pytest -m slow -k weightless_trace -s tests/export/test_exp_streamed.py"""
    import onnx

    from k3trt.export.presets import PRESETS
    from k3trt.export.low_memory_trace import STREAMED, _cleaned, trace_weightless

    full = PRESETS["full"]
    config = dict(in_channels=4, **full.unet) if component == "unet" else dict(full.t5, vocab_size=full.vocab_size)
    build, sub, _, _ = STREAMED[component]
    (tmp_path / sub).mkdir()
    (tmp_path / sub / "config.json").write_text(streamed_config_json(build(config), component))
    start = time.perf_counter()
    trace_weightless(tmp_path, tmp_path / "weightless.onnx", component=component)
    traced = time.perf_counter()
    raw = onnx.load(str(tmp_path / "weightless.onnx"))
    before = len(raw.graph.node)
    clean = _cleaned(raw, component)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"full {component}: weightless trace {traced - start:.0f} s, cleanup {time.perf_counter() - traced:.0f} s, "
          f"nodes {before} -> {len(clean.graph.node)}, graph {clean.ByteSize() / 1e6:.1f} MB, peak RSS {rss_gb:.2f} GB")
    assert len(clean.graph.node) < before and rss_gb < 4.0
