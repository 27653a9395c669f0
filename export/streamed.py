"""Full-size U-Net exports in bounded memory: the weights are never all in RAM, in fp32 or at all.

1. `write_random_unet`: a random-weight U-Net of any configuration in the diffusers layout (sharded
   `*.fp16.safetensors` + index + config), one tensor at a time: memory is one shard.
2. `export_unet_streamed`: trace the U-Net with every parameter a view into one shared buffer (the size of
   the largest weight), exported without weights (`export_params=False`: weights become graph inputs, nothing
   folded into them), then turn each weight input into an initializer whose bytes are streamed from the
   safetensors file into the external-data file, fp16 -> fp32, one tensor at a time.

The graph is the TorchScript tracer's, as in `onnx_export.trace_to_onnx`, minus weight constant folding (ONNX
Runtime and TensorRT fold the few Transposes of Linear weights when they load the model).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .components import SPECS
from .onnx_export import DEFAULT_OPSET, rank_static_pooling

SHARD_BYTES = 1 << 30
ALIGN = 4096  # external-data offsets page-aligned: ONNX Runtime can map them instead of copying


def _meta_unet(config: dict):
    from diffusers import Kandinsky3UNet

    with torch.device("meta"):
        return Kandinsky3UNet.from_config(config).eval()


def _random_tensor(name: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """Variance-preserving random weights (1/sqrt(fan-in)), zero biases, unit 1-D scales: finite at any depth."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.float16)
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.float16)
    fan_in = math.prod(shape[1:])
    return (torch.randn(shape, generator=gen) / math.sqrt(fan_in)).to(torch.float16)


def _shard_plan(shapes: dict[str, tuple], shard_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + ([current] if current else [])


def write_random_unet(out: str | os.PathLike, config: dict, *, seed: int = 0, shard_bytes: int = SHARD_BYTES,
                      log=print) -> Path:
    """`out/unet/`: config.json + fp16 safetensors shards + index, diffusers names; memory: one shard."""
    from safetensors.torch import save_file

    folder = Path(out) / "unet"
    folder.mkdir(parents=True, exist_ok=True)
    unet = _meta_unet(config)
    shapes = {name: tuple(t.shape) for name, t in unet.state_dict().items()}
    plan = _shard_plan(shapes, shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for index, names in enumerate(plan, 1):
        file = f"diffusion_pytorch_model.fp16-{index:05d}-of-{len(plan):05d}.safetensors"
        tensors = {name: _random_tensor(name, shapes[name], gen) for name in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({name: file for name in names})
        log(f"  wrote {file} ({len(names)} tensors)")
        del tensors
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text(json.dumps(index_json, indent=2))
    (folder / "config.json").write_text(json.dumps(dict(unet.config), indent=2, default=list))
    return folder


def _alias_parameters(module: torch.nn.Module) -> int:
    """Replace every (meta) parameter by a view at its own offset into one buffer; returns the buffer's bytes.
    The exporter merges parameters with equal values, so the buffer counts up (0, 1, 2, ...): no two views are
    equal. The traced values are meaningless; only the graph is kept."""
    params = list(module.named_parameters())
    largest = max(p.numel() for _, p in params)
    buffer = torch.arange(largest + len(params), dtype=torch.float32)
    for offset, (name, param) in enumerate(params):
        owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
        view = buffer[offset:offset + param.numel()].view(param.shape)
        owner._parameters[name.rpartition(".")[2]] = torch.nn.Parameter(view, requires_grad=False)
    return buffer.numel() * 4


def trace_weightless(model_dir: Path, path: Path, *, opset: int = DEFAULT_OPSET) -> dict:
    """The U-Net graph with its weights as inputs named by their state-dict keys (prefixed `unet.`)."""
    spec = SPECS["unet"]
    config = json.loads((model_dir / "unet" / "config.json").read_text())
    unet = _meta_unet(config)
    buffer_bytes = _alias_parameters(unet)
    info = {"context_dim": config["encoder_hid_dim"]}
    inputs = spec.make_inputs(spec.trace, info, torch.Generator().manual_seed(0))
    wrapper = spec.wrapper(unet).eval()
    with torch.no_grad(), warnings.catch_warnings(), rank_static_pooling(unet):
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(inputs[n] for n in spec.input_names), str(path),
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes(), opset_version=opset, export_params=False,
                          do_constant_folding=False, dynamo=False)
    return {"alias_buffer_bytes": buffer_bytes, "context_dim": info["context_dim"]}


def _weight_files(folder: Path) -> dict[str, Path]:
    """state-dict key -> the safetensors file holding it (sharded with an index, or a single file)."""
    indexes = sorted(folder.glob("*.safetensors.index*.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            out.update({name: file for name in handle.keys()})
    return out


def stream_weights(model, folder: Path, data_path: Path, *, prefix: str = "unet.") -> int:
    """Move every weight input of `model` into an initializer stored in `data_path`, read one tensor at a time
    from the safetensors in `folder` and written as fp32. Returns the bytes written."""
    from onnx import TensorProto
    from safetensors import safe_open

    files = _weight_files(folder)
    weights = [i for i in model.graph.input if i.name.startswith(prefix) and i.name[len(prefix):] in files]
    offset = 0
    with open(data_path, "wb") as data:
        for value in weights:
            with safe_open(str(files[value.name[len(prefix):]]), "pt") as handle:
                array = handle.get_tensor(value.name[len(prefix):]).to(torch.float32).numpy()
            offset = _append(data, offset, array)
            tensor = model.graph.initializer.add()
            tensor.name, tensor.data_type = value.name, TensorProto.FLOAT
            tensor.dims.extend(array.shape)
            tensor.data_location = TensorProto.EXTERNAL
            for key, val in (("location", data_path.name), ("offset", str(offset - array.nbytes)),
                             ("length", str(array.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, val
            del array
    keep = [i for i in model.graph.input if i not in weights]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return offset


def _append(handle, offset: int, array: np.ndarray) -> int:
    pad = -offset % ALIGN
    handle.write(b"\0" * pad)
    handle.write(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return offset + pad + array.nbytes


def export_unet_streamed(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                         opset: int = DEFAULT_OPSET) -> dict:
    """`out_dir/model.onnx` + `model.onnx.data` from a diffusers folder, in memory bounded by the graph plus
    one weight tensor. Returns paths and sizes."""
    import onnx

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "weightless.onnx"
    traced = trace_weightless(model_dir, raw, opset=opset)
    model = onnx.load(str(raw))
    data = out_dir / "model.onnx.data"
    written = stream_weights(model, model_dir / "unet", data)
    graph = out_dir / "model.onnx"
    onnx.save_model(model, str(graph))
    raw.unlink()
    return {"graph": graph, "data": data, "graph_bytes": graph.stat().st_size, "data_bytes": written, **traced}


# ----------------------------------------------------------------------------------------- bounded validation
def load_fp16_unet(model_dir: str | os.PathLike):
    """The U-Net with its fp16 weights as stored (shard by shard into a meta model): half the fp32 memory."""
    from safetensors.torch import load_file

    folder = Path(model_dir) / "unet"
    unet = _meta_unet(json.loads((folder / "config.json").read_text()))
    missing = {name for name, _ in unet.named_parameters()}
    for file in sorted(set(_weight_files(folder).values())):
        shard = load_file(str(file))
        unet.load_state_dict(shard, strict=False, assign=True)
        missing -= set(shard)
        del shard
    if missing:
        from ..runtime.errors import ModelSourceError

        raise ModelSourceError(f"{len(missing)} U-Net weights missing from {folder}, e.g. {sorted(missing)[:3]}",
                               fix="re-write the weights (write_random_unet) or re-download the checkpoint")
    return unet


class fp32_compute:
    """Run a module whose weights are stored in fp16 as if they were fp32: each submodule's own parameters are
    cast to fp32 just before its forward and dropped after, so one layer at a time exists in fp32. The result is
    the fp32 model's (fp16 -> fp32 is exact), in half its memory."""

    def __init__(self, module: torch.nn.Module):
        self.owners = [m for m in module.modules() if any(p is not None for p in m._parameters.values())]
        self.handles, self.stored = [], {}

    def _pre(self, module, *_):
        self.stored[id(module)] = dict(module._parameters)
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(param.float(), requires_grad=False)

    def _post(self, module, *_):
        module._parameters.update(self.stored.pop(id(module)))

    def __enter__(self):
        for owner in self.owners:
            self.handles += [owner.register_forward_pre_hook(self._pre), owner.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def reference_output(model_dir, inputs: dict) -> np.ndarray:
    """The U-Net's fp32 output for `inputs`, from its fp16 weights, in bounded memory."""
    spec = SPECS["unet"]
    unet = load_fp16_unet(model_dir)
    wrapper = spec.wrapper(unet).eval()
    with torch.no_grad(), fp32_compute(unet):
        return wrapper(*(inputs[n] for n in spec.input_names)).numpy()


def onnx_runtime_output(graph: str | os.PathLike, inputs: dict, *, threads: int | None = None) -> np.ndarray:
    """One ONNX Runtime call without graph optimizations or weight pre-packing: the weights stay in the
    (memory-mapped) external-data file instead of being copied into re-laid-out buffers."""
    import onnxruntime as ort

    from ..runtime.backends.ort import session_options

    options = session_options(threads=threads, optimize=False)
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
