"""`k3trt export --low-memory`: the bounded-memory export (export/streamed.py) inside the regular artifact writer.

The U-Net and the text encoder, the two components past a few GB, are never loaded: a weightless trace plus
weights streamed from the safetensors into external data, validated against the fp32 computation with one
layer's weights in memory (export/validate.py: validate_streamed). The result is an ordinary artifact (same
staging folder, content-named folder, manifest record and export key as the regular path, `extra.streamed`
true), so `check`, `build`, `generate` and the up-to-date test treat it like any other.

Everything a low-memory request cannot do is refused here, before any work:
- a preset (`--preset`: small models, built in memory) or the official `.pt` layout (each `.pt` is read whole
  by torch.load): only a diffusers-layout folder with safetensors can be streamed;
- a component without a streamed path that is as large as a U-Net (`unet_inpainting`, `unet_flash`: the
  regular path would load 3 B parameters in fp32) when named in --components; left out of the default
  set with a note. The MoVQ components (0.27 B parameters at full size) take the regular path;
- `--precision`: ModelOpt AutoCast (export/variants.py) loads the whole fp32 graph, external data included,
  and the verification holds the converted model in memory besides;
- a disk without room for the fp32 external data of every streamed component that is not up to date.
"""
from __future__ import annotations

from pathlib import Path

from k3trt.contract.errors import InvalidArgumentError, ModelSourceError
from k3trt.export.components import component_spec, default_components
from k3trt.export.low_memory_trace import (
    STREAMED,
    check_free_disk,
    export_streamed,
    fp32_data_bytes,
)

# Components without a streamed path that the regular path exports in bounded memory: the MoVQ's weights are
# 0.27 B parameters at full size (`k3trt preset full --describe`), ~1.1 GB in fp32.
REGULAR_FOLDERS = ("movq",)


def is_streamed(name: str) -> bool:
    return name in STREAMED


def check_low_memory_source(source) -> None:
    from k3trt.export.sources import ModelSource

    if not isinstance(source, ModelSource):
        raise ModelSourceError(f"--low-memory cannot stream {str(source.root)!r}: it is the official .pt layout, "
                               "whose files torch.load reads whole",
                               accepted="a diffusers-layout folder with safetensors weights "
                                        "(Kandinsky3Pipeline.save_pretrained, kandinsky-community/kandinsky-3)",
                               fix="export it without --low-memory, or download the diffusers-layout checkpoint")


def low_memory_components(source, requested: list[str] | None, log) -> list[str]:
    """The components a low-memory export writes: `requested` if every one is streamed or small, else a typed
    error; by default every component of the model except the large ones without a streamed path."""
    def fits(name: str) -> bool:
        return is_streamed(name) or component_spec(name).folder in REGULAR_FOLDERS

    if requested is None:
        names = default_components(source)
        left_out = [n for n in names if not fits(n)]
        if left_out:
            log(f"  --low-memory: leaving out {', '.join(left_out)} (U-Net-sized, no streamed path); export them "
                "without --low-memory on a machine that holds them in fp32")
        return [n for n in names if fits(n)]
    refused = [n for n in requested if not fits(n)]
    if refused:
        raise InvalidArgumentError(
            f"--low-memory cannot export {', '.join(refused)}: no streamed path, and the regular path loads the "
            "whole U-Net in fp32", accepted=f"{', '.join(STREAMED)} (streamed) and the MoVQ components (regular)",
            fix=f"drop {', '.join(refused)} from --components, or export them without --low-memory")
    return list(requested)


def check_low_memory_precisions(precisions) -> None:
    if precisions:
        raise InvalidArgumentError(
            f"--low-memory with --precision {','.join(precisions)}: the fp16/bf16 conversion (ModelOpt AutoCast) "
            "loads the whole fp32 graph with its external data (12.2 GB for the full U-Net, 34.9 GB for the text "
            "encoder) and holds the converted model beside it",
            accepted="--low-memory alone (fp32), or --precision without --low-memory",
            fix="export fp32 with --low-memory, then run the same `k3trt export` with --precision and without "
                "--low-memory on a machine with that memory: the fp32 export is up to date, only the conversion "
                "runs")


def check_disk_for_streamed(source, out, pending: list[str]) -> None:
    """Room for the fp32 external data of every streamed component about to be exported. It is staged inside
    the artifact directory (runtime/locking.py: staging_dir) and moved within it, so `out`'s disk (or, for a
    new `out`, its nearest existing parent's) is the one that must hold it, beside the artifacts it replaces."""
    needed = sum(fp32_data_bytes(source.root, name, source.variant) for name in pending if is_streamed(name))
    if needed:
        check_free_disk(Path(out), needed)


def export_streamed_files(source, spec, info: dict, staging: Path, *, opset: int, log):
    """(graph, external data, validation, failures) of a streamed export into `staging`."""
    import onnx
    from k3trt.export.validate import validate_streamed

    log(f"  {spec.name}: weightless trace (opset {opset}), weights streamed from {source.root / spec.folder} ...")
    result = export_streamed(source.root, staging, component=spec.name, opset=opset, variant=source.variant)
    onnx.checker.check_model(str(result["graph"]))  # by path: the graph alone, external data by reference
    log(f"  {spec.name}: {result['data_bytes'] / 1e9:.2f} GB of fp32 weights; validating against the "
        f"layer-streamed torch fp32 reference at {len(spec.validate)} shapes ...")
    validation, failures = validate_streamed(spec, source.root, result["graph"], info, variant=source.variant)
    return result["graph"], result["data"], validation, failures
