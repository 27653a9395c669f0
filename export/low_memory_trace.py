"""Full-size exports in bounded memory (the U-Net and the T5 text encoder): the weights are never all in RAM,
in fp32 or at all.

1. `write_random_weights`: a random-weight component of any configuration in the diffusers layout (sharded
   `*.fp16.safetensors` + index + config), one tensor at a time: memory is one shard.
2. `export_streamed`: trace the component with every parameter a view into one shared buffer (the size of
   the largest weight), exported without weights (`export_params=False`: weights become graph inputs, nothing
   folded into them), then turn each weight input into an initializer whose bytes are streamed from the
   safetensors file into the external-data file, fp16 -> fp32, one tensor at a time.
3. `streamed_reference_output`: the fp32 computation from the fp16 files with one layer's weights in memory.

The graph is the TorchScript tracer's, as in `onnx_export.trace_to_onnx`, cleaned the same way
(`onnx_export.cleanup`) while the weights are still graph inputs; the Transposes of Linear weights are folded
while the weights are streamed (`_weight_transposes`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from k3trt.contract.errors import InvalidArgumentError, ModelSourceError
from k3trt.export.components import SPECS
from k3trt.export.onnx_export import DEFAULT_OPSET, rank_static_pooling

SHARD_BYTES = 1 << 30
ALIGN = 4096  # external-data offsets page-aligned: ONNX Runtime can map them instead of copying


def _meta_unet(config: dict):
    from diffusers import Kandinsky3UNet

    with torch.device("meta"):
        return Kandinsky3UNet.from_config(config).eval()


def _meta_text_encoder(config: dict):
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        return T5EncoderModel(T5Config(**config)).eval()


# component -> (meta builder, diffusers sub-folder, weight file stem, graph-input prefix of the ONNX wrapper)
STREAMED = {
    "unet": (_meta_unet, "unet", "diffusion_pytorch_model", "unet."),
    "text_encoder": (_meta_text_encoder, "text_encoder", "model", "encoder."),
}


def _streamed(component: str):
    if component not in STREAMED:

        raise InvalidArgumentError(f"component {component!r} has no bounded-memory export",
                                   accepted=", ".join(STREAMED), fix="export it with `k3trt export`")
    return STREAMED[component]


def _config_json(model, component: str) -> str:
    """transformers configs serialise themselves; diffusers' is a frozen dict (tuples written as lists)."""
    if component == "text_encoder":
        return model.config.to_json_string()
    return json.dumps(dict(model.config), indent=2, default=list)


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


def write_random_unet(out: str | os.PathLike, config: dict, **options) -> Path:
    return write_random_weights(out, "unet", config, **options)


def write_random_weights(out: str | os.PathLike, component: str, config: dict, *, seed: int = 0,
                         shard_bytes: int = SHARD_BYTES, log=print) -> Path:
    """`out/<folder>/`: config.json + fp16 safetensors shards + index, diffusers/transformers names; memory:
    one shard. Tied weights (T5's shared embedding) are written once, under their first name."""
    from safetensors.torch import save_file

    build, sub, stem, _ = _streamed(component)
    folder = Path(out) / sub
    folder.mkdir(parents=True, exist_ok=True)
    model = build(config)
    shapes = {name: tuple(t.shape) for name, t in model.named_parameters()}
    plan = _shard_plan(shapes, shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for index, names in enumerate(plan, 1):
        file = f"{stem}.fp16-{index:05d}-of-{len(plan):05d}.safetensors"
        tensors = {name: _random_tensor(name, shapes[name], gen) for name in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({name: file for name in names})
        log(f"  wrote {file} ({len(names)} tensors)")
        del tensors
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.fp16.json").write_text(json.dumps(index_json, indent=2))
    (folder / "config.json").write_text(_config_json(model, component))
    return folder


def _alias_parameters(module: torch.nn.Module) -> int:
    """Replace every (meta) parameter by a view at its own offset into one buffer; returns the buffer's bytes.
    The exporter merges parameters with equal values, so the buffer counts up (0, 1, 2, ...): no two views are
    equal. The traced values are meaningless; only the graph is kept."""
    params = list(module.named_parameters())
    largest = max(p.numel() for _, p in params)
    buffer = torch.arange(largest + len(params), dtype=torch.float32)
    views = {id(param): torch.nn.Parameter(buffer[offset:offset + param.numel()].view(param.shape),
                                           requires_grad=False) for offset, (_, param) in enumerate(params)}
    for name, param in module.named_parameters(remove_duplicate=False):  # tied weights: every owner, one view
        owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
        owner._parameters[name.rpartition(".")[2]] = views[id(param)]
    return buffer.numel() * 4


def _tied_names(module: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Every parameter name -> every name of that parameter, first name first. A tied weight (T5's `shared` and
    `encoder.embed_tokens`) is stored once, under whichever name the saving library kept."""
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {name: tuple(names[id(param)]) for name, param in module.named_parameters(remove_duplicate=False)}


def _stored_key(name: str, tied: dict[str, tuple[str, ...]], files: dict[str, Path]) -> str | None:
    """The key `name`'s tensor is stored under in `files` (itself or a tied name), None if absent."""
    return next((alias for alias in tied.get(name, (name,)) if alias in files), None)


def _model_info(component: str, config: dict) -> dict:
    if component == "text_encoder":
        return {"vocab_size": config["vocab_size"], "hidden": config["d_model"]}
    return {"context_dim": config["encoder_hid_dim"]}


def trace_weightless(model_dir: Path, path: Path, *, component: str = "unet", opset: int = DEFAULT_OPSET) -> dict:
    """The component's graph with its weights as inputs named by their parameter names (prefixed by the
    wrapper's attribute: `unet.`, `encoder.`)."""
    build, sub, _, _ = _streamed(component)
    spec = SPECS[component]
    config = json.loads((model_dir / sub / "config.json").read_text())
    model = build(config)
    tied = _tied_names(model)
    buffer_bytes = _alias_parameters(model)
    info = _model_info(component, config)
    inputs = spec.make_inputs(spec.trace, info, torch.Generator().manual_seed(0))
    wrapper = spec.wrapper(model).eval()
    pooling = rank_static_pooling(model) if component == "unet" else contextlib.nullcontext()
    with torch.no_grad(), warnings.catch_warnings(), pooling:
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(inputs[n] for n in spec.input_names), str(path),
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes(), opset_version=opset, export_params=False,
                          do_constant_folding=False, dynamo=False)
    return {"alias_buffer_bytes": buffer_bytes, "tied": tied, **info}


def _weight_files(folder: Path, variant: str | None = "auto") -> dict[str, Path]:
    """state-dict key -> the safetensors file holding it, among the files of one variant (`sources.variant_files`:
    `*.fp16*.safetensors` for "fp16", files without a variant for None; "auto": fp16 only where no plain files
    exist, as `k3trt export` detects it). Keys come from each file's header, so a folder holding both variants
    (the hub's layout) never mixes them, and an index file is not needed."""
    from k3trt.export.sources import variant_files
    from safetensors import safe_open

    if variant == "auto":
        variant = None if variant_files(folder, None) else "fp16"
    out = {}
    for file in variant_files(folder, variant):
        with safe_open(str(file), "pt") as handle:
            out.update({name: file for name in handle.keys()})
    return out


def stream_weights(model, folder: Path, data_path: Path, *, prefix: str = "unet.", variant: str | None = "auto",
                   tied: dict[str, tuple[str, ...]] | None = None) -> int:
    """Move every weight input of `model` into an initializer stored in `data_path`, read one tensor at a time
    from the safetensors in `folder` and written as fp32. `tied`: `_tied_names` of the traced module. Returns
    the bytes written."""
    from onnx import TensorProto
    from safetensors import safe_open

    files, tied = _weight_files(folder, variant), tied or {}
    keys = {i.name: _stored_key(i.name[len(prefix):], tied, files) for i in model.graph.input
            if i.name.startswith(prefix)}
    weights = [i for i in model.graph.input if keys.get(i.name)]
    transposes = _weight_transposes(model, {w.name for w in weights})
    offset = 0
    with open(data_path, "wb") as data:
        for value in weights:
            with safe_open(str(files[keys[value.name]]), "pt") as handle:
                array = handle.get_tensor(keys[value.name]).to(torch.float32).numpy()
            name = value.name
            if name in transposes:  # folded here: stored as the Transpose's output, the node removed
                node = transposes[name]
                array, name = np.ascontiguousarray(array.transpose(_perm(node, array.ndim))), node.output[0]
            offset = _append(data, offset, array)
            tensor = model.graph.initializer.add()
            tensor.name, tensor.data_type = name, TensorProto.FLOAT
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
    folded = {id(n) for n in transposes.values()}
    nodes = [n for n in model.graph.node if id(n) not in folded]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return offset


def _weight_transposes(model, weights: set[str]) -> dict:
    """Weights read only by one Transpose (Linear layers on 3-D inputs export as MatMul(x, Transpose(W))).
    Without constant folding these run at every call, and ONNX Runtime schedules them all first (they do not
    depend on the input), so every transposed weight of the model is alive at once: the full T5 encoder took
    19.7 GB of anonymous memory that way. Folding them here is what `do_constant_folding` does for a traced
    export."""
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return {name: nodes[0] for name in weights if len(nodes := readers.get(name, [])) == 1
            and nodes[0].op_type == "Transpose"}


def _perm(node, ndim: int) -> tuple[int, ...]:
    for attribute in node.attribute:
        if attribute.name == "perm":
            return tuple(attribute.ints)
    return tuple(reversed(range(ndim)))  # ONNX's default: reverse the dimensions


def _append(handle, offset: int, array: np.ndarray) -> int:
    pad = -offset % ALIGN
    handle.write(b"\0" * pad)
    handle.write(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return offset + pad + array.nbytes


def export_unet_streamed(model_dir: str | os.PathLike, out_dir: str | os.PathLike, **options) -> dict:
    return export_streamed(model_dir, out_dir, component="unet", **options)


def fp32_data_bytes(model_dir: Path, component: str, variant: str | None = "auto") -> int:
    """The external-data size an export will write: every stored weight in fp32 (before page alignment), from
    the safetensors headers (fp16 or fp32 files alike)."""
    from safetensors import safe_open

    _, sub, _, _ = _streamed(component)
    total = 0
    for file in sorted(set(_weight_files(Path(model_dir) / sub, variant).values())):
        with safe_open(str(file), "pt") as handle:
            total += sum(4 * math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total


def check_free_disk(out_dir: Path, needed: int) -> None:
    """Refuse before writing rather than fill the disk halfway through a 30 GB file."""
    import shutil

    probe = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    free = shutil.disk_usage(probe).free
    if free < needed * 1.05:

        raise InvalidArgumentError(f"{out_dir} has {free / 1e9:.1f} GB free; the export writes "
                                   f"{needed / 1e9:.1f} GB", accepted="an output folder on a disk with room",
                                   fix="free space or choose another --out")


def _cleaned(model, component: str):
    """The regular export's cleanup (onnx_export.cleanup: constant folding, shape inference, dead nodes) on the
    weightless graph: the weights are graph inputs, so only the shape arithmetic folds (on the small U-Net
    9,385 -> 4,204 nodes, the regular export has 4,125) and nothing weight-sized is materialized."""
    from k3trt.export.onnx_export import cleanup, name_output_axes

    model = name_output_axes(cleanup(model), SPECS[component])
    model.producer_name, model.doc_string = "k3trt", f"Kandinsky 3 {component}"
    return model


def export_streamed(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, component: str = "unet",
                    opset: int = DEFAULT_OPSET, variant: str | None = "auto") -> dict:
    """`out_dir/model.onnx` + `model.onnx.data` from a diffusers folder, in memory bounded by the graph plus
    one weight tensor. `variant`: which weight files (see `_weight_files`). Returns paths and sizes."""
    import onnx

    _, sub, _, prefix = _streamed(component)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_free_disk(out_dir, fp32_data_bytes(model_dir, component, variant))
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "weightless.onnx"
    traced = trace_weightless(model_dir, raw, component=component, opset=opset)
    tied = traced.pop("tied")
    model = _cleaned(onnx.load(str(raw)), component)
    data = out_dir / "model.onnx.data"
    written = stream_weights(model, model_dir / sub, data, prefix=prefix, variant=variant, tied=tied)
    leftover = [i.name for i in model.graph.input if i.name not in SPECS[component].input_names]
    if leftover:

        raise ModelSourceError(f"{len(leftover)} {component} weights are not in {model_dir / sub}, e.g. "
                               f"{leftover[:3]}", fix="re-write the weights (write_random_weights) or re-download")
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


class streamed_fp32_weights:
    """Run a meta-device module from its fp16 safetensors with one layer's weights in memory: each submodule's
    own parameters are read from the file and cast to fp32 just before its forward, and dropped after. The
    result is the fp32 model's; memory is the largest layer, not the model (8.6 B T5: 17 GB in fp16)."""

    def __init__(self, module: torch.nn.Module, folder: Path, variant: str | None = "auto"):
        self.files, self.tied = _weight_files(folder, variant), _tied_names(module)
        owners = {}  # a module shared under two names gets one pair of hooks
        for name, m in module.named_modules(remove_duplicate=False):
            if any(p is not None for p in m._parameters.values()):
                owners.setdefault(id(m), (name, m))
        self.owners = list(owners.values())
        self.handles, self.stored = [], {}

    def _load(self, qualified: str) -> torch.nn.Parameter:
        from safetensors import safe_open

        stored = _stored_key(qualified, self.tied, self.files)
        if stored is None:

            raise ModelSourceError(f"the weight {qualified!r} is not in the safetensors files",
                                   fix="re-download the checkpoint, or re-write its weights")
        qualified = stored
        with safe_open(str(self.files[qualified]), "pt") as handle:
            return torch.nn.Parameter(handle.get_tensor(qualified).float(), requires_grad=False)

    def _hooks(self, owner_name: str):
        def pre(module, *_):
            self.stored[id(module)] = dict(module._parameters)
            for name, param in module._parameters.items():
                if param is not None:
                    module._parameters[name] = self._load(f"{owner_name}.{name}" if owner_name else name)

        def post(module, *_):
            module._parameters.update(self.stored.pop(id(module)))
        return pre, post

    def __enter__(self):
        for name, owner in self.owners:
            pre, post = self._hooks(name)
            self.handles += [owner.register_forward_pre_hook(pre), owner.register_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def streamed_reference_output(model_dir, inputs: dict, *, component: str, variant: str | None = "auto") -> np.ndarray:
    """The component's fp32 output for `inputs` from its (fp16 or fp32) safetensors, one layer's weights in
    memory at a time."""
    build, sub, _, _ = _streamed(component)
    spec = SPECS[component]
    model = build(json.loads((Path(model_dir) / sub / "config.json").read_text()))
    wrapper = spec.wrapper(model).eval()
    with torch.no_grad(), streamed_fp32_weights(model, Path(model_dir) / sub, variant):
        return wrapper(*(inputs[n] for n in spec.input_names)).numpy()


def reference_output(model_dir, inputs: dict) -> np.ndarray:
    """The U-Net's fp32 output for `inputs`, from its fp16 weights, in bounded memory."""
    spec = SPECS["unet"]
    unet = load_fp16_unet(model_dir)
    wrapper = spec.wrapper(unet).eval()
    with torch.no_grad(), fp32_compute(unet):
        return wrapper(*(inputs[n] for n in spec.input_names)).numpy()


def bounded_session(graph: str | os.PathLike, *, threads: int | None = None, flush_denormals: bool = True):
    """An ONNX Runtime CPU session without graph optimizations or weight pre-packing: the weights stay in the
    (memory-mapped, page-aligned) external-data file instead of being copied into re-laid-out buffers."""
    import onnxruntime as ort
    from k3trt.runtime.backends.ort import session_options

    options = session_options(threads=threads, optimize=False, flush_denormals=flush_denormals)
    options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def onnx_runtime_output(graph: str | os.PathLike, inputs: dict, *, threads: int | None = None) -> np.ndarray:
    """One call of `bounded_session`."""
    return bounded_session(graph, threads=threads).run(None, {k: v.numpy() for k, v in inputs.items()})[0]
