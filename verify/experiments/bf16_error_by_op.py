"""Where OpenVINO's bf16 U-Net loses its accuracy: one U-Net call at several fp32 "islands".

OpenVINO's Python API cannot mark single operations to stay fp32, but its IR can: each operation of an IR
`.xml` may carry the runtime attribute `precise` ("do not lower my precision"), which the CPU plugin honours
under `INFERENCE_PRECISION_HINT=bf16`. This script saves the U-Net (static shapes) as IR, marks a chosen set of
operations, compiles in bf16, and prints the relative L2 error against the fp32 compile and the median time.

Not every mark survives: the plugin replaces some operations while compiling, and a replacement does not
inherit the attribute (the timestep's Unsqueeze becomes a Reshape that still runs in bf16, so the timestep is
rounded to bf16 before the fp32 Sin/Cos). `runtime_precisions` reads what each operation really ran in.

    python3 verify/experiments/bf16_error_by_op.py --artifacts small-art --resolution 256x256
"""
from __future__ import annotations

import statistics
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openvino as ov
from k3trt.verify.experiments._unet_inputs import arguments, example_feeds, unet_graph

HEAVY = {"MatMul", "Convolution", "ConvolutionBackpropData", "GroupConvolution"}
NEVER_MARKED = {"Parameter", "Result", "Const"}
# island name -> which IR layers (type, name) stay fp32
ISLANDS = {
    "none (plain bf16)": lambda kind, name: False,
    "time projection (Sin/Cos and its inputs)": lambda kind, name: "time_proj" in name or name == "/unet/Expand",
    "norms and softmax": lambda kind, name: kind in ("MVN", "SoftMax", "Softmax"),
    "everything but Conv/MatMul (torch autocast's split)": lambda kind, name: kind not in HEAVY,
    "everything but Conv (MatMul fp32 too)": lambda kind, name: kind not in HEAVY or kind == "MatMul",
    "everything but MatMul (Conv fp32 too)": lambda kind, name: kind != "MatMul",
}


def static_ir(core: ov.Core, artifacts: str, feeds: dict, folder: Path) -> Path:
    model = core.read_model(unet_graph(artifacts))
    model.reshape({name: ov.PartialShape(list(value.shape)) for name, value in feeds.items()})
    xml = folder / "unet.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml


def marked_copy(xml: Path, keep_fp32, out: Path) -> tuple[Path, int]:
    """A copy of the IR whose selected layers carry `precise`; the weights file is shared."""
    tree = ET.parse(xml)
    marked = 0
    for layer in tree.getroot().iter("layer"):
        if layer.get("type") in NEVER_MARKED or not keep_fp32(layer.get("type"), layer.get("name")):
            continue
        rt_info = layer.find("rt_info")
        if rt_info is None:
            rt_info = ET.SubElement(layer, "rt_info")
        ET.SubElement(rt_info, "attribute", {"name": "precise", "version": "0"})
        marked += 1
    tree.write(out)
    bin_link = out.with_suffix(".bin")
    if not bin_link.exists():
        bin_link.symlink_to(xml.with_suffix(".bin"))
    return out, marked


def median_ms(compiled, feeds: dict, repeats: int) -> float:
    request = compiled.create_infer_request()
    request.infer(feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        request.infer(feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def runtime_precisions(compiled) -> dict[str, tuple[str, str]]:
    """Executed graph: operation name -> (layer type, precision it ran in)."""
    ops = compiled.get_runtime_model().get_ops()
    return {op.get_friendly_name(): (op.get_rt_info()["layerType"].astype(str),
                                     op.get_rt_info()["runtimePrecision"].astype(str)) for op in ops}


def measure(artifacts: str, *, resolution: str = "256x256", repeats: int = 7, threads: int = 2,
            islands=tuple(ISLANDS)) -> dict:
    core, feeds = ov.Core(), example_feeds(artifacts, resolution)
    config = {"INFERENCE_NUM_THREADS": threads}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        xml = static_ir(core, artifacts, feeds, Path(tmp))
        fp32 = core.compile_model(str(xml), "CPU", {**config, "INFERENCE_PRECISION_HINT": "f32"})
        reference = fp32(feeds)[0]
        result = {"fp32_ms": median_ms(fp32, feeds, repeats), "islands": rows}
        for index, island in enumerate(islands):
            keep_fp32 = ISLANDS[island]
            path, marked = marked_copy(xml, keep_fp32, Path(tmp) / f"marked{index}.xml")
            compiled = core.compile_model(str(path), "CPU", {**config, "INFERENCE_PRECISION_HINT": "bf16"})
            out = compiled(feeds)[0]
            rows[island] = {"marked": marked, "ms": median_ms(compiled, feeds, repeats),
                            "rel_l2": float(np.linalg.norm(out - reference) / np.linalg.norm(reference)),
                            "finite": bool(np.isfinite(out).all()), "ran": runtime_precisions(compiled)}
    return result


def main() -> None:
    args = arguments(__doc__, repeats=7)
    result = measure(args.artifacts, resolution=args.resolution, repeats=args.repeats, threads=args.threads)
    print(f"U-Net at {args.resolution}, batch 2: fp32 {result['fp32_ms']:.1f} ms")
    for island, row in result["islands"].items():
        print(f"bf16, fp32 island = {island}: {row['marked']} ops marked, rel L2 {row['rel_l2']:.2e}, "
              f"{row['ms']:.1f} ms")


if __name__ == "__main__":
    main()
